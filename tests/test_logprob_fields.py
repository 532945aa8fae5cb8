"""Log-probability fields that clients rebuild text from: chat's per-token `bytes` and completions'
`tokens` / `text_offset` with echo, on dsserve-tiny's byte-level BPE tokenizer, which spells Chinese
characters and emoji one byte per token (so their tokens are not UTF-8 on their own).

Conventions under test (server/logprob_tokens.py, server/completions.py): a token that is not UTF-8
on its own is the string "bytes:\\xNN..."; `bytes` are the token's raw bytes; `text_offset` counts a
character split across tokens at the token that completes it; a text prompt is echoed as sent, its
BOS listed first with no room in the text; the token that stopped the request takes no room.
"""
from __future__ import annotations

import json

import httpx
import pytest
from dsserve.core.tokenizer import Tokenizer
from dsserve.server.logprob_tokens import openai_token_string
from server_util import scripted_output, server_fixtures, sse_events

MULTIBYTE = "Grüße, 世界! 😀 ok"
PROMPT = "天气 🌧 today:"
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"


server, engine, url = server_fixtures()


def token_bytes(token: str) -> bytes:
    """A token string's bytes, reading OpenAI's "bytes:\\xNN" spelling back."""
    if token.startswith("bytes:"):
        return bytes.fromhex(token[len("bytes:"):].replace("\\x", ""))
    return token.encode()


