"""SamplingParams: how one request picks its tokens."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import RequestError


@dataclass
class SamplingParams:
    """How to pick each next token of one request.

    temperature 0 is greedy. top_k <= 0 and top_p == 1 and min_p == 0 switch those filters off.
    `seed` makes the request's tokens reproducible whatever else shares its batch.
    `logprobs` returns the log-probability of each chosen token (from the unmodified logits);
    `top_logprobs` adds that many most likely alternatives per step.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1"),
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (self.top_logprobs >= 0, "top_logprobs", "must be >= 0"),
            # the sampler puts these in a 64-bit generator and tensor: a larger value would kill the worker
            (_fits_int64(self.seed), "seed", "must be in [-2**63, 2**63)"),
            (_fits_int64(self.top_k), "top_k", "must be in [-2**63, 2**63)"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise RequestError("{param} " + rule, param=name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0


def _fits_int64(value: int | None) -> bool:
    return value is None or -2**63 <= value < 2**63
