"""Serving metrics, kept by the engine loop in one small object; the server exports them."""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

_RECENT = 1000  # latency samples kept for quick summaries; exporters see every one via listeners
DECODE_LOG_INTERVAL = 40  # decode passes between two decode log lines (SGLang's default)

log = logging.getLogger("dsserve")


@dataclass
class Metrics:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0              # fraction of KV pages held by requests (tree-only pages excluded)
    prompt_tokens: int = 0             # total over finished requests
    cached_prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)   # by finish reason
    retractions: int = 0
    spec_verifications: int = 0        # speculative decoding: requests' verify passes with drafts,
    spec_verified_tokens: int = 0      # and the tokens they committed (accepted drafts + the target's own)
    ttft: deque = field(default_factory=lambda: deque(maxlen=_RECENT))
    itl: deque = field(default_factory=lambda: deque(maxlen=_RECENT))
    listeners: list[Callable[[str, float], None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def prefix_hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def spec_accept_length(self) -> float:
        """Tokens a request commits per verify pass (1 + accepted drafts), on average."""
        return self.spec_verified_tokens / self.spec_verifications if self.spec_verifications else 0.0

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.append(seconds)
        self._notify("ttft", seconds)

    def observe_itl(self, seconds: float) -> None:
        self.itl.append(seconds)
        self._notify("itl", seconds)

    def request_finished(self, req, reason: str) -> None:
        with self.lock:
            self.prompt_tokens += len(req.prompt_ids)
            self.cached_prompt_tokens += req.cached_tokens
            self.generation_tokens += len(req.output_ids)
            self.requests_finished[reason] = self.requests_finished.get(reason, 0) + 1
        self._notify("finished", 1.0)

    def _notify(self, name: str, value: float) -> None:
        for listener in self.listeners:
            listener(name, value)


@dataclass
class DecodeLog:
    """A log line every `interval` decode passes, as SGLang's scheduler writes one: requests running
    and queued, KV cache use, the generation throughput of those passes (their own time: an idle
    engine does not dilute it) and, with speculative decoding, their accept length."""

    interval: int = DECODE_LOG_INTERVAL
    passes: int = 0
    tokens: int = 0
    seconds: float = 0.0
    verified: tuple[int, int] = (0, 0)   # the metrics' (verifications, verified tokens) at the last line

    def observe(self, tokens: int, seconds: float, m: Metrics) -> None:
        """A decode pass gave `tokens` tokens in `seconds`; `m` has been updated after it."""
        self.passes += 1
        self.tokens += tokens
        self.seconds += seconds
        if self.passes % self.interval:
            return
        line = (f"decode: {m.num_running} running, {m.num_waiting} queued, KV cache {m.kv_usage:.0%} used, "
                f"{self.tokens / self.seconds:.1f} tok/s")
        done = m.spec_verifications - self.verified[0]
        if done:
            line += f", accept length {(m.spec_verified_tokens - self.verified[1]) / done:.2f}"
        log.info(line)
        self.tokens, self.seconds = 0, 0.0
        self.verified = (m.spec_verifications, m.spec_verified_tokens)
