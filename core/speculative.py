"""Speculative decoding with the model's MTP layer: the model worker's side of a step.

A speculating request arrives at a decode step with its last token t_n and the drafts d_1..d_k the
MTP layer proposed after it. One pass of the model over [t_n, d_1..d_k] (an extend pass over the
paged cache) gives the target's logits after each of them; `verify` commits the drafts the target
agrees with and one token of the target's own after them, so a step yields 1..k+1 tokens for one
read of the weights. The KV of rejected drafts stays in slots past the request's committed length:
the engine's scheduler frees those pages and never hands them to the prefix cache.

The MTP layer then catches up on the committed tokens: its cache row at position i holds the pair
(h_i, t_{i+1}) of the target's hidden state and the token after it (models/mtp.py), so it runs one
extend pass over the positions this step committed (the target's hidden states of this very pass,
the committed tokens shifted by one). Its output at the last position drafts d'_1, and k-1 chained
decode passes of the layer (each on its previous output) draft d'_2..d'_k for the next step. A
prefill chunk is followed by the same catch-up over its positions, so the cache of the MTP layer
always covers what the model's covers.

Drafts are the MTP layer's argmax (a point mass q = δ_d): a sampled request accepts d with
probability p(d) under the target's filtered distribution p and, on rejection, samples from p with
d removed; this is the standard accept/reject rule for that q, so every token is distributed as
non-speculative sampling would give it, and greedy requests commit exactly the target's argmaxes.
"""
from __future__ import annotations

import torch

from .batch import BatchItem, logit_rows
from .sampling import (SequenceSampling, _apply_penalties, _filtered_probs, exponential_noise, step_prompt_logprobs,
                       with_logprobs)
from .worker_protocol import SampleOutput, StepInput, StepOutput


def verify(logits: torch.Tensor, groups: list[range], drafts: list[list[int]], seqs: list[SequenceSampling],
           forced: list[int | None]) -> tuple[SampleOutput, list[int]]:
    """The tokens each sequence commits: seqs[j]'s target logits are rows groups[j] of `logits`
    (1 + len(drafts[j]) rows: after its last token, then after each draft). Returns the committed
    tokens of every sequence, one after another (with log-probs where asked), and how many each has.
    forced[j], when not None, is committed instead (a sequence with a forced token has no drafts)."""
    raw = logits.float()
    row_params = [s.params for s, g in zip(seqs, groups) for _ in g]
    scored = raw
    if any(p.has_penalties for p in row_params):
        # row i of a sequence scores the token after its draft i: its history includes drafts[:i]
        histories = [(s.prompt_ids, s.output_ids + d[:i]) for s, g, d in zip(seqs, groups, drafts) for i in range(len(g))]
        scored = _apply_penalties(raw.clone(), row_params, histories)
    best = scored.argmax(dim=-1).tolist()
    sampled_rows = [r for s, g in zip(seqs, groups) if not s.params.greedy for r in g]
    probs = {}
    if sampled_rows:
        filtered = _filtered_probs(scored[sampled_rows], [row_params[r] for r in sampled_rows])
        probs = dict(zip(sampled_rows, filtered))
    tokens, rows, counts = [], [], []
    for seq, group, draft, force in zip(seqs, groups, drafts, forced):
        chosen = (_greedy_run(best, group, draft) if seq.params.greedy
                  else _sampled_run(probs, group, draft, seq.generator))
        if force is not None:
            chosen = [force]
        tokens += chosen
        rows += group[: len(chosen)]
        counts.append(len(chosen))
    committed = with_logprobs(raw[rows], tokens, [row_params[r] for r in rows])
    return committed, counts


def _greedy_run(best: list[int], group: range, draft: list[int]) -> list[int]:
    """The drafts that match the target's argmax, then the argmax where they stop matching."""
    run = []
    for row, guess in zip(group, draft):
        if best[row] != guess:
            break
        run.append(guess)
    return run + [best[group[len(run)]]]


