"""Sampling parameters and the batched sampler (per-request parameters within one batch)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (self.top_logprobs >= 0, "top_logprobs must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float] | None        # per row, of the chosen token; None when no row asked
    top_logprobs: list[list[tuple[int, float]]] | None


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    histories: list[tuple[list[int], list[int]]] | None = None,
    forced: list[int | None] | None = None,
) -> SampleOutput:
    """Pick one token per row of float32 logits [B, V]; row i uses params[i] and generators[i].

    histories[i] = (prompt ids, output ids so far) feeds the penalties; forced[i], when not None,
    replaces row i's choice (a thinking budget closing the reasoning, say); the random draw still
    happens so a seeded request's later tokens do not shift. Log-probs are reported from the
    model's unmodified distribution.
    """
    logits = logits.float()
    raw = logits
    if any(p.has_penalties for p in params):
        logits = _apply_penalties(logits.clone(), params, histories)
    chosen = logits.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        probs = _filtered_probs(logits[rows], [params[i] for i in sampled_rows])
        # Exponential race (argmax p/E) samples from p; each row draws from its own generator, so a
        # seeded request gets the same noise alone or in any batch.
        noise = torch.stack([
            torch.empty(logits.shape[1], device=logits.device).exponential_(generator=generators[i])
            for i in sampled_rows
        ])
        chosen[rows] = (probs / noise).argmax(dim=-1)
    for i, token in enumerate(forced or []):
        if token is not None:
            chosen[i] = token
    token_ids = chosen.tolist()
    want_lp = any(p.logprobs or p.top_logprobs for p in params)
    if not want_lp:
        return SampleOutput(token_ids, None, None)
    logp = torch.log_softmax(raw, dim=-1)
    chosen_lp = logp.gather(1, chosen[:, None])[:, 0].tolist()
    k = max(p.top_logprobs for p in params)
    top = None
    if k:
        vals, ids = logp.topk(k, dim=-1)
        top = [list(zip(ids[i, : p.top_logprobs].tolist(), vals[i, : p.top_logprobs].tolist()))
               for i, p in enumerate(params)]
    return SampleOutput(token_ids, chosen_lp, top)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p, each row with its own values."""
    dev = logits.device
    temp = torch.tensor([p.temperature for p in params], device=dev)[:, None]
    probs = torch.softmax(logits / temp, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[1], device=dev)[None, :]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else probs.shape[1] for p in params], device=dev)[:, None]
    top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
    min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]
    # A token survives top-p when the mass strictly before it is below top_p (the top token always does).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = (rank < top_k) & (mass_before < top_p) & (sorted_probs >= min_p * sorted_probs[:, :1])
    sorted_probs = sorted_probs * keep
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)


def _apply_penalties(logits: torch.Tensor, params: list[SamplingParams],
                     histories: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Repetition penalty over prompt and output (divides positive logits, multiplies negative ones);
    OpenAI's frequency and presence penalties over the output."""
    vocab = logits.shape[1]
    for i, p in enumerate(params):
        if not p.has_penalties:
            continue
        prompt_ids, output_ids = histories[i]
        out_counts = torch.bincount(torch.tensor(output_ids, dtype=torch.int64), minlength=vocab)[:vocab]
        row = logits[i]
        if p.repetition_penalty != 1:
            seen = out_counts.to(row.device) > 0
            seen[torch.tensor(prompt_ids, dtype=torch.int64, device=row.device)] = True
            row[seen] = torch.where(row[seen] > 0, row[seen] / p.repetition_penalty, row[seen] * p.repetition_penalty)
        counts = out_counts.to(row.device, row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return logits
