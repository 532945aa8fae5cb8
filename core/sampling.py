"""The batched sampler: the next token of each request a forward pass completes, every request with
its own parameters and its own random generator (so its tokens do not depend on its batch)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .batch import logit_rows
from .sampling_params import SamplingParams
from .worker_protocol import PromptLogprob, SampleOutput, StepInput, StepOutput


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
        noise = torch.stack([exponential_noise(probs.shape[1], generators[i], probs.device) for i in sampled_rows])
        chosen[rows] = (probs / noise).argmax(dim=-1)
    for i, token in enumerate(forced or []):
        if token is not None:
            chosen[i] = token
    return with_logprobs(raw, chosen.tolist(), params)


def exponential_noise(size: int, generator: torch.Generator, device) -> torch.Tensor:
    """One draw of the exponential race: argmax(p / noise) is a sample of p."""
    return torch.empty(size, device=device).exponential_(generator=generator)


def with_logprobs(raw: torch.Tensor, token_ids: list[int], params: list[SamplingParams]) -> SampleOutput:
    """The chosen tokens (row i of the unmodified logits `raw` chose token_ids[i], with params[i]) and,
    where asked, their log-probs and the top alternatives of their rows."""
    if not any(p.logprobs or p.top_logprobs for p in params):
        return SampleOutput(token_ids, None, None)
    logp = torch.log_softmax(raw, dim=-1)
    chosen = torch.tensor(token_ids, device=logp.device)
    chosen_lp = logp.gather(1, chosen[:, None])[:, 0].tolist()
    k = max(p.top_logprobs for p in params)
    top = None
    if k:
        vals, ids = logp.topk(k, dim=-1)
        top = [list(zip(ids[i, : p.top_logprobs].tolist(), vals[i, : p.top_logprobs].tolist()))
               for i, p in enumerate(params)]
    return SampleOutput(token_ids, chosen_lp, top)


@dataclass
class SequenceSampling:
    """What the worker keeps of one request for its sampling: parameters, generator, token history."""

    params: SamplingParams
    generator: torch.Generator
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)

    def token_at(self, position: int) -> int:
        """Token `position` of the sequence (prompt, then output)."""
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.output_ids[position - n]


def sample_step(step: StepInput, logits: torch.Tensor, sequences: dict[str, SequenceSampling]) -> StepOutput:
    """One token for each completing request of `step`, in batch order, from the last logits row of
    each; the prompt log-probs of the items that asked for them."""
    rows = logit_rows(step.items)
    prompt_lp = step_prompt_logprobs(step, logits, rows, sequences)
    seqs = [sequences[rid] for rid, done in zip(step.rids, step.completes) if done]
    if not seqs:
        return StepOutput(SampleOutput([], None, None), prompt_lp)
    last_rows = [r.stop - 1 for r, done in zip(rows, step.completes) if done]
    sampled = sample(logits[last_rows], [s.params for s in seqs], [s.generator for s in seqs],
                     [(s.prompt_ids, s.output_ids) for s in seqs], step.forced)
    for seq, token in zip(seqs, sampled.token_ids):
        seq.output_ids.append(token)
    return StepOutput(sampled, prompt_lp)


def step_prompt_logprobs(step: StepInput, logits: torch.Tensor, rows: list[range],
                         sequences: dict[str, SequenceSampling]) -> dict[str, list[PromptLogprob]]:
    """The prompt log-probs of the items of `step` that asked for them, by request."""
    found = {}
    for rid, item, r in zip(step.rids, step.items, rows):
        if item.logits == "all":
            seq = sequences[rid]
            found[rid] = prompt_logprobs(logits[r.start:r.stop], item.prefix_len, seq.prompt_ids,
                                         seq.params.top_logprobs)
    return found


def prompt_logprobs(rows: torch.Tensor, prefix_len: int, prompt_ids: list[int], k: int) -> list[PromptLogprob]:
    """Row j of a pass that starts at position `prefix_len` scores prompt token prefix_len + j + 1
    (with k > 0, the k most likely tokens there too); the row after the prompt's end scores nothing."""
    n = min(rows.shape[0], len(prompt_ids) - prefix_len - 1)
    if n <= 0:
        return []
    logp = torch.log_softmax(rows[:n].float(), dim=-1)
    targets = torch.tensor(prompt_ids[prefix_len + 1: prefix_len + 1 + n], device=logp.device)
    chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
    top = None
    if k:
        vals, ids = logp.topk(k, dim=-1)
        top = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    return [PromptLogprob(prefix_len + 1 + j, chosen[j], top[j] if top else None) for j in range(n)]


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
