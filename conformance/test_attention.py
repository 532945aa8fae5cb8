"""Attention backends: MLA (latent cache) and MHA/GQA, extend and decode, against the float64 reference.

Every case lays the sequences out in a paged cache whose unused pages and slots hold a sentinel
(`harness.PagedLayout`), hands the backend its inputs inside guarded buffers, and checks: the output
(shape, dtype, finite, normalised error), that exactly the new tokens' slots of the cache changed and
hold the new tokens' KV, and that no input, margin or metadata tensor was written.

The 8-bit cache cases (an e4m3 cache with float32 or bfloat16 queries, `--kv-cache-dtype fp8_e4m3`)
run where the device's backend accepts such a spec: the cache holds the context rounded to e4m3, the
new tokens' rows must be stored as the reference's `to_cache` stores them (divided by kv_scale,
rounded to nearest even, bit for bit), and the output is compared with the float64 reference over
the dequantised cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
from dsserve.conformance.attention_common import (
    DECODE_BATCHES,
    EXTEND_BATCHES,
    FP8_CACHE_DTYPE,
    FP8_KV_SCALE,
    FP8_QUERY_DTYPES,
    MHA_SHAPES,
    MLA_SHAPES,
    PAGE_SIZES,
    Batch,
    as_cache_arg,
    create_cache,
    make_spec,
)
from dsserve.conformance.harness import (
    DTYPES,
    HOST,
    ORACLE_DTYPE,
    Case,
    Context,
    Guarded,
    PagedLayout,
    check_meta,
    dtype_name,
    snapshot_meta,
)
from dsserve.core.backends import (
    AttentionSpec,
    MHAAttentionBackend,
    MLAAttentionBackend,
)
from dsserve.core.forward_batch import AttentionMetadata
from dsserve.core.reference import ReferenceMHAAttention, ReferenceMLAAttention, from_cache, to_cache


def _cases():
    for kind, shapes in (("mla", MLA_SHAPES), ("mha", MHA_SHAPES)):
        first, *others = shapes
        for mode, batches in (("extend", EXTEND_BATCHES), ("decode", DECODE_BATCHES)):
            for dtype in DTYPES:
                for page_size in PAGE_SIZES:
                    for batch in batches:
                        yield kind, mode, dtype, page_size, batch, first
                for shape in others:
                    yield kind, mode, dtype, PAGE_SIZES[-1], batches[0], shape


CASES = [pytest.param(*c, id=f"{c[0]}-{c[1]}-page{c[3]}-{c[2]}-{c[4].name}-{c[5]}") for c in _cases()]


def _fp8_cases():
    """(kind, mode, query dtype, batch, shape, kv_scale) of the 8-bit cache cases, on the last page size."""
    for kind, shapes in (("mla", MLA_SHAPES), ("mha", MHA_SHAPES)):
        first, *others = shapes
        for mode, batches in (("extend", EXTEND_BATCHES), ("decode", DECODE_BATCHES)):
            for dtype in FP8_QUERY_DTYPES:
                for batch in batches:
                    yield kind, mode, dtype, batch, first, 1.0
                yield kind, mode, dtype, batches[0], first, FP8_KV_SCALE
                for shape in others:
                    yield kind, mode, dtype, batches[0], shape, 1.0


FP8_PAGE_SIZE = PAGE_SIZES[-1]
FP8_CACHE = dtype_name(FP8_CACHE_DTYPE)
FP8_CASES = [pytest.param(*c, id=f"{c[0]}-{c[1]}-page{FP8_PAGE_SIZE}-{c[2]}-kv{FP8_CACHE}"
                          f"{'' if c[5] == 1.0 else f'-scale{c[5]}'}-{c[3].name}-{c[4]}") for c in _fp8_cases()]

# Bound for the 8-bit cache cases. The oracle attends over exactly what the cache holds, so a kernel
# computing in the queries' dtype stays within that dtype's bound (the reference: 3e-6 in bfloat16);
# this one also admits a kernel that rounds its other operands to e4m3, as fp8 tensor-core kernels do.
# e4m3 keeps 3 mantissa bits: a relative rounding error of up to 2^-4 (3.9e-3 squared, ~1.3e-3 on
# average). Measured on these cases, the reference with its queries rounded to e4m3: up to 8.3e-4;
# with the decode probabilities rounded too: 1.4e-3. What it must catch, measured the same way:
# ignoring kv_scale ~2, reading the bytes as e5m2 0.17 and more, a decode that drops each sequence's
# newest key 1.2e-2 and more.
FP8_CACHE_BOUND = 5e-3


def label_of(kind, mode, page_size, dtype, batch, shape, cache: str = "") -> str:
    """`cache`: "" (the cache in the queries' dtype) or " kv_cache=... [kv_scale=...]"."""
    return f"attention {kind} {mode} page_size={page_size} dtype={dtype}{cache} batch={batch} shape={shape}"


@dataclass
class Inputs:
    """A case's data in float64 on the host, already rounded through the case dtype."""

    context: list[list[torch.Tensor]]  # per cache part, per sequence: [seq_len, ...] rows, as cached
    new_rows: list[torch.Tensor]  # per cache part: [T, ...] the new tokens' cache entries, as given
    tensors: dict[str, torch.Tensor]  # the call's other inputs, in call order
    oracle_tensors: dict[str, torch.Tensor]  # the same with the new rows as the cache holds them


def cached(spec: AttentionSpec, rows: torch.Tensor) -> torch.Tensor:
    """Real rows as the cache holds them, read back in float64 (the identity for a cache in the
    queries' dtype, whose rows are already rounded to it)."""
    return from_cache(to_cache(rows, spec.dtype, spec.kv_scale), ORACLE_DTYPE, spec.kv_scale)


def make_inputs(spec: AttentionSpec, mode: str, layout: PagedLayout, dtype: torch.dtype,
                gen: torch.Generator) -> Inputs:
    """`dtype`: the queries' (and the given new rows'); the cache's is spec.dtype."""
    def rnd(*shape, std=1.0):
        x = torch.randn(*shape, generator=gen, dtype=ORACLE_DTYPE) * std
        return x.to(dtype).to(ORACLE_DTYPE)

    lens = layout.seq_lens
    T = sum(layout.extend_lens)
    H = spec.num_heads
    if spec.kind == "mla":
        rank, rope, nope = spec.kv_lora_rank, spec.qk_rope_head_dim, spec.qk_nope_head_dim
        context = [[rnd(n, rank + rope) for n in lens]]
        if mode == "extend":
            tensors = {"q_nope": rnd(T, H, nope), "q_pe": rnd(T, H, rope)}
            extra = {"w_kc": rnd(H, nope, rank, std=rank ** -0.5), "w_vc": rnd(H, rank, spec.v_head_dim,
                                                                              std=rank ** -0.5)}
        else:
            # the absorbed query q_nope @ w_kc: scores of about the same spread as in extend
            tensors = {"q_latent": rnd(T, H, rank, std=math.sqrt(nope / rank)), "q_pe": rnd(T, H, rope)}
            extra = {}
    else:
        kv, d, dv = spec.num_kv_heads, spec.head_dim, spec.v_head_dim
        context = [[rnd(n, kv, d) for n in lens], [rnd(n, kv, dv) for n in lens]]
        tensors, extra = {"q": rnd(T, H, d)}, {}
    new_rows = [torch.cat([rows[p:] for rows, p in zip(part, layout.prefix_lens)]) for part in context]
    if spec.kind == "mla":
        tensors["latent"] = new_rows[0]
    else:
        tensors["k"], tensors["v"] = new_rows
    tensors.update(extra)
    oracle_tensors = tensors
    if spec.dtype != dtype or spec.kv_scale != 1.0:
        # The cache keeps its own format: the context is what it holds, the new rows reach the backend
        # in the queries' dtype and are rounded by its write, and the oracle attends over the result.
        context = [[cached(spec, rows) for rows in part] for part in context]
        held = [cached(spec, rows) for rows in new_rows]
        names = ["latent"] if spec.kind == "mla" else ["k", "v"]
        oracle_tensors = {**tensors, **dict(zip(names, held))}
    return Inputs(context, new_rows, tensors, oracle_tensors)


def call(backend, spec: AttentionSpec, mode: str, t: dict[str, torch.Tensor], cache, meta):
    backend.prepare(meta)
    if spec.kind == "mla":
        if mode == "extend":
            w_kc, w_vc = backend.process_weights_after_loading(t["w_kc"], t["w_vc"])
            return backend.forward_extend(t["q_nope"], t["q_pe"], t["latent"], cache, meta, w_kc, w_vc)
        return backend.forward_decode(t["q_latent"], t["q_pe"], t["latent"], cache, meta)
    fwd = backend.forward_extend if mode == "extend" else backend.forward_decode
    return fwd(t["q"], t["k"], t["v"], cache, meta)


def out_shape(spec: AttentionSpec, mode: str, tokens: int) -> tuple[int, int, int]:
    if spec.kind == "mla" and mode == "decode":
        return tokens, spec.num_heads, spec.kv_lora_rank
    return tokens, spec.num_heads, spec.v_head_dim


def reference_class(spec: AttentionSpec):
    return ReferenceMLAAttention if spec.kind == "mla" else ReferenceMHAAttention


def fill_cache(layout: PagedLayout, parts: list[torch.Tensor], context: list[list[torch.Tensor]],
               kv_scale: float = 1.0) -> list[torch.Tensor]:
    """The context rows into the cache parts, stored as `to_cache` stores them."""
    flats = [c.view(layout.num_slots, -1) for c in parts]
    for flat, ctx_rows in zip(flats, context):
        layout.fill(flat, [to_cache(r.reshape(r.shape[0], -1), flat.dtype, kv_scale) for r in ctx_rows])
    return flats


def oracle(spec: AttentionSpec, mode: str, layout: PagedLayout, inputs: Inputs) -> torch.Tensor:
    """The reference in float64 on the host, on the same (rounded) data: the cache's contents read back."""
    spec64 = replace(spec, dtype=ORACLE_DTYPE, kv_scale=1.0)
    ref = reference_class(spec)(spec64)
    cache = ref.create_cache(layout.num_pages, HOST)
    parts = list(cache) if isinstance(cache, tuple) else [cache]
    fill_cache(layout, parts, inputs.context)
    return call(ref, spec64, mode, inputs.oracle_tensors, as_cache_arg(spec, parts), layout.meta(HOST))


def check_attention_case(ctx: Context, case: Case, backend, spec: AttentionSpec, mode: str, batch: Batch,
                         dtype: torch.dtype | None = None, bound: float | None = None) -> None:
    """`dtype`: the queries' (default: the cache's, spec.dtype); `bound`: the dtype's by default."""
    dev, dtype = ctx.torch_device, dtype or spec.dtype
    case.note_dtype(dtype)
    if backend.page_size != spec.page_size:
        case.fail(f"page_size is {backend.page_size}, but the spec asks for {spec.page_size}")
        case.done()
    gen = torch.Generator().manual_seed(case.seed)
    layout = PagedLayout(list(batch.prefix), list(batch.extend), spec.page_size, gen)
    inputs = make_inputs(spec, mode, layout, dtype, gen)

    parts = create_cache(case, backend, spec, layout.num_pages, dev)
    flats = fill_cache(layout, parts, inputs.context, spec.kv_scale)
    before = [f.clone() for f in flats]
    meta = layout.meta(dev)
    if mode == "decode":
        assert meta.is_decode, "a decode batch must add one token per sequence"
    meta_before = snapshot_meta(meta)
    guarded = {name: Guarded(name, x, dtype, dev) for name, x in inputs.tensors.items()}
    args = {name: g.tensor for name, g in guarded.items()}
    cache = as_cache_arg(spec, parts)
    what = f"forward_{mode}"

    with case.calling(what):
        out = call(backend, spec, mode, args, cache, meta)
    for g in guarded.values():
        g.check(case)
    check_meta(case, meta, meta_before)
    names = ["latent"] if spec.kind == "mla" else ["K", "V"]
    for name, flat, old, rows in zip(names, flats, before, inputs.new_rows):
        stored = to_cache(rows.reshape(rows.shape[0], -1), flat.dtype, spec.kv_scale)
        layout.check_writes(case, name, flat, old, meta.out_cache_loc, stored)
    if case.check_tensor(what, out, out_shape(spec, mode, layout_tokens(layout)), dtype, dev):
        case.compare("", out, oracle(spec, mode, layout, inputs), dtype, bound)

    # Speed: the same call again (it rewrites the same slots), and the reference in the same dtype on
    # the same device over a copy of the cache.
    ref = reference_class(spec)(spec)
    ref_parts = [p.clone() for p in parts]
    ref_cache = as_cache_arg(spec, ref_parts)
    case.timed(lambda: call(backend, spec, mode, args, cache, meta),
               lambda: call(ref, spec, mode, args, ref_cache, meta), dev)
    case.done()


def layout_tokens(layout: PagedLayout) -> int:
    return sum(layout.extend_lens)


@pytest.mark.parametrize("kind,mode,dtype,page_size,batch,shape", CASES)
def test_attention(ctx, make_case, kind, mode, dtype, page_size, batch, shape):
    case = make_case("attention", label_of(kind, mode, page_size, dtype, batch.name, shape))
    spec = make_spec(kind, shape, DTYPES[dtype], page_size)
    expect = MLAAttentionBackend if kind == "mla" else MHAAttentionBackend
    backend = case.serve(ctx, "attention_backend", expect=expect, spec=spec)
    check_attention_case(ctx, case, backend, spec, mode, batch)


@pytest.mark.parametrize("kind,mode,dtype,batch,shape,kv_scale", FP8_CASES)
def test_attention_fp8_cache(ctx, make_case, kind, mode, dtype, batch, shape, kv_scale):
    scaled = "" if kv_scale == 1.0 else f" kv_scale={kv_scale}"
    case = make_case("attention", label_of(kind, mode, FP8_PAGE_SIZE, dtype, batch.name, shape,
                                           cache=f" kv_cache={FP8_CACHE}{scaled}"))
    spec = make_spec(kind, shape, FP8_CACHE_DTYPE, FP8_PAGE_SIZE, kv_scale)
    expect = MLAAttentionBackend if kind == "mla" else MHAAttentionBackend
    backend = case.serve(ctx, "attention_backend", expect=expect, spec=spec)
    check_attention_case(ctx, case, backend, spec, mode, batch, DTYPES[dtype], FP8_CACHE_BOUND)


@pytest.mark.parametrize("shape", list(MLA_SHAPES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_mla_absorption(ctx, make_case, shape, dtype):
    """The decode path's per-head projections, on the weights as the backend keeps them:
    absorb_query (q_nope @ w_kc) and expand_output (o_latent @ w_vc), against float64 bmm."""
    case = make_case("attention", f"mla absorb/expand shape={shape} dtype={dtype}")
    spec = make_spec("mla", shape, DTYPES[dtype], None)
    backend = case.serve(ctx, "attention_backend", expect=MLAAttentionBackend, spec=spec)
    dev, dt = ctx.torch_device, spec.dtype
    case.note_dtype(dt)
    gen = torch.Generator().manual_seed(case.seed)
    s = MLA_SHAPES[shape]
    tokens, H, nope, rank, v = 5, s["num_heads"], s["nope"], s["rank"], s["v"]

    def rnd(*shape_, std=1.0):
        return (torch.randn(*shape_, generator=gen, dtype=ORACLE_DTYPE) * std).to(dt).to(ORACLE_DTYPE)

    w_kc, w_vc = rnd(H, nope, rank, std=nope ** -0.5), rnd(H, rank, v, std=rank ** -0.5)
    q_nope, o_latent = rnd(tokens, H, nope), rnd(tokens, H, rank)
    with case.calling("process_weights_after_loading"):
        kept_kc, kept_vc = backend.process_weights_after_loading(w_kc.to(dev, dt), w_vc.to(dev, dt))
    for what, fn, x, w, want_dim in (("absorb_query", backend.absorb_query, q_nope, kept_kc, rank),
                                     ("expand_output", backend.expand_output, o_latent, kept_vc, v)):
        with case.calling(what):
            out = fn(x.to(dev, dt), w)
        if case.check_tensor(what, out, (tokens, H, want_dim), dt, dev):
            full = w_kc if what == "absorb_query" else w_vc
            case.compare(what, out, torch.bmm(x.transpose(0, 1), full).transpose(0, 1), dt)
    case.done()


# One sequence long enough for several KV chunks of any split, alone and beside sequences of other
# lengths (shorter, longer, one token).
INVARIANT_CONTEXT = 700
INVARIANT_OTHERS = (37, 1, 2000, 260, 5, 999, 64, 130, 1500, 17, 300, 3, 80, 700, 420)


@pytest.mark.parametrize("kind", ["mla", "mha"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_batch_invariant_decode(ctx, make_case, kind, dtype):
    """spec.batch_invariant (--enable-deterministic-inference): a sequence's decode output is the same
    bits alone and in a batch of 16, whatever the other sequences' lengths."""
    case = make_case("attention", f"attention {kind} decode batch-invariant dtype={dtype}")
    shape = next(iter(MLA_SHAPES if kind == "mla" else MHA_SHAPES))
    spec = replace(make_spec(kind, shape, DTYPES[dtype], PAGE_SIZES[1]), batch_invariant=True)
    expect = MLAAttentionBackend if kind == "mla" else MHAAttentionBackend
    backend = case.serve(ctx, "attention_backend", expect=expect, spec=spec)
    dev = ctx.torch_device
    case.note_dtype(spec.dtype)
    gen = torch.Generator().manual_seed(case.seed)
    prefix = (INVARIANT_CONTEXT,) + INVARIANT_OTHERS
    layout = PagedLayout(list(prefix), [1] * len(prefix), spec.page_size, gen)
    inputs = make_inputs(spec, "decode", layout, spec.dtype, gen)
    parts = create_cache(case, backend, spec, layout.num_pages, dev)
    fill_cache(layout, parts, inputs.context)
    batched = {name: x.to(dev, spec.dtype) for name, x in inputs.tensors.items()}
    alone = {name: x[:1] for name, x in batched.items()}
    alone_meta = AttentionMetadata.build(prefix_lens=[INVARIANT_CONTEXT], extend_lens=[1],
                                         page_table=layout.table[:1], page_size=spec.page_size, device=dev)
    with case.calling("forward_decode"):
        out_alone = call(backend, spec, "decode", alone, as_cache_arg(spec, parts), alone_meta)
        out_batched = call(backend, spec, "decode", batched, as_cache_arg(spec, parts), layout.meta(dev))
    if not torch.equal(out_alone[0], out_batched[0]):
        diff = (out_alone[0].double() - out_batched[0].double()).abs().max().item()
        case.fail(f"the sequence's output differs alone and in a batch of {len(prefix)} (max |diff| {diff:.3g})")
    case.done()