def post(url: str, path: str, body: dict) -> dict:
    response = httpx.post(url + path, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def streamed(url: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        return [e for e in sse_events(response) if e != "[DONE]" and e["choices"]]


def assert_same_logprobs(a: list[float | None], b: list[float | None]) -> None:
    assert [x is None for x in a] == [x is None for x in b]
    assert [x for x in a if x is not None] == pytest.approx([x for x in b if x is not None], abs=1e-5)


# ------------------------------------------------------------------------------------ token bytes
def test_byte_level_token_bytes_rebuild_multibyte_text(engine):
    tokenizer = engine.tokenizer
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    raw = [tokenizer.token_bytes(i) for i in ids]
    assert b"".join(raw) == MULTIBYTE.encode()
    assert any(openai_token_string(r).startswith("bytes:") for r in raw)
    assert openai_token_string(b"\xe4\xb8") == "bytes:\\xe4\\xb8"
    assert tokenizer.token_bytes(tokenizer.token_to_id(BOS)) == BOS.encode()


def test_byte_fallback_pieces_are_their_byte(tmp_path):
    """A SentencePiece-style tokenizer spells unknown characters as <0xNN> byte pieces."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "▁": 257, "a": 258, "▁a": 259}
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[("▁", "a")], unk_token="<unk>", byte_fallback=True))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>"}))
    tokenizer = Tokenizer(tmp_path)
    ids = tokenizer.encode("a中", add_special_tokens=False)
    assert [tokenizer.token_bytes(i) for i in ids] == [b"a", b"\xe4", b"\xb8", b"\xad"]


# ------------------------------------------------------------------------------------ chat
def tokens_and_bytes(entry: dict) -> tuple:
    """A chat logprob entry without its log-probabilities: its token and bytes, and its alternatives'."""
    return entry["token"], entry["bytes"], [(t["token"], t["bytes"]) for t in entry["top_logprobs"]]


def test_chat_bytes_rebuild_the_content_streamed_or_not(engine, url):
    body = {"messages": [{"role": "user", "content": "Say hi"}], "temperature": 0, "max_tokens": 64,
            "logprobs": True, "top_logprobs": 2}
    with scripted_output(engine, MULTIBYTE):
        whole = post(url, "/v1/chat/completions", body)["choices"][0]
        chunks = streamed(url, "/v1/chat/completions", body)
    assert whole["message"]["content"] == MULTIBYTE
    entries = whole["logprobs"]["content"]
    # The stop token is listed (as usage counts it), with its own bytes; the others spell the content.
    assert entries[-1]["token"] == EOS
    assert b"".join(bytes(e["bytes"]) for e in entries[:-1]) == MULTIBYTE.encode()
    assert any(e["token"].startswith("bytes:") for e in entries)
    for entry in entries:
        for shown in (entry, *entry["top_logprobs"]):
            assert shown["token"] == openai_token_string(bytes(shown["bytes"]))

    streamed_entries = [e for c in chunks if c["choices"][0].get("logprobs")
                        for e in c["choices"][0]["logprobs"]["content"]]
    assert list(map(tokens_and_bytes, streamed_entries)) == list(map(tokens_and_bytes, entries))
    assert_same_logprobs([e["logprob"] for e in streamed_entries], [e["logprob"] for e in entries])


# ------------------------------------------------------------------------------------ completions
def assert_offsets_index_text(text: str, tokens: list[str], offsets: list[int], spelled: list[bytes]) -> None:
    """`spelled[i]`: what token i spells in `text` (b"" for a token that is not in it)."""
    assert b"".join(spelled) == text.encode()
    assert offsets[0] == 0
    ends = offsets[1:] + [len(text)]
    for i, (token, start, end) in enumerate(zip(tokens, offsets, ends)):
        # the characters whole in the bytes before token i
        assert start == len(b"".join(spelled[:i]).decode("utf-8", errors="ignore"))
        if spelled[i] and not token.startswith("bytes:"):
            assert text[start:end] == token


def completion_fields(choice_pieces: list[dict]) -> tuple[str, dict]:
    """The text and the logprob fields of one choice, joined over its streamed pieces."""
    text = "".join(p["text"] for p in choice_pieces)
    fields = {key: [x for p in choice_pieces if p.get("logprobs") for x in p["logprobs"][key] or []]
              for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    return text, fields


@pytest.mark.parametrize("prompt_kind", ["text", "token ids"])
def test_completions_echo_offsets_index_the_returned_text(engine, url, prompt_kind):
    tokenizer = engine.tokenizer
    prompt_ids = tokenizer.encode(PROMPT)
    body = {"prompt": PROMPT if prompt_kind == "text" else prompt_ids, "echo": True, "logprobs": 1,
            "temperature": 0, "max_tokens": 64}
    with scripted_output(engine, MULTIBYTE) as scripted:
        whole = post(url, "/v1/completions", body)["choices"][0]
        chunks = streamed(url, "/v1/completions", body)
    echoed = PROMPT if prompt_kind == "text" else BOS + PROMPT
    assert whole["text"] == echoed + MULTIBYTE
    text, fields = completion_fields([whole])
    assert fields["tokens"][0] == BOS and fields["tokens"][-1] == EOS
    assert len(fields["tokens"]) == len(prompt_ids) + len(scripted)
    assert any(t.startswith("bytes:") for t in fields["tokens"])
    # A text prompt's BOS is not in the echo; the stop token is never in the text.
    spelled = [token_bytes(t) for t in fields["tokens"][:-1]] + [b""]
    if prompt_kind == "text":
        spelled[0] = b""
    assert_offsets_index_text(text, fields["tokens"], fields["text_offset"], spelled)

    streamed_text, streamed_fields = completion_fields([c["choices"][0] for c in chunks])
    assert streamed_text == text
    for key in ("tokens", "text_offset"):
        assert streamed_fields[key] == fields[key]
    assert_same_logprobs(streamed_fields["token_logprobs"], fields["token_logprobs"])
    assert [t and list(t) for t in streamed_fields["top_logprobs"]] == [t and list(t) for t in fields["top_logprobs"]]


def test_completions_offsets_without_echo_start_at_the_completion(engine, url):
    body = {"prompt": PROMPT, "logprobs": 0, "temperature": 0, "max_tokens": 64}
    with scripted_output(engine, MULTIBYTE):
        whole = post(url, "/v1/completions", body)["choices"][0]
    text, fields = completion_fields([whole])
    assert text == MULTIBYTE
    spelled = [token_bytes(t) for t in fields["tokens"][:-1]] + [b""]
    assert_offsets_index_text(text, fields["tokens"], fields["text_offset"], spelled)
