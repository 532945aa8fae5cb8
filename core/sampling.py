"""The batched sampler: the next token of each request a forward pass completes, every request with
its own parameters and its own random generator (so its tokens do not depend on its batch)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import ScheduledBatch
from .request import Request
from .sampling_params import SamplingParams


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float] | None        # per row, of the chosen token; None when no row asked
    top_logprobs: list[list[tuple[int, float]]] | None

    def row(self, i: int) -> tuple[int, float | None, list[tuple[int, float]] | None]:
        """(token, its log-prob, the top alternatives) of row i; None where not computed."""
        return (self.token_ids[i], None if self.logprobs is None else self.logprobs[i],
                None if self.top_logprobs is None else self.top_logprobs[i])


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


def sample_batch(batch: ScheduledBatch, logits: torch.Tensor) -> SampleOutput:
    """One token for each of `batch.sampling`, in that order, from the last logits row of each.
    Requests that asked for prompt log-probs get this pass's share of them recorded first."""
    rows = batch.logit_rows()
    for req, item, r in zip(batch.requests, batch.items, rows):
        if item.logits == "all":
            record_prompt_logprobs(req, logits[r.start:r.stop])
    reqs = batch.sampling
    if not reqs:
        return SampleOutput([], None, None)
    last_rows = [r.stop - 1 for r, done in zip(rows, batch.completes) if done]
    forced = [r.token_override(r.output_ids) if r.token_override else None for r in reqs]
    return sample(logits[last_rows], [r.params for r in reqs], [r.generator for r in reqs],
                  [(r.prompt_ids, r.output_ids) for r in reqs], forced)


def record_prompt_logprobs(req: Request, rows: torch.Tensor) -> None:
    """Row j scores the token after position num_computed + j (kept once, even after a retraction);
    with top_logprobs, the k most likely tokens at each prompt position too."""
    logp = torch.log_softmax(rows.float(), dim=-1)
    k = req.params.top_logprobs
    top = logp.topk(k, dim=-1) if k else None
    for j in range(rows.shape[0]):
        target = req.num_computed + j + 1
        if target == len(req.prompt_logprobs) and target < len(req.prompt_ids):
            req.prompt_logprobs.append(float(logp[j, req.prompt_ids[target]]))
            if top is not None:
                req.prompt_top_logprobs.append(list(zip(top.indices[j].tolist(), top.values[j].tolist())))


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
