"""Tokenizer wrapper and streaming detokenizer.

``Tokenizer`` wraps a Hugging Face fast tokenizer loaded from a checkpoint folder and exposes only
what the server needs: encode/decode, each token's raw bytes, the checkpoint's chat template, the set
of end-of-sequence ids and the vocabulary size.  ``IncrementalDetokenizer`` turns a stream of generated
token ids into text deltas that never split a character.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

REPLACEMENT_CHAR = "\ufffd"


# A SentencePiece byte-fallback piece: the byte 0xNN.
_BYTE_FALLBACK_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's bytes_to_unicode table, inverted: byte-level BPE vocabularies write every byte as a
    printable character (printable Latin-1 bytes as themselves, the others shifted to U+0100 and up),
    so a piece's characters map back to its raw bytes one to one."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    alphabet = {chr(b): b for b in printable}
    alphabet.update({chr(256 + k): b for k, b in enumerate(shifted)})
    return alphabet


_BYTE_LEVEL_ALPHABET = _byte_level_alphabet()


def _byte_level_piece_bytes(piece: str) -> bytes | None:
    """The raw bytes of a byte-level BPE piece; None when a character is outside the alphabet."""
    try:
        return bytes(_BYTE_LEVEL_ALPHABET[ch] for ch in piece)
    except KeyError:
        return None


def _decodes_byte_level(decoder_state: Mapping[str, Any]) -> bool:
    """Whether a tokenizers decoder (its JSON state) is, or chains, a ByteLevel decoder."""
    if decoder_state.get("type") == "ByteLevel":
        return True
    return any(_decodes_byte_level(d) for d in decoder_state.get("decoders") or ())


class ChatTemplateError(ValueError):
    """The checkpoint has no chat template and none was given."""


class TokenizerError(ValueError):
    """The checkpoint's tokenizer or generation config cannot be read; one line naming the file."""


