"""ScheduledBatch: one forward pass as the scheduler chose it, and each sequence's share of it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a request imports what the worker sends back, which carries BatchItems
    from .request import Request


@dataclass
class BatchItem:
    """One sequence's share of a forward pass (what the model runner needs, nothing about requests)."""

    new_token_ids: list[int]
    prefix_len: int           # tokens of this sequence already in the cache
    pages: list[int]          # all its pages, enough for prefix + new tokens (and the drafting after them)
    logits: str = "last"      # which rows need logits: "last", "all" (prompt log-probs) or "none"
    # Speculative decoding: the last `num_drafts` new tokens are the draft model's guesses after the
    # sequence's last token, verified in this pass ("last" then means the last 1 + num_drafts rows).
    num_drafts: int = 0

    @property
    def num_logit_rows(self) -> int:
        return {"all": len(self.new_token_ids), "last": 1 + self.num_drafts, "none": 0}[self.logits]


@dataclass
class ScheduledBatch:
    """`items[i]` feeds `requests[i]`. The model runner returns logits rows item by item (see
    BatchItem.logits). `completes[i]`: this pass computes the whole input of request i, so it gets
    its next token from the pass (a prefill chunk that leaves part of the prompt does not)."""

    kind: str                 # "extend" or "decode"
    requests: list[Request]
    items: list[BatchItem]
    completes: list[bool] = field(init=False)
    sampling: list[Request] = field(init=False)  # the requests that complete, in batch order

    def __post_init__(self) -> None:
        # Fixed when the batch is made: the step reads them after postprocess has advanced the requests.
        self.completes = [r.num_computed + len(it.new_token_ids) - it.num_drafts == r.num_tokens
                          for r, it in zip(self.requests, self.items)]
        self.sampling = [r for r, done in zip(self.requests, self.completes) if done]


def logit_rows(items: list[BatchItem]) -> list[range]:
    """The rows of a pass's logits that belong to each item, in batch order."""
    return consecutive_ranges(it.num_logit_rows for it in items)


def consecutive_ranges(counts) -> list[range]:
    """Back-to-back ranges of the given lengths from 0: the rows each of a run of owners has."""
    rows, start = [], 0
    for n in counts:
        rows.append(range(start, start + n))
        start += n
    return rows
