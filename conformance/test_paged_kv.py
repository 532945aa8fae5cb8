"""Paged-KV consistency through the device's own attention backend: sequences prefilled in chunks,
then decoded token by token over the cache those passes wrote, must give what one pass over the
whole sequences gives (the recomputation), and leave the same cache behind.

Schedule (four sequences, as the engine runs them): a first extend pass prefills all of two prompts
and the first chunk of the two others; a second, mixed pass adds one token to the finished prompts
and the remaining chunks of the others (with their cached prefixes); then `DECODE_STEPS` decode
passes. The recomputation is a single extend pass over all tokens in a fresh cache.
"""
from __future__ import annotations

import pytest
import torch
from dsserve.conformance.attention_common import (
    PAGE_SIZES,
    as_cache_arg,
    create_cache,
    make_spec,
)
from dsserve.conformance.harness import (
    DTYPES,
    HOST,
    ORACLE_DTYPE,
    SENTINEL,
    Case,
    Context,
    PagedLayout,
    changed_elements,
)
from dsserve.core.backends import (
    AttentionSpec,
    MHAAttentionBackend,
    MLAAttentionBackend,
)
from dsserve.core.forward_batch import AttentionMetadata

PROMPTS = (3, 16, 29, 66)
FIRST_CHUNK = (3, 8, 29, 40)  # prompts 0 and 2 complete in the first pass
DECODE_STEPS = 4
SHAPES = {"mla": "small", "mha": "gqa"}


def schedule() -> list[tuple[list[int], list[int]]]:
    """(prefix_lens, extend_lens) of every pass."""
    passes = [([0] * 4, list(FIRST_CHUNK))]
    second = [1 if c == p else p - c for c, p in zip(FIRST_CHUNK, PROMPTS)]
    passes.append((list(FIRST_CHUNK), second))
    done = [c + s for c, s in zip(FIRST_CHUNK, second)]
    for _ in range(DECODE_STEPS):
        passes.append((list(done), [1] * 4))
        done = [d + 1 for d in done]
    return passes


TOTALS = [p + e for p, e in zip(*schedule()[-1])]


def _cases():
    for kind in SHAPES:
        for dtype in DTYPES:
            for page_size in PAGE_SIZES:
                yield pytest.param(kind, dtype, page_size, id=f"{kind}-page{page_size}-{dtype}")


class Sequences:
    """Every token's inputs, float64 rounded through the dtype, per sequence."""

    def __init__(self, spec: AttentionSpec, dtype: torch.dtype, gen: torch.Generator):
        def rnd(*shape, std=1.0):
            return (torch.randn(*shape, generator=gen, dtype=ORACLE_DTYPE) * std).to(dtype).to(ORACLE_DTYPE)

        self.spec, self.dtype = spec, dtype
        H = spec.num_heads
        if spec.kind == "mla":
            rank, rope, nope = spec.kv_lora_rank, spec.qk_rope_head_dim, spec.qk_nope_head_dim
            self.latent = [rnd(n, rank + rope) for n in TOTALS]
            self.q_nope = [rnd(n, H, nope) for n in TOTALS]
            self.q_pe = [rnd(n, H, rope) for n in TOTALS]
            self.w_kc = rnd(H, nope, rank, std=rank ** -0.5)
            self.w_vc = rnd(H, rank, spec.v_head_dim, std=rank ** -0.5)
            # what the model hands decode: q_nope absorbed by w_kc, rounded once to the dtype
            self.q_latent = [torch.einsum("thn,hnr->thr", q, self.w_kc).to(dtype).to(ORACLE_DTYPE)
                             for q in self.q_nope]
        else:
            kv, d, dv = spec.num_kv_heads, spec.head_dim, spec.v_head_dim
            self.q = [rnd(n, H, d) for n in TOTALS]
            self.k = [rnd(n, kv, d) for n in TOTALS]
            self.v = [rnd(n, kv, dv) for n in TOTALS]

    def run(self, backend, cache, prefix: list[int], extend: list[int], table: torch.Tensor,
            dev: torch.device) -> list[torch.Tensor]:
        """One pass; per sequence, its new tokens' outputs [n, H, v_head_dim] in float64 on the host."""
        s, dt = self.spec, self.dtype
        meta = AttentionMetadata.build(prefix_lens=prefix, extend_lens=extend, page_table=table,
                                       page_size=s.page_size, device=dev)

        def take(rows):
            return torch.cat([r[p:p + e] for r, p, e in zip(rows, prefix, extend)]).to(dev, dt)

        backend.prepare(meta)
        if s.kind == "mla":
            latent = take(self.latent)
            if meta.is_decode:
                out = backend.forward_decode(take(self.q_latent), take(self.q_pe), latent, cache, meta)
                out = torch.einsum("thr,hrv->thv", out.to(HOST, ORACLE_DTYPE), self.w_vc)
            else:
                w_kc, w_vc = backend.process_weights_after_loading(self.w_kc.to(dev, dt), self.w_vc.to(dev, dt))
                out = backend.forward_extend(take(self.q_nope), take(self.q_pe), latent, cache, meta, w_kc, w_vc)
        else:
            fwd = backend.forward_decode if meta.is_decode else backend.forward_extend
            out = fwd(take(self.q), take(self.k), take(self.v), cache, meta)
        out = out.to(HOST, ORACLE_DTYPE)
        return list(out.split(extend))