def _as_id_set(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, bool):  # bool is an int; never an id
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, (list, tuple, set)):
        return {int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


class Tokenizer:
    """A checkpoint's tokenizer.

    Args:
        path: a checkpoint folder (or anything ``AutoTokenizer.from_pretrained`` accepts).
        trust_remote_code: passed to ``AutoTokenizer.from_pretrained``.
        extra_eos_token_ids: more ids that end generation, added to ``eos_token_ids``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        trust_remote_code: bool = False,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        from transformers import AutoTokenizer

        self.path = str(path)
        try:
            self._hf = AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        except Exception as e:  # tokenizers raises bare Exceptions; transformers' messages run to many lines
            _check_tokenizer_files(Path(self.path))
            raise TokenizerError(f"{self.path}: cannot load the tokenizer ({_first_line(e)})") from None
        self._eos_token_ids = frozenset(
            self._generation_eos_ids() | _as_id_set(self._hf.eos_token_id) | _as_id_set(list(extra_eos_token_ids))
        )
        self._vocab_size = len(self._hf)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> Tokenizer:
        return cls(path, **kwargs)

    def _generation_eos_ids(self) -> set[int]:
        gen_path = Path(self.path) / "generation_config.json"
        if gen_path.is_file():
            # Refused, not ignored, when unreadable: its eos_token_id decides where generation stops.
            eos = _read_json_object(gen_path).get("eos_token_id")
            if eos is not None and not _is_id_or_ids(eos):
                raise TokenizerError(f"{gen_path}: field 'eos_token_id' must be a token id or a list of them, "
                                     f"got {json.dumps(eos)}")
            return _as_id_set(eos)
        if Path(self.path).is_dir():
            return set()
        # Not a local folder (a hub id): let transformers find it, if it can.
        try:
            from transformers import GenerationConfig

            return _as_id_set(GenerationConfig.from_pretrained(self.path).eos_token_id)
        except Exception:  # noqa: BLE001 - an absent generation config is normal
            return set()

    # -- properties -------------------------------------------------------------------------------

    @property
    def hf_tokenizer(self) -> Any:
        """The underlying transformers tokenizer."""
        return self._hf

    @property
    def eos_token_ids(self) -> set[int]:
        """Ids that end generation: generation_config.json's eos_token_id (int or list) plus the
        tokenizer's eos token."""
        return set(self._eos_token_ids)

    @property
    def eos_token_id(self) -> int | None:
        return self._hf.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self._hf.bos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self._hf.pad_token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    @property
    def chat_template(self) -> str | None:
        template = getattr(self._hf, "chat_template", None)
        if isinstance(template, dict):  # named templates: use "default"
            template = template.get("default")
        return template or None

    # -- text <-> ids -----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def encode_marking_added(self, text: str) -> tuple[list[int], list[bool]]:
        """``encode(text)`` and, per id, whether the tokenizer added it around the text (a BOS)
        rather than read it from the text (a special token written in the text is read from it)."""
        encoding = self._hf(text, add_special_tokens=True, return_special_tokens_mask=True)
        return list(encoding["input_ids"]), [bool(m) for m in encoding["special_tokens_mask"]]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return list(self._hf.convert_ids_to_tokens(list(ids)))

    def token_to_id(self, token: str) -> int | None:
        tid = self._hf.convert_tokens_to_ids(token)
        unk = self._hf.unk_token_id
        if tid is None or (unk is not None and tid == unk and token != self._hf.unk_token):
            return None
        return int(tid)

    # -- raw bytes ------------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes ``token_id`` stands for, which may be part of a UTF-8 character: a
        byte-level BPE piece mapped back through GPT-2's byte alphabet, the byte of a SentencePiece
        ``<0xNN>`` piece, else the UTF-8 of the token's decoded text (added tokens, other pieces,
        and ids past the vocabulary, which decode to "")."""
        piece = self._hf.convert_ids_to_tokens(token_id)
        if piece is not None and token_id not in self._added_token_ids:
            if self._is_byte_level:
                raw = _byte_level_piece_bytes(piece)
                if raw is not None:
                    return raw
            elif match := _BYTE_FALLBACK_PIECE.fullmatch(piece):
                return bytes([int(match[1], 16)])
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    @cached_property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that ``decode(..., skip_special_tokens=True)`` leaves out: the added tokens marked
        special (``<think>`` is not, in DeepSeek-R1)."""
        return frozenset(i for i, token in self._hf.added_tokens_decoder.items() if token.special)

    @cached_property
    def _added_token_ids(self) -> frozenset[int]:
        # Added tokens are stored as their text, not in the vocabulary's byte alphabet.
        return frozenset(self._hf.added_tokens_decoder)

    @cached_property
    def _is_byte_level(self) -> bool:
        decoder = getattr(getattr(self._hf, "backend_tokenizer", None), "decoder", None)
        return decoder is not None and _decodes_byte_level(json.loads(decoder.__getstate__()))

    # -- chat -------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` (OpenAI-style dicts) with the checkpoint's chat template, or with
        ``chat_template`` when given.  Extra keyword arguments are visible to the template.

        A message ``content`` of None is rendered as "" (transformers drops None-valued keys, which
        breaks templates such as DeepSeek-R1's that read ``message['content']`` of an assistant
        message that only carries tool calls; every DeepSeek template renders "" and None alike).
        """
        if not chat_template and not self.chat_template:
            raise ChatTemplateError(
                f"the tokenizer at {self.path!r} has no chat template; pass chat_template= "
                "(a Jinja template string) or use the completions endpoint with a raw prompt"
            )
        prepared = []
        for message in messages:
            msg = dict(message)
            if "content" in msg and msg["content"] is None:
                msg["content"] = ""
            prepared.append(msg)
        rendered = self._hf.apply_chat_template(
            prepared,
            tools=list(tools) if tools else None,
            chat_template=chat_template or None,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **kwargs,
        )
        if not isinstance(rendered, str):  # pragma: no cover - transformers returns str for tokenize=False
            raise TypeError(f"chat template rendered {type(rendered).__name__}, expected str")
        return rendered

    def incremental_detokenizer(
        self, *, skip_special_tokens: bool = True, prompt_ids: Sequence[int] | None = None
    ) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens, prompt_ids=prompt_ids)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self._vocab_size})"


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; TokenizerError naming the file when it does not."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise TokenizerError(f"{path}: unreadable ({e.strerror or e})") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise TokenizerError(f"{path}: not valid JSON ({e}); is the file truncated?") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: must hold a JSON object {{...}}, got a {type(data).__name__}")
    return data


def _check_tokenizer_files(folder: Path) -> None:
    """After a failed load, raise TokenizerError naming the file at fault where it is one of these: a
    tokenizer.json or tokenizer_config.json that is not a JSON object (a truncated download, say), or a
    tokenizer_config.json without the tokenizer.json that holds the vocabulary."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            _read_json_object(folder / name)
    config = folder / "tokenizer_config.json"
    if config.is_file() and not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
        tokenizer_class = _read_json_object(config).get("tokenizer_class")
        named = f"its tokenizer_class {json.dumps(tokenizer_class)}" if tokenizer_class else "the tokenizer"
        # from None: transformers' error, being handled, only says that no backend could be built.
        raise TokenizerError(f"{config}: {named} is loaded from tokenizer.json, which is missing from "
                             f"{folder}; copy it from the model's repository") from None


