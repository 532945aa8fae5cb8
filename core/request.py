"""A request's state inside the engine, what it streams back, and the handle its caller reads from."""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from .sampling_params import SamplingParams
from .worker_protocol import PromptLogprob


@dataclass
class RequestOutput:
    """One increment of a request's output; the last one has `finished` set.

    token_ids / text / logprobs / top_logprobs hold only what is new since the previous increment.
    """

    rid: str
    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None   # with top_logprobs
    finished: bool = False
    finish_reason: str | None = None      # "stop" | "length" | "abort" | "error"
    matched_stop: int | str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class GenerateOutput:
    """A whole request's result (what `Engine.generate` returns)."""

    rid: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    matched_stop: int | str | None = None
    error: str | None = None

    @classmethod
    def collect(cls, outputs: list[RequestOutput]) -> "GenerateOutput":
        last = outputs[-1]
        want_lp = outputs[0].logprobs is not None
        want_top = outputs[0].top_logprobs is not None
        return cls(
            rid=last.rid,
            text="".join(o.text for o in outputs),
            token_ids=[t for o in outputs for t in o.token_ids],
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            cached_tokens=last.cached_tokens,
            logprobs=[x for o in outputs for x in (o.logprobs or [])] if want_lp else None,
            top_logprobs=[x for o in outputs for x in (o.top_logprobs or [])] if want_top else None,
            prompt_logprobs=next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None),
            prompt_top_logprobs=next((o.prompt_top_logprobs for o in outputs if o.prompt_top_logprobs is not None),
                                     None),
            matched_stop=last.matched_stop,
            error=last.error,
        )


class RequestHandle:
    """Where the engine thread pushes a request's outputs; read it with `for` or `async for`.

    Thread-safe in both directions: the engine appends under a lock and wakes sync readers through
    the condition and asyncio readers through their own event loop.
    """

    def __init__(self, rid: str, engine: Any):
        self.rid = rid
        self._engine = engine
        self._items: deque[RequestOutput] = deque()
        self._cond = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.finished = False
        self._wake_on_finish_only = False

    def push(self, item: RequestOutput) -> None:
        with self._cond:
            self._items.append(item)
            if item.finished or not self._wake_on_finish_only:
                self._cond.notify_all()
            for loop, event in self._async_waiters:
                loop.call_soon_threadsafe(event.set)

    def abort(self) -> None:
        """Stop generating (the client went away); a final 'abort' output follows."""
        self._engine.abort(self.rid)

    def __iter__(self):
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._items)
                item = self._items.popleft()
            yield item
            if item.finished:
                self.finished = True
                return

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._cond:
            self._async_waiters.append((loop, event))
        try:
            while True:
                with self._cond:
                    item = self._items.popleft() if self._items else None
                    if item is None:
                        event.clear()
                if item is None:
                    await event.wait()
                    continue
                yield item
                if item.finished:
                    self.finished = True
                    return
        finally:
            with self._cond:
                self._async_waiters.remove((loop, event))

    def result(self) -> GenerateOutput:
        """Block until finished; the whole output."""
        with self._cond:
            # Nobody reads increments: waking this thread per token only steals the engine's GIL.
            self._wake_on_finish_only = True
            self._cond.wait_for(lambda: self._items and self._items[-1].finished)
            items = list(self._items)
            self._items.clear()
        self.finished = True
        return GenerateOutput.collect(items)


@dataclass(frozen=True)
class Finish:
    """Why a request ended: "stop" (a stop token or string, in `matched`), "length", "abort" or "error"."""

    reason: str
    matched: int | str | None = None


@dataclass(eq=False)  # identity: the scheduler finds and removes requests in its lists
class Request:
    """Engine-side state. `all_ids` is prompt + output; the first `num_computed` of them have KV in
    the cache, and the next forward pass feeds the rest (a prefill chunk or the one decode token)."""

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int                 # of its sampler's random generator (which lives with the model)
    handle: RequestHandle
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    cached_tokens: int = 0
    prefix_node: Any = None
    draft_ids: list[int] = field(default_factory=list)   # speculative decoding: guesses after the last token
    want_prompt_logprobs: bool = False
    # Called before each sampling step with the output so far; a token id it returns is emitted
    # instead of the sampled one (the server's thinking budget uses it).
    token_override: Callable[[list[int]], int | None] | None = None
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    # streaming state
    detokenizer: Any = None
    text: str = ""
    sent_text_len: int = 0
    sent_tokens: int = 0
    sent_logprobs: int = 0
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # timing
    arrival: float = field(default_factory=time.perf_counter)
    last_token_time: float | None = None
    retractions: int = 0

    def append_token(self, token: int, logprob: float | None, top_logprobs: list[tuple[int, float]] | None) -> None:
        """Record a sampled token (and its log-probs, where this request asked for them)."""
        self.output_ids.append(token)
        if logprob is not None and (self.params.logprobs or self.params.top_logprobs):
            self.logprobs.append(logprob)
        if top_logprobs is not None and self.params.top_logprobs:
            self.top_logprobs.append(top_logprobs)

    def record_prompt_logprobs(self, entries: list[PromptLogprob]) -> None:
        """Keep the prompt log-probs a pass computed: each position once, in order (a retracted
        request's prompt is computed again, and nothing is recorded twice)."""
        for e in entries:
            if e.position == len(self.prompt_logprobs) and e.position < len(self.prompt_ids):
                self.prompt_logprobs.append(e.logprob)
                if e.top is not None:
                    self.prompt_top_logprobs.append(e.top)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_decoding(self) -> bool:
        return self.uncomputed == 1 and bool(self.output_ids)