@pytest.mark.parametrize("kind,dtype,page_size", list(_cases()))
def test_decode_after_prefill_equals_recompute(ctx: Context, make_case, kind, dtype, page_size):
    dt = DTYPES[dtype]
    case = make_case("paged-kv", f"paged-kv {kind} chunked prefill + {DECODE_STEPS} decode steps vs recompute "
                                 f"page_size={page_size} dtype={dtype} shape={SHAPES[kind]}")
    case.note_dtype(dt)
    spec = make_spec(kind, SHAPES[kind], dt, page_size)
    expect = MLAAttentionBackend if kind == "mla" else MHAAttentionBackend
    backend = case.serve(ctx, "attention_backend", expect=expect, spec=spec)
    check_consistency(ctx, case, backend, spec)


def check_consistency(ctx: Context, case: Case, backend, spec: AttentionSpec) -> None:
    dev = ctx.torch_device
    gen = torch.Generator().manual_seed(case.seed)
    layout = PagedLayout([0] * len(TOTALS), TOTALS, spec.page_size, gen)
    seqs = Sequences(spec, spec.dtype, gen)

    stepwise = create_cache(case, backend, spec, layout.num_pages, dev)
    for part in stepwise:
        part.fill_(SENTINEL)
    outputs: list[list[torch.Tensor]] = [[] for _ in TOTALS]
    with case.calling("the chunked prefill and decode passes"):
        for prefix, extend in schedule():
            for i, out in enumerate(seqs.run(backend, as_cache_arg(spec, stepwise), prefix, extend, layout.table, dev)):
                outputs[i].append(out)

    whole = create_cache(case, backend, spec, layout.num_pages, dev)
    for part in whole:
        part.fill_(SENTINEL)
    with case.calling("the recomputation (one extend pass)"):
        recompute = seqs.run(backend, as_cache_arg(spec, whole), [0] * len(TOTALS), TOTALS, layout.table, dev)

    got = torch.cat([torch.cat(o) for o in outputs])
    want = torch.cat(recompute)
    if not bool(torch.isfinite(got).all()):
        case.fail("the passes returned NaN/inf")
    case.compare("outputs of the stepwise passes against one pass over the whole sequences", got, want, spec.dtype)
    for name, a, b in zip(["latent"] if spec.kind == "mla" else ["K", "V"], stepwise, whole):
        differ = changed_elements(a, b).reshape(layout.num_slots, -1).any(dim=1).nonzero().flatten().tolist()
        if differ:
            case.fail(f"the {name} cache after the stepwise passes differs from the recomputation's at "
                      f"{len(differ)} slots (first: {layout.describe_slot(differ[0])})")
    case.done()
