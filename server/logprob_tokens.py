"""Tokens as the log-probability fields of chat and completions show them.

A token's `bytes` (chat) are its raw bytes, which for a byte-level BPE tokenizer are often part of a
UTF-8 character (a Chinese character or an emoji spans several tokens): concatenating them over a
response rebuilds its text exactly.

A token's string (chat's `token`, completions' `tokens` and `top_logprobs` keys) is its text when its
bytes are valid UTF-8 on their own, else OpenAI's spelling of the bytes, "bytes:\\xe4\\xb8".  vLLM shows
the decode with U+FFFD instead; we follow OpenAI because that decode loses which bytes a token is, and
makes distinct byte tokens the same key of completions' `top_logprobs` dict (so a harness's "is the
chosen token the top one" check compares the wrong alternatives).
"""
from __future__ import annotations

from functools import lru_cache

_CACHED_TOKENS = 65536


def openai_token_string(raw: bytes) -> str:
    """A token's string, from its raw bytes: the text, or "bytes:\\xNN..." when they are not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class LogprobTokens:
    """Each token's string and raw bytes for the logprob fields, cached by id.  Without a tokenizer
    (a model served on token ids only) a token is its id and has no bytes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.raw_bytes = lru_cache(maxsize=_CACHED_TOKENS)(self._raw_bytes)
        self.string = lru_cache(maxsize=_CACHED_TOKENS)(self._string)

    def is_special(self, token_id: int) -> bool:
        """Whether detokenizing with skip_special_tokens leaves the token out."""
        return self.tokenizer is not None and token_id in self.tokenizer.special_token_ids

    def _raw_bytes(self, token_id: int) -> bytes:
        return self.tokenizer.token_bytes(token_id) if self.tokenizer is not None else b""

    def _string(self, token_id: int) -> str:
        if self.tokenizer is None:
            return str(token_id)
        return openai_token_string(self.raw_bytes(token_id))
