"""The shared Triton kernels (dsserve.plugins.triton_kernels) against the core's torch references.

Everything runs in Triton's interpreter (TRITON_INTERPRET=1, set below before triton is imported)
on CPU tensors, in float32 and float16, on small random shapes: paged MLA decode (split-K, more
splits than pages for short sequences), MLA extend with a cached prefix, paged MHA/GQA decode and
extend, fused MoE (float and FP8 block-scaled experts), and the FP8 block GEMM (e4m3fn, and
e4m3fnuz as the rocm plugin uses it).
Outputs and caches live inside larger sentinel-filled buffers, and every byte outside what a kernel
may write is checked unchanged; cache slots the kernels must not read hold NaN.

Also here, because they concern the same code: the cuda and rocm plugins' hooks answer None for
other devices, pick the Triton backends on their own, and the e4m3fn -> e4m3fnuz weight conversion
preserves every dequantised value. None of this needs a GPU.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

triton = pytest.importorskip("triton")

from dsserve.core.backends import AttentionSpec, LinearSpec, MoESpec
from dsserve.core.forward_batch import AttentionMetadata
from dsserve.core.reference import (
    ReferenceQuantizedLinear,
    ReferenceMHAAttention,
    ReferenceMLAAttention,
    ReferenceMoE,
)
from dsserve.plugins.triton_kernels import (
    Fp8BlockLinear,
    TritonMHAAttention,
    TritonMLAAttention,
    TritonMoE,
    fp8_block_gemm,
    fused_moe,
    mha_decode_attention,
    mha_extend_attention,
    mla_decode_attention,
    moe_align,
)

pytestmark = pytest.mark.triton

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these tests run the kernels in Triton's interpreter (TRITON_INTERPRET=1)", allow_module_level=True)


def _interpreted() -> bool:
    # triton decides at decoration time: kernels imported before TRITON_INTERPRET=1 was set compile
    # for a GPU instead (then set TRITON_INTERPRET=1 for the whole run, e.g. in the environment).
    from dsserve.plugins.triton_kernels.paged_attention import _paged_attn_fwd
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_paged_attn_fwd, InterpretedFunction)


if not _interpreted():
    pytest.skip("the Triton kernels were imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

BOUND = {torch.float32: 1e-8, torch.float16: 1e-5}
DTYPES = [torch.float32, torch.float16]
PAGE_SIZES = [1, 16]
OUT_SENTINEL = 1234.5
GUARD = 2  # sentinel rows before and after an output, sentinel columns after it


def _id(v):
    return str(v).replace("torch.", "")


def nerr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref||^2 / ||ref||^2 in float64."""
    assert torch.isfinite(out).all(), "non-finite output"
    diff = out.double() - ref.double()
    return (diff.norm() ** 2 / ref.double().norm() ** 2).item()


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of t, so NaN sentinels compare equal to themselves."""
    return t.contiguous().view(torch.uint8)


# ----------------------------------------------------------------------------------------- guards


def guarded(shape, dtype):
    """(buffer, view): `view` has `shape` and sits inside a sentinel-filled `buffer` with GUARD rows
    before and after it (dim 0) and GUARD extra columns (last dim)."""
    big = torch.full((shape[0] + 2 * GUARD, *shape[1:-1], shape[-1] + GUARD), OUT_SENTINEL, dtype=dtype)
    view = big[GUARD:GUARD + shape[0], ..., :shape[-1]]
    return big, view


def assert_guard_intact(big: torch.Tensor, shape) -> None:
    outside = torch.ones(big.shape, dtype=torch.bool)
    outside[GUARD:GUARD + shape[0], ..., :shape[-1]] = False
    assert (big[outside] == OUT_SENTINEL).all(), "a kernel wrote outside its output"


# ----------------------------------------------------------------------------------- paged layout


class Layout:
    """A shuffled page table over a cache whose page 0 and spare pages belong to nobody.

    Page 0 holds a finite sentinel (the reference reads slot 0 for padding, weighted by zero);
    the spare pages, the new tokens' slots and each last page's unused tail hold NaN, so a kernel
    that reads a slot it must not (or reads a new token before writing it) produces NaN.
    """

    def __init__(self, prefix_lens, extend_lens, page_size, gen, spare_pages=3):
        self.page_size = page_size
        seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
        need = [-(-n // page_size) for n in seq_lens]
        self.num_pages = 1 + sum(need) + spare_pages
        perm = (torch.randperm(self.num_pages - 1, generator=gen) + 1).to(torch.int32)
        table = torch.zeros(len(seq_lens), max(need) + 2, dtype=torch.int32)
        used = 0
        for i, n in enumerate(need):
            table[i, :n] = perm[used:used + n]
            used += n
        self.meta = AttentionMetadata.build(prefix_lens=prefix_lens, extend_lens=extend_lens, page_table=table,
                                            page_size=page_size, device="cpu")

    def fill(self, cache: torch.Tensor, gen) -> None:
        """cache [num_pages, page_size, ...]: random prefixes, NaN elsewhere, sentinel page 0."""
        flat = cache.view(self.num_pages * self.page_size, -1)
        flat.fill_(float("nan"))
        flat[:self.page_size] = OUT_SENTINEL
        for i, p in enumerate(self.meta.prefix_lens_cpu):
            if p:
                slots = self.meta.cache_slots(i)[:p]
                flat[slots] = torch.randn(p, flat.shape[1], generator=gen).to(flat.dtype)

    def check_writes(self, after: torch.Tensor, before: torch.Tensor, new_rows: torch.Tensor) -> None:
        """The new rows landed at out_cache_loc; every other byte is unchanged."""
        flat_a = after.view(self.num_pages * self.page_size, -1)
        flat_b = before.view(self.num_pages * self.page_size, -1)
        loc = self.meta.out_cache_loc
        assert torch.equal(bits(flat_a[loc]), bits(new_rows.reshape(len(loc), -1).to(flat_a.dtype)))
        keep = torch.ones(flat_a.shape[0], dtype=torch.bool)
        keep[loc] = False
        assert torch.equal(bits(flat_a[keep]), bits(flat_b[keep])), "a kernel wrote outside the new slots"


def randn(gen, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


# ------------------------------------------------------------------------------------------ MLA

RANK, ROPE, NOPE, V_DIM = 32, 16, 24, 20


def mla_spec(dtype, page_size, heads=4, cache_dtype=None):
    return AttentionSpec(kind="mla", num_heads=heads, num_kv_heads=1, head_dim=NOPE + ROPE, v_head_dim=V_DIM,
                         scale=(NOPE + ROPE) ** -0.5, dtype=cache_dtype or dtype, page_size=page_size,
                         kv_lora_rank=RANK, qk_rope_head_dim=ROPE)


# Ragged decode batch: one sequence that is only its new token, two shorter than 5 splits, a long one.
DECODE_PREFIX = [0, 2, 36, 19]


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("splits", [1, 5])
def test_mla_decode(dtype, page_size, splits):
    gen = torch.Generator().manual_seed(10 + page_size + splits)
    heads = 4
    lay = Layout(DECODE_PREFIX, [1] * len(DECODE_PREFIX), page_size, gen)
    batch = len(DECODE_PREFIX)
    spec = mla_spec(dtype, page_size, heads)
    cache = torch.empty(lay.num_pages, page_size, RANK + ROPE, dtype=dtype)
    lay.fill(cache, gen)
    q_lat, q_pe = randn(gen, batch, heads, RANK, dtype=dtype), randn(gen, batch, heads, ROPE, dtype=dtype)
    latent = randn(gen, batch, RANK + ROPE, dtype=dtype)

    ref_cache = cache.clone()
    ref = ReferenceMLAAttention(spec).forward_decode(q_lat, q_pe, latent, ref_cache, lay.meta)
    backend = TritonMLAAttention(spec)
    backend.decode_splits = splits
    before = cache.clone()
    out = backend.forward_decode(q_lat, q_pe, latent, cache, lay.meta)
    assert out.dtype == dtype and out.shape == (batch, heads, RANK)
    assert nerr(out, ref) < BOUND[dtype]
    lay.check_writes(cache, before, latent)

    # The kernel entry point writes nothing outside a strided output view.
    big, view = guarded((batch, heads, RANK), dtype)
    mla_decode_attention(q_lat, q_pe, cache, lay.meta.page_table, lay.meta.seq_lens, spec.scale,
                         num_splits=splits, out=view)
    assert nerr(view, ref) < BOUND[dtype]
    assert_guard_intact(big, (batch, heads, RANK))
    assert torch.equal(bits(cache), bits(ref_cache)), "decode attention wrote into the cache"


def test_mla_decode_many_heads_and_splits():
    """More query heads than one program takes (two head blocks) and many splits."""
    gen = torch.Generator().manual_seed(3)
    heads, page_size, dtype = 24, 16, torch.float32
    lay = Layout([40, 7], [1, 1], page_size, gen)
    spec = mla_spec(dtype, page_size, heads)
    cache = torch.empty(lay.num_pages, page_size, RANK + ROPE, dtype=dtype)
    lay.fill(cache, gen)
    q_lat, q_pe = randn(gen, 2, heads, RANK, dtype=dtype), randn(gen, 2, heads, ROPE, dtype=dtype)
    latent = randn(gen, 2, RANK + ROPE, dtype=dtype)
    ref = ReferenceMLAAttention(spec).forward_decode(q_lat, q_pe, latent, cache.clone(), lay.meta)
    backend = TritonMLAAttention(spec)
    backend.decode_splits = 9
    assert nerr(backend.forward_decode(q_lat, q_pe, latent, cache, lay.meta), ref) < BOUND[dtype]


def test_mla_decode_fp8_cache():
    """An e4m3 latent cache (--kv-cache-dtype fp8) with float32 queries: the kernel upcasts tiles."""
    gen = torch.Generator().manual_seed(4)
    fp8, page_size = torch.float8_e4m3fn, 16
    lay = Layout([9, 30], [1, 1], page_size, gen)
    spec = mla_spec(torch.float32, page_size, cache_dtype=fp8)
    cache32 = torch.empty(lay.num_pages, page_size, RANK + ROPE)
    lay.fill(cache32, gen)
    cache = cache32.to(fp8)
    q_lat, q_pe = randn(gen, 2, 4, RANK, dtype=torch.float32), randn(gen, 2, 4, ROPE, dtype=torch.float32)
    latent = randn(gen, 2, RANK + ROPE, dtype=torch.float32)
    ref_cache = cache.clone()
    raw = ref_cache.view(-1, RANK + ROPE).view(torch.uint8)  # index_copy_ has no float8 kernel on CPU
    raw[lay.meta.out_cache_loc] = latent.to(fp8).view(torch.uint8)
    ref_spec = mla_spec(torch.float32, page_size)
    ref = ReferenceMLAAttention(ref_spec).forward_decode(q_lat, q_pe, latent.to(fp8).float(),
                                                         ref_cache.float(), lay.meta)
    backend = TritonMLAAttention(spec)
    backend.decode_splits = 3
    before = cache.clone()
    out = backend.forward_decode(q_lat, q_pe, latent, cache, lay.meta)
    assert out.dtype == torch.float32 and nerr(out, ref) < BOUND[torch.float32]
    lay.check_writes(cache, before, latent.to(fp8))


@pytest.mark.parametrize("mode", ["decode", "extend"])
def test_mla_fp8_cache_with_kv_scale(mode):
    """A per-tensor kv_scale (cached = real / kv_scale): the writes store what the reference's
    `to_cache` stores, and decode and the absorbed extend apply the scale as the reference does."""
    from dsserve.core.reference import to_cache

    gen = torch.Generator().manual_seed(5)
    fp8, page_size, kv_scale, heads = torch.float8_e4m3fn, 16, 0.5, 4
    extend = [1, 1] if mode == "decode" else [6, 3]
    lay = Layout([9, 30], extend, page_size, gen)
    spec = mla_spec(torch.float32, page_size, heads, cache_dtype=fp8)
    spec = AttentionSpec(**{**spec.__dict__, "kv_scale": kv_scale})
    cache32 = torch.empty(lay.num_pages, page_size, RANK + ROPE)
    lay.fill(cache32, gen)
    cache = to_cache(cache32, fp8, kv_scale)
    tokens = sum(extend)
    q_pe, latent = randn(gen, tokens, heads, ROPE, dtype=torch.float32), randn(gen, tokens, RANK + ROPE,
                                                                               dtype=torch.float32)
    reference, backend = ReferenceMLAAttention(spec), TritonMLAAttention(spec)
    before = cache.clone()
    if mode == "decode":
        q_lat = randn(gen, tokens, heads, RANK, dtype=torch.float32)
        ref = reference.forward_decode(q_lat, q_pe, latent, cache.clone(), lay.meta)
        out = backend.forward_decode(q_lat, q_pe, latent, cache, lay.meta)
    else:
        q_nope = randn(gen, tokens, heads, NOPE, dtype=torch.float32)
        w_kc = randn(gen, heads, NOPE, RANK, dtype=torch.float32, scale=RANK ** -0.5)
        w_vc = randn(gen, heads, RANK, V_DIM, dtype=torch.float32, scale=RANK ** -0.5)
        ref = reference.forward_extend(q_nope, q_pe, latent, cache.clone(), lay.meta, w_kc, w_vc)
        out = backend.forward_extend(q_nope, q_pe, latent, cache, lay.meta, w_kc, w_vc)  # the absorbed path
    assert nerr(out, ref) < BOUND[torch.float32]
    lay.check_writes(cache, before, to_cache(latent, fp8, kv_scale))
    # ignoring the scale would be far off: the stored latent is twice the real one
    unscaled = AttentionSpec(**{**spec.__dict__, "kv_scale": 1.0})
    if mode == "decode":
        wrong = ReferenceMLAAttention(unscaled).forward_decode(q_lat, q_pe, latent, before.clone(), lay.meta)
        assert nerr(wrong, ref) > 1e-2


def test_attention_backends_without_fp8_kernels_decline_fp8_caches():
    """What the cuda/rocm hooks consult: the MHA kernels and FlashMLA read no 8-bit cache and apply no
    kv_scale, so such specs go to the reference; the MLA kernels read e4m3/e5m2 with any kv_scale."""
    from dsserve.plugins.cuda import flashmla

    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        assert "dtype" in TritonMHAAttention.unsupported(mha_spec(fp8, 16, 4, 2))
        mla = AttentionSpec(kind="mla", num_heads=16, num_kv_heads=1, head_dim=192, v_head_dim=128, scale=0.1,
                            dtype=fp8, page_size=64, kv_lora_rank=512, qk_rope_head_dim=64)
        assert "cache dtype" in flashmla.unsupported(mla)
        assert TritonMLAAttention.unsupported(AttentionSpec(**{**mla.__dict__, "kv_scale": 0.25})) is None
    scaled = AttentionSpec(**{**mha_spec(torch.bfloat16, 16, 4, 2).__dict__, "kv_scale": 2.0})
    assert "kv_scale" in TritonMHAAttention.unsupported(scaled)
    mla16 = AttentionSpec(kind="mla", num_heads=16, num_kv_heads=1, head_dim=192, v_head_dim=128, scale=0.1,
                          dtype=torch.bfloat16, page_size=64, kv_lora_rank=512, qk_rope_head_dim=64, kv_scale=2.0)
    assert "kv_scale" in flashmla.unsupported(mla16)


# Ragged extend batch: a fresh prompt, a prefix-cached chunk crossing page boundaries, a one-token
# extend on a prefix, and a chunk exactly one page long on a one-page prefix.
EXTEND_PREFIX = [0, 21, 5, 16]
EXTEND_LENS = [9, 4, 1, 16]


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_mla_extend(dtype, page_size):
    gen = torch.Generator().manual_seed(20 + page_size)
    heads = 4
    lay = Layout(EXTEND_PREFIX, EXTEND_LENS, page_size, gen)
    tokens = sum(EXTEND_LENS)
    spec = mla_spec(dtype, page_size, heads)
    cache = torch.empty(lay.num_pages, page_size, RANK + ROPE, dtype=dtype)
    lay.fill(cache, gen)
    q_nope, q_pe = randn(gen, tokens, heads, NOPE, dtype=dtype), randn(gen, tokens, heads, ROPE, dtype=dtype)
    latent = randn(gen, tokens, RANK + ROPE, dtype=dtype)
    w_kc = randn(gen, heads, NOPE, RANK, dtype=dtype, scale=RANK ** -0.5)
    w_vc = randn(gen, heads, RANK, V_DIM, dtype=dtype, scale=RANK ** -0.5)

    ref = ReferenceMLAAttention(spec).forward_extend(q_nope, q_pe, latent, cache.clone(), lay.meta, w_kc, w_vc)
    backend = TritonMLAAttention(spec)
    before = cache.clone()
    out = backend.forward_extend(q_nope, q_pe, latent, cache, lay.meta, w_kc, w_vc)  # absorbed Triton path
    assert out.dtype == dtype and out.shape == (tokens, heads, V_DIM)
    assert nerr(out, ref) < BOUND[dtype]
    lay.check_writes(cache, before, latent)
    if page_size == 16:  # the long-extend path: the reference's expanded SDPA, without upcasting
        backend.absorb_extend_max_tokens = 8
        out = backend.forward_extend(q_nope, q_pe, latent, before.clone(), lay.meta, w_kc, w_vc)
        assert nerr(out, ref) < BOUND[dtype]


# ------------------------------------------------------------------------------------------ MHA

HEAD_DIM, V_HEAD_DIM = 16, 8
GQA = [(4, 4), (6, 2), (8, 1)]  # (query heads, KV heads): MHA, a non-power-of-two group, MQA


def mha_spec(dtype, page_size, heads, kv_heads):
    return AttentionSpec(kind="mha", num_heads=heads, num_kv_heads=kv_heads, head_dim=HEAD_DIM,
                         v_head_dim=V_HEAD_DIM, scale=HEAD_DIM ** -0.5, dtype=dtype, page_size=page_size)


def mha_case(dtype, page_size, heads, kv_heads, prefix, extend, seed):
    gen = torch.Generator().manual_seed(seed)
    lay = Layout(prefix, extend, page_size, gen)
    tokens = sum(extend)
    k_cache = torch.empty(lay.num_pages, page_size, kv_heads, HEAD_DIM, dtype=dtype)
    v_cache = torch.empty(lay.num_pages, page_size, kv_heads, V_HEAD_DIM, dtype=dtype)
    lay.fill(k_cache, gen)
    lay.fill(v_cache, gen)
    q = randn(gen, tokens, heads, HEAD_DIM, dtype=dtype)
    k = randn(gen, tokens, kv_heads, HEAD_DIM, dtype=dtype)
    v = randn(gen, tokens, kv_heads, V_HEAD_DIM, dtype=dtype)
    return lay, (k_cache, v_cache), q, k, v


@pytest.mark.parametrize("heads,kv_heads", GQA)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_mha_decode(dtype, page_size, heads, kv_heads):
    spec = mha_spec(dtype, page_size, heads, kv_heads)
    batch = len(DECODE_PREFIX)
    lay, cache, q, k, v = mha_case(dtype, page_size, heads, kv_heads, DECODE_PREFIX, [1] * batch, 30 + heads)
    ref_cache = tuple(c.clone() for c in cache)
    ref = ReferenceMHAAttention(spec).forward_decode(q, k, v, ref_cache, lay.meta)
    before = tuple(c.clone() for c in cache)
    backend = TritonMHAAttention(spec)
    for splits in (1, 5):
        backend.decode_splits = splits
        cache = tuple(c.clone() for c in before)
        out = backend.forward_decode(q, k, v, cache, lay.meta)
        assert out.dtype == dtype and out.shape == (batch, heads, V_HEAD_DIM)
        assert nerr(out, ref) < BOUND[dtype], splits
        lay.check_writes(cache[0], before[0], k)
        lay.check_writes(cache[1], before[1], v)
    big, view = guarded((batch, heads, V_HEAD_DIM), dtype)
    mha_decode_attention(q, cache[0], cache[1], lay.meta.page_table, lay.meta.seq_lens, spec.scale,
                         num_splits=3, out=view)
    assert nerr(view, ref) < BOUND[dtype]
    assert_guard_intact(big, (batch, heads, V_HEAD_DIM))


@pytest.mark.parametrize("heads,kv_heads", GQA)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_mha_extend(dtype, page_size, heads, kv_heads):
    spec = mha_spec(dtype, page_size, heads, kv_heads)
    lay, cache, q, k, v = mha_case(dtype, page_size, heads, kv_heads, EXTEND_PREFIX, EXTEND_LENS, 40 + heads)
    ref = ReferenceMHAAttention(spec).forward_extend(q, k, v, tuple(c.clone() for c in cache), lay.meta)
    before = tuple(c.clone() for c in cache)
    out = TritonMHAAttention(spec).forward_extend(q, k, v, cache, lay.meta)
    assert out.dtype == dtype and out.shape == (q.shape[0], heads, V_HEAD_DIM)
    assert nerr(out, ref) < BOUND[dtype]
    lay.check_writes(cache[0], before[0], k)
    lay.check_writes(cache[1], before[1], v)
    if page_size == 16:
        big, view = guarded(tuple(out.shape), dtype)
        meta = lay.meta
        mha_extend_attention(q, cache[0], cache[1], meta.page_table, meta.seq_lens, meta.extend_lens,
                             meta.extend_start, max(meta.extend_lens_cpu), spec.scale, out=view)
        assert nerr(view, ref) < BOUND[dtype]
        assert_guard_intact(big, tuple(out.shape))


def test_mha_extend_long_prompt_spans_query_blocks():
    """A prompt longer than one program's query block, on a prefix, float32."""
    spec = mha_spec(torch.float32, 16, 2, 1)
    lay, cache, q, k, v = mha_case(torch.float32, 16, 2, 1, [13, 0], [45, 3], 5)
    ref = ReferenceMHAAttention(spec).forward_extend(q, k, v, tuple(c.clone() for c in cache), lay.meta)
    out = TritonMHAAttention(spec).forward_extend(q, k, v, cache, lay.meta)
    assert nerr(out, ref) < BOUND[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_mha_head_sizes_padded_to_powers_of_two(dtype):
    """Head sizes 24 (keys) and 12 (values) run in 32- and 16-wide tiles, masked."""
    gen = torch.Generator().manual_seed(6)
    heads, kv_heads, dim, dim_v, page_size = 4, 2, 24, 12, 16
    spec = AttentionSpec(kind="mha", num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, v_head_dim=dim_v,
                         scale=dim ** -0.5, dtype=dtype, page_size=page_size)
    for prefix, extend in (([7, 0], [5, 11]), ([7, 30], [1, 1])):
        lay = Layout(prefix, extend, page_size, gen)
        cache = (torch.empty(lay.num_pages, page_size, kv_heads, dim, dtype=dtype),
                 torch.empty(lay.num_pages, page_size, kv_heads, dim_v, dtype=dtype))
        lay.fill(cache[0], gen)
        lay.fill(cache[1], gen)
        t = sum(extend)
        q, k = randn(gen, t, heads, dim, dtype=dtype), randn(gen, t, kv_heads, dim, dtype=dtype)
        v = randn(gen, t, kv_heads, dim_v, dtype=dtype)
        ref_backend, backend = ReferenceMHAAttention(spec), TritonMHAAttention(spec)
        backend.decode_splits = 2
        run = "forward_decode" if lay.meta.is_decode else "forward_extend"
        ref = getattr(ref_backend, run)(q, k, v, tuple(c.clone() for c in cache), lay.meta)
        out = getattr(backend, run)(q, k, v, cache, lay.meta)
        assert nerr(out, ref) < BOUND[dtype], run


# ------------------------------------------------------------------------------------------ MoE


def moe_spec(dtype, experts, top_k, hidden, inter):
    return MoESpec(num_experts=experts, top_k=top_k, hidden_size=hidden, intermediate_size=inter,
                   scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True,
                   routed_scaling_factor=2.5, dtype=dtype)


@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter", [(13, 8, 3, 48, 40), (1, 8, 2, 32, 24)])
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_fused_moe(dtype, tokens, experts, top_k, hidden, inter):
    gen = torch.Generator().manual_seed(tokens + hidden)
    spec = moe_spec(dtype, experts, top_k, hidden, inter)
    x = randn(gen, tokens, hidden, dtype=dtype)
    w13 = randn(gen, experts, 2 * inter, hidden, dtype=dtype, scale=hidden ** -0.5)
    w2 = randn(gen, experts, hidden, inter, dtype=dtype, scale=inter ** -0.5)
    logits = torch.randn(tokens, experts, generator=gen)
    bias = torch.randn(experts, generator=gen) * 0.1
    backend = TritonMoE(spec)
    weights, ids = backend.select_experts(logits, bias)
    ref_weights, ref_ids = ReferenceMoE(spec).select_experts(logits, bias)
    assert torch.equal(ids, ref_ids) and torch.equal(weights, ref_weights)
    ref = ReferenceMoE(spec).compute_experts(x, weights, ids, w13, w2)
    out = backend.compute_experts(x, weights, ids, w13, w2)
    assert out.dtype == dtype and out.shape == (tokens, hidden)
    assert nerr(out, ref) < BOUND[dtype]
    big, view = guarded((tokens, hidden), dtype)
    fused_moe(x, w13, w2, weights, ids, out=view)
    assert nerr(view, ref) < BOUND[dtype]
    assert_guard_intact(big, (tokens, hidden))


def test_moe_align_pads_each_expert_run():
    gen = torch.Generator().manual_seed(0)
    tokens, k, experts, block = 9, 2, 6, 4
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    ids[0] = torch.tensor([5, 0])
    sorted_pairs, block_expert, num_padded = moe_align(ids, experts, block)
    pairs = tokens * k
    used = int(num_padded)
    counts = torch.bincount(ids.reshape(-1), minlength=experts)
    assert used == int(sum(-(-c // block) * block for c in counts.tolist()))
    assert used % block == 0 and used <= sorted_pairs.numel()
    assert (sorted_pairs[used:] == pairs).all()
    real = sorted_pairs[:used][sorted_pairs[:used] < pairs].long()
    assert sorted(real.tolist()) == list(range(pairs))  # every pair exactly once
    for b in range(used // block):
        rows = sorted_pairs[b * block:(b + 1) * block].long()
        rows = rows[rows < pairs]
        assert (ids.reshape(-1)[rows] == block_expert[b]).all()  # one expert per block


# ------------------------------------------------------------------------------------------ FP8


def fp8_params(method, gen, *, bias_scale=0.01):
    params = method.create_weights()
    params["weight"].copy_(torch.randn(params["weight"].shape, generator=gen).to(torch.float8_e4m3fn))
    params["weight_scale_inv"].copy_(torch.rand(params["weight_scale_inv"].shape, generator=gen) * 0.02 + 0.001)
    if "bias" in params:
        params["bias"].copy_((torch.randn(params["bias"].shape, generator=gen) * bias_scale).to(params["bias"].dtype))
    return params


FP8_SHAPES = [  # (out, in, tokens, block, bias): ragged N and K at 128x128; small blocks, many groups
    (200, 300, 5, (128, 128), True),
    (96, 64, 33, (32, 32), False),
]


@pytest.mark.parametrize("n,k,m,block,bias", FP8_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_fp8_block_linear(dtype, n, k, m, block, bias):
    gen = torch.Generator().manual_seed(n + m)
    spec = LinearSpec(k, n, bias, dtype, quant="fp8_block", weight_block_size=block)
    ref_method = ReferenceQuantizedLinear(spec)
    params = fp8_params(ref_method, gen)
    shapes = {name: (t.shape, t.dtype) for name, t in params.items()}
    method = Fp8BlockLinear(spec)
    assert {name: (t.shape, t.dtype) for name, t in method.create_weights().items()} == shapes
    assert params["weight_scale_inv"].shape == (-(-n // block[0]), -(-k // block[1]))
    x = randn(gen, 2, m, k, dtype=dtype)
    ref = ref_method.apply(params, x)
    for upcast in (False, True):  # 8-bit operands straight into tl.dot, or widened to float16 first
        method.upcast = upcast
        out = method.apply(params, x)
        assert out.dtype == dtype and out.shape == (2, m, n)
        assert nerr(out, ref) < BOUND[dtype], upcast
    # the quantized product is close to the float product (the format is right, not just consistent)
    w = params["weight"].float() * params["weight_scale_inv"].repeat_interleave(block[0], 0)[:n].repeat_interleave(
        block[1], 1)[:, :k]
    dense = x.float() @ w.t() + (params["bias"].float() if bias else 0)
    assert nerr(ref, dense) < 5e-3


def test_fp8_gemm_output_guard():
    from dsserve.core.quant import quantize_per_token_group

    gen = torch.Generator().manual_seed(9)
    m, n, k = 7, 40, 96
    w = torch.randn(n, k, generator=gen).to(torch.float8_e4m3fn)
    ws = torch.rand(-(-n // 32), -(-k // 32), generator=gen) + 0.5
    x = torch.randn(m, k, generator=gen)
    xq, xs = quantize_per_token_group(x, 32)
    ref = fp8_block_gemm(xq, xs, w, ws, block=(32, 32), out_dtype=torch.float32)
    big, view = guarded((m, n), torch.float32)
    fp8_block_gemm(xq, xs, w, ws, block=(32, 32), out=view)
    assert torch.equal(view, ref)
    assert_guard_intact(big, (m, n))


# ------------------------------------------------------------------------------ cuda/rocm plugins


def test_gpu_plugins_are_asked_only_for_their_device():
    """Their hooks need no device check: the registry routes only cuda's ops to cuda, rocm's to rocm."""
    from dsserve.core.plugins import PluginRegistry

    registry = PluginRegistry(overrides=[])
    devices = {d.name: d for d, _ in registry.devices()}
    for name in ("cuda", "rocm"):
        assert name in registry.plugins_for(devices[name])
        assert name not in registry.plugins_for(devices["cpu"])


def test_gpu_plugins_choose_triton_backends_for_their_device():
    """Without flash_mla / deep_gemm installed the cuda plugin falls back to the Triton kernels;
    specs the kernels refuse go to the reference (None)."""
    import importlib.util

    import dsserve.plugins.cuda as cuda_plugin
    import dsserve.plugins.rocm as rocm_plugin

    if importlib.util.find_spec("flash_mla") or importlib.util.find_spec("deep_gemm"):
        pytest.skip("GPU libraries installed: the choice depends on the GPU")
    cuda, rocm = cuda_plugin.CudaDevice(), rocm_plugin.RocmDevice()
    for plugin, device in ((cuda_plugin, cuda), (rocm_plugin, rocm)):
        assert type(plugin.dsserve_attention_backend(device=device, spec=mla_spec(torch.bfloat16, 64))) \
            is TritonMLAAttention
        assert type(plugin.dsserve_attention_backend(device=device, spec=mha_spec(torch.float16, 16, 4, 2))) \
            is TritonMHAAttention
        assert plugin.dsserve_attention_backend(device=device, spec=mha_spec(torch.float64, 16, 4, 2)) is None
        assert type(plugin.dsserve_moe_backend(device=device, spec=moe_spec(torch.bfloat16, 8, 2, 32, 24))) \
            is TritonMoE
        fp8_moe = MoESpec(**{**moe_spec(torch.bfloat16, 8, 2, 32, 24).__dict__, "quant": "fp8_block"})
        assert type(plugin.dsserve_moe_backend(device=device, spec=fp8_moe)) is TritonMoE
        int8_moe = MoESpec(**{**fp8_moe.__dict__, "quant": "int8_block"})
        assert plugin.dsserve_moe_backend(device=device, spec=int8_moe) is None
        assert plugin.dsserve_linear_method(device=device, spec=LinearSpec(8, 8, False, torch.bfloat16)) is None
    fp8 = LinearSpec(256, 128, False, torch.bfloat16, quant="fp8_block", weight_block_size=(128, 128))
    assert type(cuda_plugin.dsserve_linear_method(device=cuda, spec=fp8)) is Fp8BlockLinear


def test_e4m3fn_to_e4m3fnuz_preserves_values():
    from dsserve.plugins.rocm.fp8 import e4m3fn_to_e4m3fnuz, uses_fnuz

    gen = torch.Generator().manual_seed(1)
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    finite = every_byte[(every_byte != 0x7F) & (every_byte != 0xFF)]  # e4m3fn's NaNs
    picks = finite[torch.randint(len(finite), (64, 256), generator=gen)]
    picks[0, :len(finite)] = finite  # every finite byte at least once, -0 (0x80) included
    weight = picks.view(torch.float8_e4m3fn)
    scale = torch.rand(1, 2, generator=gen) + 0.1
    fnuz, fnuz_scale = e4m3fn_to_e4m3fnuz(weight, scale)
    assert fnuz.dtype == torch.float8_e4m3fnuz and torch.equal(fnuz_scale, scale * 2)
    s_fn = scale.repeat_interleave(128, dim=1)
    s_fnuz = fnuz_scale.repeat_interleave(128, dim=1)
    assert not torch.isnan(fnuz.float()).any()
    assert torch.equal(fnuz.float() * s_fnuz, weight.float() * s_fn)
    assert weight.view(torch.uint8).eq(0x80).any() and not fnuz.view(torch.uint8).eq(0x80).any()
    assert uses_fnuz("gfx942:sramecc+:xnack-") and not uses_fnuz("gfx950") and not uses_fnuz("gfx90a")


def test_fnuz_gemm_matches_the_e4m3fn_model():
    """The rocm path: convert at load, quantize activations to e4m3fnuz, same Triton kernel."""
    from dsserve.plugins.rocm.fp8_linear import Fp8BlockLinearFnuz

    gen = torch.Generator().manual_seed(2)
    spec = LinearSpec(200, 72, True, torch.float32, quant="fp8_block", weight_block_size=(128, 128))
    method = Fp8BlockLinearFnuz(spec)
    params = fp8_params(ReferenceQuantizedLinear(spec), gen)
    loaded = method.process_weights_after_loading(dict(params))
    assert loaded["weight"].dtype == torch.float8_e4m3fnuz
    x = torch.randn(6, 200, generator=gen)
    ref_fnuz = ReferenceQuantizedLinear(spec)
    ref_fnuz.format.storage = torch.float8_e4m3fnuz  # activations rounded to e4m3fnuz, as the rocm kernel does
    for upcast in (False, True):
        method.upcast = upcast
        out = method.apply(loaded, x)
        assert nerr(out, ref_fnuz.apply(loaded, x)) < BOUND[torch.float32]
    # and it computes the same layer as the e4m3fn checkpoint, up to activation rounding
    assert nerr(out, ReferenceQuantizedLinear(spec).apply(params, x)) < 5e-3


# ------------------------------------------------------------------------------------ end to end


def test_tiny_model_greedy_output_matches_the_reference():
    """dsserve-tiny (MLA + MoE) on the Triton attention and MoE kernels, in float32, generates
    exactly the reference's greedy tokens: the kernels meet the model graph's contract (shapes,
    strides, cache layout, prefill then decode through split-K) and not only their unit tests."""
    from dsserve.core.hookspecs import hookimpl
    from plugin_util import serving_cpu

    from dsserve import Engine, SamplingParams

    served = set()

    class TritonOnCpu:
        @hookimpl(tryfirst=True)
        def dsserve_attention_backend(self, device, spec):
            cls = TritonMLAAttention if spec.kind == "mla" else TritonMHAAttention
            backend = cls(spec)
            backend.decode_splits = 3
            served.add(cls.__name__)
            return backend

        @hookimpl(tryfirst=True)
        def dsserve_moe_backend(self, device, spec):
            served.add("TritonMoE")
            return TritonMoE(spec)

    prompts = ["Hello there, how are you?", "The capital of France is a city that"]
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    with Engine(device="cpu", dtype="float32") as engine:
        ref = [o.token_ids for o in engine.generate(prompts, sampling_params=params)]
    with (serving_cpu(TritonOnCpu(), "triton-kernels-on-cpu"),
          Engine(device="cpu", dtype="float32", model_worker="thread") as engine):   # the plugin is in this process
        out = [o.token_ids for o in engine.generate(prompts, sampling_params=params)]
    assert served == {"TritonMLAAttention", "TritonMoE"}
    assert out == ref and all(len(t) == 8 for t in out)


# ------------------------------------------------------------------------------- FP8 MoE experts

# fp8_block experts against ReferenceMoE with the same spec. Both quantize every GEMM input with
# `quantize_per_token_group` (the hidden states identically; the intermediate silu(gate) * up from
# their own float32 GEMMs) and multiply the same 8-bit values, so what differs is the summation
# order (nerr ~1e-13 in float32), the float16 output's rounding (per pair before the k-sum here,
# per token there: ~1e-7), and, rarely, an intermediate element that lies within float32 rounding
# of an e4m3 rounding midpoint and rounds the other way in one of them (one such flip measured
# 2e-8 over 12 seeds per shape). The upcast changes nothing: e4m3 -> float16 is exact. Bounds with
# margin over all of that; a wrong scale row or column, a missing activation rounding or a lost
# block is 1e-4 or more.
FP8_MOE_BOUND = {torch.float32: 1e-6, torch.float16: 1e-5}
FP8_MOE_SHAPES = [  # (tokens, experts, top_k, hidden, inter)
    (40, 8, 3, 256, 128),  # I a multiple of the 128 block: gate and up in separate scale rows
    (1, 8, 2, 256, 128),  # one decode token
    (40, 8, 3, 200, 64),  # 2I = 128: one scale row holds an expert's gate and up; ragged hidden
]


def fp8_moe_case(dtype, tokens, experts, top_k, hidden, inter, seed, block=(128, 128)):
    """(spec, x, topk_weights, topk_ids, w13, w2, float experts): each expert's float weights quantized
    by the format as a checkpoint stores them; the router favours experts 0 and 1 and (top_k 3) gives
    the last one to the first token only, so the pair counts are skewed (several row blocks for some
    experts, one mostly padded block for others)."""
    from dsserve.core.quant import weight_format

    gen = torch.Generator().manual_seed(seed)
    spec = MoESpec(**{**moe_spec(dtype, experts, top_k, hidden, inter).__dict__, "quant": "fp8_block",
                      "weight_block_size": block})
    fmt = weight_format("fp8_block", block)
    dense13 = torch.randn(experts, 2 * inter, hidden, generator=gen) * hidden ** -0.5
    dense2 = torch.randn(experts, hidden, inter, generator=gen) * inter ** -0.5

    def stored(dense):
        per_expert = [fmt.quantize(w) for w in dense]
        return {name: torch.stack([q[name] for q in per_expert]) for name in per_expert[0]}

    w13, w2 = stored(dense13), stored(dense2)
    floats = tuple(torch.stack([fmt.dequantize({n: t[e] for n, t in w.items()}) for e in range(experts)])
                   for w in (w13, w2))
    x = randn(gen, tokens, hidden, dtype=dtype)
    logits = torch.randn(tokens, experts, generator=gen)
    logits[:, 0] += 3.0
    logits[:, 1] += 1.5
    logits[:, -1] -= 4.0
    logits[0, -1] += 8.0  # the last expert: the first token only
    weights, ids = ReferenceMoE(spec).select_experts(logits, torch.randn(experts, generator=gen) * 0.1)
    return spec, x, weights, ids, w13, w2, floats


@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter", FP8_MOE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_fused_moe_fp8_block(dtype, tokens, experts, top_k, hidden, inter):
    spec, x, weights, ids, w13, w2, floats = fp8_moe_case(dtype, tokens, experts, top_k, hidden, inter,
                                                          seed=tokens + inter)
    assert spec.weight_block_size == (128, 128) and w13["weight"].dtype == torch.float8_e4m3fn
    assert w13["weight_scale_inv"].shape == (experts, -(-2 * inter // 128), -(-hidden // 128))
    if tokens > 1:  # skewed: some expert spans several 16-row blocks, another gets a single pair
        counts = torch.bincount(ids.reshape(-1), minlength=experts)
        assert counts.max() > 16 and counts[-1] == 1
    ref = ReferenceMoE(spec).compute_experts(x, weights, ids, w13, w2)
    backend = TritonMoE(spec)
    assert backend.process_weights_after_loading(w13, w2) == (w13, w2)  # e4m3fn kept off MI300
    outs = {}
    for upcast in (False, True):  # 8-bit operands straight into tl.dot, or their bytes widened to float16
        backend.upcast = upcast
        outs[upcast] = backend.compute_experts(x, weights, ids, w13, w2)
        assert outs[upcast].dtype == dtype and outs[upcast].shape == (tokens, hidden)
        assert nerr(outs[upcast], ref) < FP8_MOE_BOUND[dtype], upcast
    assert torch.equal(outs[False], outs[True])  # the byte upcast is exact
    # the quantized layer is close to the float one (the format is right, not just consistent)
    dense_spec = moe_spec(torch.float32, experts, top_k, hidden, inter)
    dense = ReferenceMoE(dense_spec).compute_experts(x.float(), weights, ids, *floats)
    assert nerr(outs[False], dense) < 5e-3
    if tokens > 1:  # the entry point writes nothing outside a strided output view
        big, view = guarded((tokens, hidden), dtype)
        fused_moe(x, w13, w2, weights, ids, out=view, block=(128, 128), upcast=True)
        assert torch.equal(view, outs[True])
        assert_guard_intact(big, (tokens, hidden))


def test_fused_moe_fp8_small_blocks():
    """64x32 blocks: bn below the kernels' BLOCK_N (each column reads its own scale row) and several
    scale groups along K."""
    spec, x, weights, ids, w13, w2, _ = fp8_moe_case(torch.float32, 9, 4, 2, 96, 48, seed=7, block=(64, 32))
    assert w13["weight_scale_inv"].shape == (4, 2, 3) and w2["weight_scale_inv"].shape == (4, 2, 2)
    ref = ReferenceMoE(spec).compute_experts(x, weights, ids, w13, w2)
    assert nerr(TritonMoE(spec).compute_experts(x, weights, ids, w13, w2), ref) < FP8_MOE_BOUND[torch.float32]


def test_fused_moe_fp8_fnuz():
    """The MI300 (gfx94x) path: the e4m3fn experts are converted to e4m3fnuz after loading (same
    bytes, scales doubled) and activations quantized to e4m3fnuz."""
    spec, x, weights, ids, w13, w2, _ = fp8_moe_case(torch.float32, 17, 8, 3, 200, 64, seed=3)
    backend = TritonMoE(spec)
    backend.fp8_dtype = torch.float8_e4m3fnuz
    l13, l2 = backend.process_weights_after_loading(w13, w2)
    for loaded, stored in ((l13, w13), (l2, w2)):
        assert loaded["weight"].dtype == torch.float8_e4m3fnuz
        assert torch.equal(loaded["weight_scale_inv"], stored["weight_scale_inv"] * 2)
    ref_fnuz = ReferenceMoE(spec)
    ref_fnuz.format.storage = torch.float8_e4m3fnuz  # activations rounded to e4m3fnuz, as the kernels do
    ref = ref_fnuz.compute_experts(x, weights, ids, l13, l2)
    for upcast in (False, True):
        backend.upcast = upcast
        out = backend.compute_experts(x, weights, ids, l13, l2)
        assert nerr(out, ref) < FP8_MOE_BOUND[torch.float32], upcast
    # the same layer as the e4m3fn checkpoint, up to the activations' rounding grid: two different
    # e4m3 roundings of every GEMM input, each ~2e-3 from the float layer (3.6e-3 measured)
    assert nerr(out, ReferenceMoE(spec).compute_experts(x, weights, ids, w13, w2)) < 1e-2


def test_triton_moe_accepts_fp8_block_only():
    base = moe_spec(torch.bfloat16, 8, 2, 256, 128)

    def quant(name, block=None):
        return MoESpec(**{**base.__dict__, "quant": name, "weight_block_size": block})

    for block in (None, (128, 128), (64, 32), (1, 16)):
        assert TritonMoE.unsupported(quant("fp8_block", block)) is None, block
    for block in ((128, 96), (128, 8)):
        assert "power of two" in TritonMoE.unsupported(quant("fp8_block", block)), block
    for name in ("int8_block", "int8_channel", "awq"):
        assert name in TritonMoE.unsupported(quant(name, (1, 128) if name == "awq" else None))
    assert "dtype" in TritonMoE.unsupported(MoESpec(**{**quant("fp8_block").__dict__, "dtype": torch.float64}))
