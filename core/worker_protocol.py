"""What the engine and the model worker say to each other: typed, picklable messages.

The engine (scheduler, request state, detokenization) sends one `StepInput` per forward pass and
gets one `StepOutput` back. The worker keeps what sampling needs of each request (its parameters,
random generator and token history) from the pass that first schedules it until a later step's
`ended` list names it, so a decode step carries only the new tokens and page tables.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .batch import BatchItem, consecutive_ranges
from .sampling_params import SamplingParams


@dataclass(frozen=True)
class WorkerStart:
    """The first message a worker process receives: the engine's options and its rank."""

    args: Any                 # EngineArgs
    ranks: Any                # RankInfo


@dataclass(frozen=True)
class ModelInfo:
    """What the engine needs to know about the model the worker loaded."""

    model_path: str           # the resolved folder (a hub id becomes its local snapshot)
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_context: int          # longest sequence (prompt + output) a request may reach
    page_size: int            # tokens per KV page
    num_pages: int            # KV pages, page 0 (the padding page) included
    dtype: str                # compute dtype, e.g. "bfloat16"
    kv_cache_dtype: str
    device: str               # the device plugin's name
    device_description: str   # the start-up line's, e.g. "cpu (avx512_bf16, 2 threads)"
    torch_device: str


@dataclass(frozen=True)
class SequenceStart:
    """A request's sampling state, sent along with the first pass that schedules it."""

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int


@dataclass
class StepInput:
    """One forward pass: `items[i]` belongs to request `rids[i]`; `completes[i]` says whether the pass
    computes that request's whole input, so a token is sampled for it. `forced` has one entry per
    completing item, in order (a token that replaces the sampled one, or None)."""

    items: list[BatchItem]
    rids: list[str]
    completes: list[bool]
    forced: list[int | None]
    started: list[SequenceStart] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)   # requests the worker can forget


@dataclass(frozen=True)
class PromptLogprob:
    """The log-probability of prompt token `position` (and, if asked, the top alternatives there)."""

    position: int
    logprob: float
    top: list[tuple[int, float]] | None


@dataclass
class SampleOutput:
    """The token chosen for each row of a pass's sampled logits, with log-probs where asked."""

    token_ids: list[int]
    logprobs: list[float] | None        # per row, of the chosen token; None when no row asked
    top_logprobs: list[list[tuple[int, float]]] | None

    def row(self, i: int) -> tuple[int, float | None, list[tuple[int, float]] | None]:
        """(token, its log-prob, the top alternatives) of row i; None where not computed."""
        return (self.token_ids[i], None if self.logprobs is None else self.logprobs[i],
                None if self.top_logprobs is None else self.top_logprobs[i])


@dataclass
class StepOutput:
    """The tokens sampled for the completing requests (in batch order) and the prompt log-probs this
    pass computed, by request; or `error` (a traceback) when the pass failed: its requests end with
    an error and the worker goes on serving.

    With speculative decoding a completing request commits `num_committed[j]` tokens (its accepted
    drafts and one token of the target's own): `sampled` has that many rows for it, request after
    request; `drafts[j]` are the draft model's guesses after its last one, for the next pass to verify.
    Without it both are None: one row per request."""

    sampled: SampleOutput | None = None
    prompt_logprobs: dict[str, list[PromptLogprob]] = field(default_factory=dict)
    error: str | None = None
    num_committed: list[int] | None = None
    drafts: list[list[int]] | None = None

    def committed(self) -> list[range]:
        """The rows of `sampled` that belong to each completing request, in batch order."""
        return consecutive_ranges(self.num_committed or [1] * len(self.sampled.token_ids))


@dataclass(frozen=True)
class WorkerCall:
    """Run `fn(runner, *args)` where the model lives and send back its result (benchmarks and tests
    inspect the model this way; in a worker process `fn` must be importable by name)."""

    fn: Callable[..., Any]
    args: tuple = ()


@dataclass(frozen=True)
class Shutdown:
    """Release the model and exit."""


WorkerMessage = StepInput | WorkerCall | Shutdown