def _sampled_run(probs: dict[int, torch.Tensor], group: range, draft: list[int],
                 generator: torch.Generator) -> list[int]:
    """Accept each draft d with probability p(d); at the first rejection sample from p without d;
    after every draft is accepted sample the row after the last one."""
    run = []
    for row, guess in zip(group, draft):
        p = probs[row]
        if torch.rand((), generator=generator, device=p.device) < p[guess]:
            run.append(guess)
            continue
        residual = p.clone()
        residual[guess] = 0
        return run + [_race(residual, generator)]
    return run + [_race(probs[group[len(run)]], generator)]


def _race(p: torch.Tensor, generator: torch.Generator) -> int:
    return int((p / exponential_noise(p.shape[0], generator, p.device)).argmax())


class MTPSpeculator:
    """Runs a speculating step on the worker: verify with the model, catch up and draft with the MTP
    layer (see the module's docstring). `num_steps`: drafts proposed per request and step."""

    def __init__(self, runner, num_steps: int):
        self.runner, self.num_steps = runner, num_steps

    def step(self, step: StepInput, sequences: dict[str, SequenceSampling]) -> StepOutput:
        logits, hidden = self.runner.forward_hidden(step.items)
        rows = logit_rows(step.items)
        prompt_lp = step_prompt_logprobs(step, logits, rows, sequences)
        done = [i for i, c in enumerate(step.completes) if c]
        seqs = [sequences[step.rids[i]] for i in done]
        groups = [range(rows[i].stop - 1 - step.items[i].num_drafts, rows[i].stop) for i in done]
        drafts = [step.items[i].new_token_ids[len(step.items[i].new_token_ids) - step.items[i].num_drafts:]
                  for i in done]
        committed, counts = verify(logits, groups, drafts, seqs, step.forced)
        out = StepOutput(committed, prompt_lp, num_committed=counts)
        runs = {i: committed.token_ids[r.start:r.stop] for i, r in zip(done, out.committed())}
        for seq, i in zip(seqs, done):
            seq.output_ids += runs[i]
        next_drafts = self._draft(step, hidden, runs, sequences)
        out.drafts = [next_drafts[i] for i in done]
        return out

    def _draft(self, step: StepInput, hidden: torch.Tensor, runs: dict[int, list[int]],
               sequences: dict[str, SequenceSampling]) -> dict[int, list[int]]:
        """Catch the MTP layer's cache up on the positions this step computed and committed (`runs`:
        the tokens each completing item, by index, committed), and draft for the completing items;
        returns their drafts."""
        items, rows, want, start = [], [], {}, 0
        for i, item in enumerate(step.items):
            new = item.new_token_ids
            seq = sequences[step.rids[i]]
            if i in runs:  # its valid positions: all but the rejected drafts
                valid = len(new) - item.num_drafts + len(runs[i]) - 1
                ids = new[1:valid] + [runs[i][-1]]
                want[i] = min(self.num_steps, seq.params.max_new_tokens - len(seq.output_ids) - 1)
            else:  # a prefill chunk: the token after it is the prompt's next
                valid = len(new)
                ids = new[1:] + [seq.token_at(item.prefix_len + valid)]
            rows.extend(range(start, start + valid))
            start += len(new)
            items.append(BatchItem(ids, item.prefix_len, item.pages, "last" if want.get(i, 0) > 0 else "none"))
        # after a decode step the catch-up is a few tokens a sequence: attended as decode attends
        decoding = all(it.prefix_len and len(it.new_token_ids) == 1 + it.num_drafts for it in step.items)
        logits, out = self.runner.draft(items, hidden[rows], per_token=decoding)
        drafting = [i for i in want if want[i] > 0]
        drafts = {i: [] for i in want}
        positions = {i: items[i].prefix_len + len(items[i].new_token_ids) for i in drafting}
        while drafting:
            guesses = logits.argmax(dim=-1).tolist()
            for i, g in zip(drafting, guesses):
                drafts[i].append(g)
            keep = [j for j, i in enumerate(drafting) if len(drafts[i]) < want[i]]
            drafting = [drafting[j] for j in keep]
            if not drafting:
                break
            chain = [BatchItem([drafts[i][-1]], positions[i], step.items[i].pages) for i in drafting]
            for i in drafting:
                positions[i] += 1
            logits, out = self.runner.draft(chain, out[keep])
        return drafts