def _is_id_or_ids(value: Any) -> bool:
    def is_id(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    return is_id(value) or (isinstance(value, list) and all(is_id(v) for v in value))


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns generated token ids, fed one step at a time, into text deltas.

    The concatenation of the deltas equals the full decode of every id fed so far, except for a held
    back tail: text whose decode ends in U+FFFD (an incomplete UTF-8 sequence, e.g. the first bytes of
    an emoji) is held until a later token completes it, so no delta ever ends in part of a character.
    ``finish()`` returns whatever is still held.

    Only a short window of ids is decoded per step: ``[prefix, read)`` were already turned into text
    and give context (leading-space rules of SentencePiece tokenizers); ``[read, end)`` are new.  The
    delta is the decode of the whole window minus the decode of ``[prefix, read)``.  Once text is
    emitted the window slides forward, so the cost per step does not grow with the sequence.

    Args:
        tokenizer: a ``Tokenizer`` (or anything with ``decode(ids, skip_special_tokens=...)``).
        skip_special_tokens: drop special tokens from the text (``<think>`` is not special in
            DeepSeek-R1, so it stays).
        prompt_ids: the prompt; its last few ids seed the context window (nothing of it is emitted).
        max_pending: a bound on ids held without producing text.  Only an invalid byte run (never a
            valid character, which spans at most 4 byte tokens) can reach it; the held text is then
            released as is, U+FFFD included, so a garbage stream cannot make steps slow.
    """

    _PROMPT_CONTEXT = 4

    def __init__(
        self,
        tokenizer: _Decoder,
        *,
        skip_special_tokens: bool = True,
        prompt_ids: Sequence[int] | None = None,
        max_pending: int = 16,
    ) -> None:
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.max_pending = max(4, int(max_pending))
        self._window: list[int] = list(prompt_ids[-self._PROMPT_CONTEXT :]) if prompt_ids else []
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window) if self._window else ""
        self._pieces: list[str] = []
        self.num_tokens = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def pending_ids(self) -> list[int]:
        """Ids fed but not yet turned into emitted text."""
        return self._window[self._read :]

    def _slide(self) -> None:
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)

    def step(self, token_ids: int | Iterable[int]) -> str:
        """Feed one id (or several) and return the new text, possibly ""."""
        if isinstance(token_ids, int):
            self._window.append(token_ids)
            self.num_tokens += 1
        else:
            before = len(self._window)
            self._window.extend(int(t) for t in token_ids)
            self.num_tokens += len(self._window) - before
        full = self._decode(self._window)
        pending = len(self._window) - self._read
        if full.endswith(REPLACEMENT_CHAR) and pending < self.max_pending:
            return ""  # an incomplete character: wait for the next bytes
        if len(full) <= len(self._prefix_text):
            # Nothing new (e.g. a skipped special token).  Keep the context unless the window grew
            # past the bound.
            if pending >= self.max_pending:
                self._read = len(self._window)
                self._slide()
            return ""
        delta = full[len(self._prefix_text) :]
        self._read = len(self._window)
        self._slide()
        self._pieces.append(delta)
        return delta

    def finish(self) -> str:
        """Release whatever is still held (an unfinished character decodes to U+FFFD)."""
        if self._read >= len(self._window):
            return ""
        full = self._decode(self._window)
        delta = full[len(self._prefix_text) :] if len(full) > len(self._prefix_text) else ""
        self._read = len(self._window)
        self._slide()
        if delta:
            self._pieces.append(delta)
        return delta


__all__ = ["REPLACEMENT_CHAR", "ChatTemplateError", "IncrementalDetokenizer", "Tokenizer", "TokenizerError"]
