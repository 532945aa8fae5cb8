"""The cpu plugin's C++ kernels against the float64 reference, on every ISA variant this CPU can run
(a lower variant runs on a higher CPU: an AVX-512 machine checks the AVX2 path too), and the fallback
where they cannot be built."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsserve.core.backends import MoESpec
from dsserve.core.reference import ReferenceMoE
from dsserve.plugins.cpu import native
from dsserve.plugins.cpu.moe import CpuFusedMoE, unsupported
from dsserve.plugins.cpu.packing import pack, packable, unpack

BEST = native.isa()
RUNNABLE = [isa for isa in native.Isa if BEST is not None and isa <= BEST]
needs_kernels = pytest.mark.skipif(BEST is None or native.kernels() is None,
                                   reason="no AVX2/FMA on this CPU or no C++ toolchain: the reference serves")
# normalised squared error bounds: float32 sums in another order; bfloat16 rounds the activation
# between the GEMMs and the output, as the reference does
BOUNDS = {torch.float32: 1e-10, torch.bfloat16: 3e-4}


def _isa_param(isa: native.Isa):
    return pytest.param(isa, id=isa.name.lower())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_round_trips(dtype):
    w = torch.randn(3, 48, 34).to(dtype)
    packed = pack(w)
    assert packed.shape == (3, 3, 34 * 16)
    assert torch.equal(unpack(packed, 34), w)


def test_unpackable_shapes_are_named():
    assert "not a multiple of 16" in packable(40, 32, torch.bfloat16)
    assert "odd" in packable(32, 33, torch.bfloat16)
    assert packable(32, 33, torch.float32) is None
    assert "float16" in packable(32, 32, torch.float16)
    spec = MoESpec(8, 2, 64, 40, "sigmoid", "greedy", 1, 1, True, 1.0, torch.bfloat16)
    assert "multiple of 16" in unsupported(spec)
    assert "quantization 'awq'" in unsupported(MoESpec(8, 2, 64, 48, "sigmoid", "greedy", 1, 1, True, 1.0,
                                                       torch.bfloat16, quant="awq", weight_block_size=(1, 64)))
    assert unsupported(MoESpec(8, 2, 64, 48, "sigmoid", "greedy", 1, 1, True, 1.0, torch.bfloat16,
                               quant="fp8_block", weight_block_size=(16, 16))) is None
    assert "blocks" in unsupported(MoESpec(8, 2, 64, 48, "sigmoid", "greedy", 1, 1, True, 1.0, torch.bfloat16,
                                           quant="fp8_block", weight_block_size=(8, 8)))


def test_isa_is_read_from_the_cpu_flags():
    assert native.isa(frozenset({"avx2", "fma", "avx512f", "avx512_bf16"})) is native.Isa.AVX512_BF16
    assert native.isa(frozenset({"avx2", "fma", "avx512f"})) is native.Isa.AVX512
    assert native.isa(frozenset({"avx2", "fma"})) is native.Isa.AVX2
    assert native.isa(frozenset({"sse4_2"})) is None
    amx = frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})
    # AMX only where the kernel grants this process the tile state (on a CPU without AMX it refuses)
    assert native.isa(amx) is (native.Isa.AMX_BF16 if native.amx_permitted() else native.Isa.AVX512_BF16)


def _case(tokens: int, experts: int, k: int, hidden: int, inter: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    x = rnd(tokens, hidden)
    w13, w2 = rnd(experts, 2 * inter, hidden, std=hidden ** -0.5), rnd(experts, hidden, inter, std=inter ** -0.5)
    # skewed: expert 0 gets most tokens (more than the kernel's 8-row tile), some get none
    skew = torch.rand(tokens, experts, generator=gen) * torch.linspace(3.0, 1.0, experts)
    ids = skew.argsort(dim=-1, descending=True)[:, :k].contiguous()
    weights = torch.rand(tokens, k, generator=gen) + 0.1
    return x, w13, w2, ids, weights


@needs_kernels
@pytest.mark.parametrize("isa", [_isa_param(i) for i in RUNNABLE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,experts,k,hidden,inter", [
    (1, 8, 2, 64, 32), (5, 16, 6, 128, 48), (37, 32, 4, 256, 64), (0, 4, 2, 32, 16),
])
def test_fused_moe_matches_the_reference(isa, dtype, tokens, experts, k, hidden, inter):
    x, w13, w2, ids, weights = _case(tokens, experts, k, hidden, inter, dtype, seed=tokens + experts)
    spec = MoESpec(experts, k, hidden, inter, "sigmoid", "greedy", 1, 1, True, 1.0, dtype)
    backend = CpuFusedMoE(spec, native.kernels(), isa)
    p13, p2 = backend.process_weights_after_loading(w13, w2)
    out = backend.compute_experts(x, weights, ids, p13, p2)
    assert out.shape == (tokens, hidden) and out.dtype == dtype
    oracle = ReferenceMoE(MoESpec(experts, k, hidden, inter, "sigmoid", "greedy", 1, 1, True, 1.0, torch.float64))
    want = oracle.compute_experts(x.double(), weights, ids, w13.double(), w2.double())
    if tokens:
        err = float((out.double() - want).pow(2).sum() / want.pow(2).sum())
        assert err < BOUNDS[dtype], f"normalised error {err:.1e}"


@needs_kernels
def test_fused_moe_refuses_mismatched_weights():
    x, w13, w2, ids, weights = _case(3, 4, 2, 64, 32, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="packed"):
        native.kernels().fused_moe(x, w13, w2, weights, ids, int(BEST))  # not packed
    with pytest.raises(RuntimeError, match="topk_ids holds expert 9"):
        native.kernels().fused_moe(x, pack(w13), pack(w2), weights, torch.full_like(ids, 9), int(BEST))


def test_without_kernels_the_cpu_plugin_serves_the_reference(monkeypatch):
    import dsserve.plugins.cpu as cpu_plugin

    monkeypatch.setattr(native, "kernels", lambda: None)
    spec = MoESpec(8, 2, 64, 32, "sigmoid", "greedy", 1, 1, True, 1.0, torch.float32)
    assert type(cpu_plugin.dsserve_moe_backend(device=cpu_plugin.CpuDevice(), spec=spec)) is ReferenceMoE


@needs_kernels
@pytest.mark.parametrize("isa", [_isa_param(i) for i in RUNNABLE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens,page_size,chunk_tokens,heads", [
    ([1], 16, 64, 4), ([37], 16, 10, 4), ([300, 5, 64], 16, 112, 20), ([130, 129], 1, 19, 4), ([17], 64, 1, 16),
])
def test_mla_decode_matches_the_reference(isa, dtype, lens, page_size, chunk_tokens, heads):
    """Every chunking of the KV length (one token a chunk included), odd token counts and head
    counts that leave a group of 16 part-empty give the reference's answer, on every variant (AVX512-BF16
    runs bfloat16 through dot products)."""
    from dsserve.core.backends import AttentionSpec
    from dsserve.core.forward_batch import AttentionMetadata
    from dsserve.core.reference import ReferenceMLAAttention

    gen = torch.Generator().manual_seed(len(lens) * 100 + page_size)
    rank, rope = 64, 16
    spec = AttentionSpec(kind="mla", num_heads=heads, num_kv_heads=1, head_dim=48 + rope, v_head_dim=32,
                         scale=0.3, dtype=dtype, page_size=page_size, kv_lora_rank=rank, qk_rope_head_dim=rope)
    pages_per_seq = [-(-n // page_size) for n in lens]
    order = torch.randperm(sum(pages_per_seq), generator=gen) + 1  # scattered pages, page 0 unused
    tables, start = [], 0
    for n in pages_per_seq:
        tables.append(order[start:start + n].tolist())
        start += n
    cache = (torch.randn(sum(pages_per_seq) + 1, page_size, rank + rope, generator=gen)).to(dtype)
    meta = AttentionMetadata.build(prefix_lens=[n - 1 for n in lens], extend_lens=[1] * len(lens),
                                   page_table=tables, page_size=page_size, device="cpu")
    q_latent = torch.randn(len(lens), heads, rank, generator=gen).to(dtype)
    q_pe = torch.randn(len(lens), heads, rope, generator=gen).to(dtype)
    latent = torch.randn(len(lens), rank + rope, generator=gen).to(dtype)
    want = ReferenceMLAAttention(spec).forward_decode(q_latent, q_pe, latent, cache.clone(), meta)
    flat = cache.view(-1, rank + rope)
    flat[meta.out_cache_loc] = latent
    q = torch.cat([q_latent, q_pe], dim=-1).contiguous()
    got = native.kernels().mla_decode(q, flat, meta.page_table, meta.seq_lens, page_size, rank, spec.scale,
                                      chunk_tokens, int(isa))
    err = float((got.double() - want.double()).pow(2).sum() / want.double().pow(2).sum())
    assert got.shape == want.shape and got.dtype == dtype
    assert err < BOUNDS[dtype], f"normalised error {err:.1e}"


@needs_kernels
@pytest.mark.parametrize("isa", [_isa_param(i) for i in RUNNABLE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,out_features,in_features,bias", [
    (1, 48, 64, False), (9, 32, 600, True), (37, 80, 34, False), (0, 16, 16, True), (70, 48, 600, False),
])
def test_packed_linear_matches_the_reference(isa, dtype, rows, out_features, in_features, bias):
    """An odd count of 16-column blocks (the last pair has one), K past one 256-wide chunk (with many
    rows: the sums stored and reloaded between chunks), a bias."""
    from dsserve.core.backends import LinearSpec
    from dsserve.plugins.cpu.linear import CpuPackedLinear

    gen = torch.Generator().manual_seed(rows + in_features)
    spec = LinearSpec(in_features, out_features, bias, dtype)
    method = CpuPackedLinear(spec, native.kernels(), isa)
    params = {"weight": (torch.randn(out_features, in_features, generator=gen) * in_features ** -0.5).to(dtype)}
    if bias:
        params["bias"] = torch.randn(out_features, generator=gen).to(dtype)
    plain = dict(params)
    params = method.process_weights_after_loading(params)
    assert torch.equal(method.dequantized_weight(params), plain["weight"])
    x = torch.randn(2, rows, in_features, generator=gen).to(dtype)
    got = method.apply(params, x)
    want = torch.nn.functional.linear(x.double(), plain["weight"].double(),
                                      plain["bias"].double() if bias else None)
    assert got.shape == (2, rows, out_features) and got.dtype == dtype
    if rows:
        err = float((got.double() - want).pow(2).sum() / want.pow(2).sum())
        assert err < {torch.float32: 1e-10, torch.bfloat16: 1e-4}[dtype], f"normalised error {err:.1e}"


@needs_kernels
@pytest.mark.parametrize("isa", [_isa_param(i) for i in RUNNABLE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_mla_absorption_matches_bmm(isa, dtype, batch):
    """absorb_query / expand_output on the packed per-head weights equal the contract's default
    (torch.bmm)."""
    from dsserve.core.backends import AttentionSpec, MLAAttentionBackend
    from dsserve.plugins.cpu.attention import CpuMLAAttention

    gen = torch.Generator().manual_seed(batch)
    heads, nope, rope, rank, v = 3, 32, 16, 64, 48
    spec = AttentionSpec(kind="mla", num_heads=heads, num_kv_heads=1, head_dim=nope + rope, v_head_dim=v,
                         scale=0.2, dtype=dtype, kv_lora_rank=rank, qk_rope_head_dim=rope)
    backend = CpuMLAAttention(spec, native.kernels(), isa)
    w_kc = torch.randn(heads, nope, rank, generator=gen).to(dtype)
    w_vc = torch.randn(heads, rank, v, generator=gen).to(dtype)
    p_kc, p_vc = backend.process_weights_after_loading(w_kc, w_vc)
    q_nope = torch.randn(batch, heads, nope, generator=gen).to(dtype)
    o_latent = torch.randn(batch, heads, rank, generator=gen).to(dtype)
    for got, want in ((backend.absorb_query(q_nope, p_kc),
                       MLAAttentionBackend.absorb_query(backend, q_nope.double(), w_kc.double())),
                      (backend.expand_output(o_latent, p_vc),
                       MLAAttentionBackend.expand_output(backend, o_latent.double(), w_vc.double()))):
        assert got.dtype == dtype
        err = float((got.double() - want).pow(2).sum() / want.pow(2).sum())
        assert err < {torch.float32: 1e-10, torch.bfloat16: 1e-4}[dtype], f"normalised error {err:.1e}"


# ---------------------------------------------------------------------------------- int8 W8A8

BEST_INT8 = native.int8_isa()
RUNNABLE_INT8 = [isa for isa in native.Int8Isa if BEST_INT8 is not None and isa <= BEST_INT8]


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 2e-6), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("prefix,n,chunk", [(0, 37, 4096), (20, 37, 4096), (0, 37, 8), (20, 37, 8), (50, 5, 16),
                                            (3, 30, 7)])
def test_extend_attention_matches_causal_softmax_over_its_kv_chunks(dtype, bound, prefix, n, chunk):
    """Whole context in one flash call, or chunks merged by log-sum-exp (queries that see nothing of
    a chunk are left out of it), against float64 softmax attention with the cached prefix."""
    from dsserve.plugins.cpu.attention import extend_attention

    gen = torch.Generator().manual_seed(prefix * 100 + n)
    heads, dim = 3, 16
    q, k, v = (torch.randn(heads, m, dim, generator=gen).to(dtype) for m in (n, prefix + n, prefix + n))
    calls = []

    def kv(j0, j1):
        calls.append((j0, j1))
        return k[:, j0:j1], v[:, j0:j1]

    out = extend_attention(q, kv, prefix, 0.25, chunk)
    scores = q.double() @ k.double().transpose(1, 2) * 0.25
    visible = torch.arange(prefix + n)[None, :] <= (torch.arange(n) + prefix)[:, None]
    want = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v.double()
    assert out.dtype == dtype and (out.double() - want).abs().max().item() < bound
    assert max(j1 - j0 for j0, j1 in calls) <= chunk and calls[-1][1] == prefix + n


def test_fp8_vbmi_is_read_from_the_cpu_flags():
    assert native.fp8_vbmi(frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "avx512vbmi"}))
    assert not native.fp8_vbmi(frozenset({"avx2", "fma", "avx512f", "avx512vbmi"}))  # no bf16 dot products
    assert not native.fp8_vbmi(frozenset({"avx2", "fma", "avx512f", "avx512_bf16"}))


def test_int8_isa_is_read_from_the_cpu_flags():
    assert native.int8_isa(frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"})) is native.Int8Isa.AVX512_VNNI
    assert native.int8_isa(frozenset({"avx2", "fma", "avx512f", "avx512bw"})) is native.Int8Isa.AVX2
    amx = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "amx_tile", "amx_int8"})
    assert native.int8_isa(amx) is (native.Int8Isa.AMX if native.amx_permitted() else native.Int8Isa.AVX512_VNNI)
    assert native.int8_isa(frozenset({"sse4_2"})) is None


def test_int8_pack_round_trips():
    from dsserve.plugins.cpu.packing import pack_int8, unpack_int8

    w = torch.randint(-127, 128, (2, 32, 37), dtype=torch.int8)
    packed = pack_int8(w)
    assert packed.shape == (2, 2, 10 * 64)
    assert torch.equal(unpack_int8(packed, 37), w)


@needs_kernels
@pytest.mark.parametrize("isa", [pytest.param(i, id=i.name.lower()) for i in RUNNABLE_INT8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt,block", [("int8_channel", None), ("int8_block", (128, 128)), ("int8_block", (32, 64))])
@pytest.mark.parametrize("rows,out_features,in_features,bias", [
    (1, 48, 64, False), (9, 160, 300, True), (33, 256, 1030, False), (0, 32, 64, False),
    (9, 32, 512, True), (37, 64, 1024, False)])  # K whole AMX tiles of 64: two tiles of rows and a tail
def test_int8_linear_matches_the_reference(isa, dtype, fmt, block, rows, out_features, in_features, bias):
    """The same activation rounding as the reference (per token, or per token per block column), so
    the int32 products are equal and only float32 rounding of the scaled sums differs; rows of very
    different magnitude (an activation outlier row) and a partial last group."""
    from dsserve.core.backends import LinearSpec
    from dsserve.core.quant import weight_format
    from dsserve.core.reference import ReferenceQuantizedLinear
    from dsserve.plugins.cpu.int8_linear import CpuInt8Linear

    gen = torch.Generator().manual_seed(rows + out_features)
    spec = LinearSpec(in_features, out_features, bias, dtype, fmt, block)
    stored = weight_format(fmt, block).quantize(torch.randn(out_features, in_features, generator=gen) * 0.05)
    if bias:
        stored["bias"] = (torch.randn(out_features, generator=gen) * 0.1).to(dtype)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    if rows > 2:
        x[1] *= 50.0
    method = CpuInt8Linear(spec, native.kernels(), isa)
    params = method.process_weights_after_loading(dict(stored))
    out = method.apply(params, x)
    want = ReferenceQuantizedLinear(spec).apply(stored, x)
    assert out.dtype == dtype and out.shape == (rows, out_features)
    if rows:
        err = float((out.double() - want.double()).pow(2).sum() / want.double().pow(2).sum())
        assert err < (1e-12 if dtype == torch.float32 else 1e-4), err
    assert torch.equal(method.dequantized_weight(params), weight_format(fmt, block).dequantize(stored))


@needs_kernels
@pytest.mark.parametrize("isa", [pytest.param(i, id=i.name.lower()) for i in RUNNABLE_INT8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt,block", [("int8_channel", None), ("int8_block", (32, 64))])
@pytest.mark.parametrize("tokens,experts,k,hidden,inter", [(1, 8, 2, 128, 64), (37, 16, 6, 256, 96), (0, 4, 2, 64, 32)])
def test_int8_fused_moe_matches_the_reference(isa, dtype, fmt, block, tokens, experts, k, hidden, inter):
    """int8 experts as stored (each expert's merged gate/up quantized as one [2I, D] weight), the
    activations rounded as the reference rounds them: the int32 products agree exactly; SiLU's last bit
    and the float32 sums' order may move an activation across a rounding midpoint, rarely."""
    from dsserve.core.quant import weight_format
    from dsserve.plugins.cpu.moe import CpuInt8MoE

    x, w13, w2, ids, weights = _case(tokens, experts, k, hidden, inter, torch.float32, seed=tokens + 5)
    x = x.to(dtype)
    f = weight_format(fmt, block)

    def stored(w):
        per = [f.quantize(w[e]) for e in range(w.shape[0])]
        return {name: torch.stack([p[name] for p in per]) for name in per[0]}

    spec = MoESpec(experts, k, hidden, inter, "sigmoid", "greedy", 1, 1, True, 1.0, dtype, quant=fmt,
                   weight_block_size=block)
    s13, s2 = stored(w13), stored(w2)
    backend = CpuInt8MoE(spec, native.kernels(), isa)
    p13, p2 = backend.process_weights_after_loading(s13, s2)
    out = backend.compute_experts(x, weights, ids, p13, p2)
    want = ReferenceMoE(spec).compute_experts(x, weights, ids, s13, s2)
    assert out.dtype == dtype and out.shape == (tokens, hidden)
    if tokens:
        err = float((out.double() - want.double()).pow(2).sum() / want.double().pow(2).sum())
        assert err < (1e-9 if dtype == torch.float32 else 1e-4), err


# ------------------------------------------------------------------------------ fp8 weight-only

# the two variants: float32 activations with FMAs (AVX2, and AVX-512 without BF16) and bfloat16 with
# vdpbf16ps (AVX512-BF16)
FP8_VARIANTS = [pytest.param(i, False, id=i.name.lower()) for i in RUNNABLE if i is not native.Isa.AVX512]
if native.fp8_vbmi():  # and bfloat16 widened by AVX512-VBMI table lookups (on AMX CPUs, for the tiles too)
    FP8_VARIANTS += [pytest.param(i, True, id=f"{i.name.lower()}-vbmi") for i in RUNNABLE if i >= native.Isa.AVX512_BF16]


def test_fp8_vbmi_packing_round_trips():
    from dsserve.plugins.cpu.packing import pack_fp8, unpack_fp8

    w = torch.randn(2, 32, 72).to(torch.float8_e4m3fn)
    plain, vbmi = pack_fp8(w), pack_fp8(w, vbmi=True)
    assert not torch.equal(plain, vbmi)
    assert torch.equal(unpack_fp8(vbmi, 72, vbmi=True).view(torch.uint8), w.view(torch.uint8))


@needs_kernels
@pytest.mark.parametrize("isa,vbmi", FP8_VARIANTS)
def test_every_e4m3_value_widens_exactly(isa, vbmi):
    """The in-register e4m3 widening on all 254 finite codes (normals, subnormals, +-0)."""
    from dsserve.plugins.cpu.fp8_linear import activation_dtype, column_scales
    from dsserve.plugins.cpu.packing import pack_fp8, unpack_fp8

    codes = torch.arange(256, dtype=torch.uint8)
    codes[0x7F] = codes[0xFF] = 0  # e4m3fn's NaN codes, never in a checkpoint
    w = codes.view(torch.float8_e4m3fn).reshape(16, 16).repeat(1, 2)  # [16, 32]
    packed = pack_fp8(w, vbmi)
    assert torch.equal(unpack_fp8(packed, 32, vbmi).view(torch.uint8), w.view(torch.uint8))
    eye = torch.eye(32, dtype=activation_dtype(isa))
    out = native.kernels().fp8_linear(eye, packed, column_scales(torch.ones(1, 1), 128, 16), None, 32, True, vbmi,
                                      isa is native.Isa.AMX_BF16)
    assert torch.equal(out, w.float().t())


@needs_kernels
@pytest.mark.parametrize("isa,vbmi", FP8_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [(128, 128), (32, 64)])
@pytest.mark.parametrize("rows,out_features,in_features,bias", [
    (1, 48, 64, False), (9, 160, 300, True), (33, 256, 1032, False), (0, 32, 64, False), (3, 32, 1030, False),
    (37, 64, 512, True)])  # K and groups whole AMX tiles: two tiles of rows and a tail
def test_fp8_linear_is_the_dequantised_product(isa, vbmi, dtype, block, rows, out_features, in_features, bias):
    """Weight-only: x (in the variant's activation dtype) times the dequantised weight, the block scales
    applied per block column in float32; only float32 summation order and the output's rounding differ."""
    from dsserve.core.backends import LinearSpec
    from dsserve.core.quant import weight_format
    from dsserve.plugins.cpu.fp8_linear import CpuFp8Linear, activation_dtype

    gen = torch.Generator().manual_seed(rows + in_features)
    spec = LinearSpec(in_features, out_features, bias, dtype, "fp8_block", block)
    f = weight_format("fp8_block", block)
    w = torch.randn(out_features, in_features, generator=gen) * 0.05
    w[:32] *= 20.0  # blocks of very different scale
    stored = f.quantize(w)
    if bias:
        stored["bias"] = (torch.randn(out_features, generator=gen) * 0.1).to(dtype)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    method = CpuFp8Linear(spec, native.kernels(), isa, vbmi)
    assert method.vbmi == (vbmi and in_features % 4 == 0)  # K % 4 != 0 falls back to the plain packing
    params = method.process_weights_after_loading(dict(stored))
    out = method.apply(params, x)
    xa = x.to(activation_dtype(isa)).double()
    want = xa @ f.dequantize(stored).double().t() + (stored["bias"].double() if bias else 0)
    assert out.dtype == dtype and out.shape == (rows, out_features)
    if rows:
        err = float((out.double() - want).pow(2).sum() / want.pow(2).sum())
        # float32 output: summation order only (~1e-14); bfloat16: its rounding (2^-9 relative)
        assert err < (1e-10 if dtype == torch.float32 else 1e-4), err
    assert torch.equal(method.dequantized_weight(params), f.dequantize(stored))


@needs_kernels
@pytest.mark.parametrize("isa,vbmi", FP8_VARIANTS)
@pytest.mark.parametrize("tokens,experts,k,hidden,inter", [(1, 8, 2, 128, 64), (37, 16, 6, 256, 96), (0, 4, 2, 64, 32)])
def test_fp8_fused_moe_is_the_dequantised_experts(isa, vbmi, tokens, experts, k, hidden, inter):
    """fp8 experts as stored against the unquantized reference on the dequantised experts, both in the
    variant's activation dtype (bfloat16: the SiLU-and-mul row rounded to bfloat16 in both)."""
    from dsserve.core.quant import weight_format
    from dsserve.plugins.cpu.fp8_linear import activation_dtype
    from dsserve.plugins.cpu.moe import CpuFp8MoE

    dtype = activation_dtype(isa)
    x, w13, w2, ids, weights = _case(tokens, experts, k, hidden, inter, torch.float32, seed=tokens + 9)
    x = x.to(dtype)
    f = weight_format("fp8_block", (32, 64))

    def stored(w):
        per = [f.quantize(w[e]) for e in range(w.shape[0])]
        return {name: torch.stack([p[name] for p in per]) for name in per[0]}

    def dequantized(s):
        return torch.stack([f.dequantize({n: t[e] for n, t in s.items()}) for e in range(experts)]).to(dtype)

    s13, s2 = stored(w13), stored(w2)
    spec = MoESpec(experts, k, hidden, inter, "sigmoid", "greedy", 1, 1, True, 1.0, dtype,
                   quant="fp8_block", weight_block_size=(32, 64))
    backend = CpuFp8MoE(spec, native.kernels(), isa, vbmi)
    assert backend.vbmi == vbmi
    out = backend.compute_experts(x, weights, ids, *backend.process_weights_after_loading(s13, s2))
    plain = MoESpec(experts, k, hidden, inter, "sigmoid", "greedy", 1, 1, True, 1.0, dtype)
    want = ReferenceMoE(plain).compute_experts(x, weights, ids, dequantized(s13), dequantized(s2))
    assert out.dtype == dtype and out.shape == (tokens, hidden)
    if tokens:
        err = float((out.double() - want.double()).pow(2).sum() / want.double().pow(2).sum())
        assert err < BOUNDS[dtype], err


@needs_kernels
def test_a_killed_builds_lock_does_not_hang_the_next_start():
    """torch waits forever on its build `lock` file; one left by a killed first start is cleared
    (no live process holds dsserve's flock), so the kernels load."""
    import subprocess
    import sys

    from torch.utils import cpp_extension

    build_dir = cpp_extension._get_build_directory(native.build_name(), verbose=False)
    lock = Path(build_dir) / "lock"
    lock.touch()
    code = "from dsserve.plugins.cpu import native; assert native.kernels() is not None"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert not lock.exists()
    assert "left by a build of the C++ kernels that did not finish" in proc.stderr


def test_ranks_take_a_numa_node_each_or_an_even_share_of_the_cores():
    from dsserve.plugins.cpu.device import _cpu_list, rank_cores

    two_sockets = [set(range(0, 8)), set(range(8, 16))]
    allowed = set(range(16))
    assert [rank_cores(r, 2, allowed, two_sockets) for r in range(2)] == [list(range(8)), list(range(8, 16))]
    # four ranks on two sockets: even contiguous shares, each inside one socket
    assert [rank_cores(r, 4, allowed, two_sockets) for r in range(4)] == [[0, 1, 2, 3], [4, 5, 6, 7],
                                                                           [8, 9, 10, 11], [12, 13, 14, 15]]
    # a mask (taskset) that leaves one socket: the shares come from the allowed cores only
    assert [rank_cores(r, 2, {2, 3, 4, 5}, two_sockets) for r in range(2)] == [[2, 3], [4, 5]]
    assert [rank_cores(r, 3, {0, 1}, [set()]) for r in range(3)] == [[0], [1], [0]]   # more ranks than cores
    assert _cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}



def test_onednn_serves_bfloat16_only_where_its_kernels_run():
    """oneDNN's reordered bfloat16 linear refuses a CPU without AVX512-BW/VL/DQ or AVX-NE-CONVERT at
    load: an AVX2 CPU asked for --dtype bfloat16 takes another kernel instead of failing to start."""
    from dsserve.plugins.cpu import onednn

    if not onednn.serves(torch.float32, frozenset()):
        pytest.skip("this torch build has no oneDNN linear")
    assert not onednn.serves(torch.bfloat16, frozenset({"avx2", "fma", "f16c"}))
    assert onednn.serves(torch.bfloat16, frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"}))
    assert onednn.serves(torch.bfloat16, frozenset({"avx2", "avx_ne_convert"}))


def test_packable_linear_layers_take_the_block_gemm_and_the_rest_onednn():
    """The block GEMM serves every packable unquantized layer (on AMX CPUs too: one kernel for every row
    count keeps a row's bits independent of its batch); oneDNN takes the shapes it cannot pack."""
    from dsserve.core.backends import LinearSpec
    from dsserve.plugins.cpu.linear import served

    assert served(LinearSpec(64, 32, False, torch.bfloat16))
    assert not served(LinearSpec(64, 40, False, torch.bfloat16))  # 40 outputs: not whole blocks of 16
    assert not served(LinearSpec(64, 32, False, torch.bfloat16, quant="int8_channel"))

@needs_kernels
@pytest.mark.parametrize("isa", [_isa_param(i) for i in RUNNABLE])
def test_a_rows_bits_do_not_depend_on_the_other_rows(isa):
    """--enable-deterministic-inference: each row of a bfloat16 packed linear layer, fused-MoE call and
    FP8 layer (batch_invariant) is the same bits alone as among 37 rows (two AMX tiles of rows and a
    tail, several vector tiles)."""
    from dsserve.core.backends import LinearSpec
    from dsserve.core.quant import weight_format
    from dsserve.plugins.cpu.fp8_linear import CpuFp8Linear, activation_dtype
    from dsserve.plugins.cpu.linear import CpuPackedLinear

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(37, 256, generator=gen).to(torch.bfloat16)
    w = torch.randn(64, 256, generator=gen) * 0.05
    layers = [(CpuPackedLinear(LinearSpec(256, 64, False, torch.bfloat16, batch_invariant=True),
                               native.kernels(), isa), {"weight": w.to(torch.bfloat16)})]
    if activation_dtype(isa) == torch.bfloat16:
        spec = LinearSpec(256, 64, False, torch.bfloat16, "fp8_block", (32, 64), batch_invariant=True)
        layers.append((CpuFp8Linear(spec, native.kernels(), isa), weight_format("fp8_block", (32, 64)).quantize(w)))
    for method, stored in layers:
        params = method.process_weights_after_loading(dict(stored))
        whole = method.apply(params, x)
        for m in (0, 5, 36):
            assert torch.equal(method.apply(params, x[m:m + 1])[0], whole[m]), (type(method).__name__, m)
    xs, w13, w2, ids, weights = _case(37, 4, 2, 64, 32, torch.bfloat16, seed=4)  # expert 0 gets most tokens
    spec = MoESpec(4, 2, 64, 32, "sigmoid", "greedy", 1, 1, True, 1.0, torch.bfloat16, batch_invariant=True)
    backend = CpuFusedMoE(spec, native.kernels(), isa)
    p13, p2 = backend.process_weights_after_loading(w13, w2)
    whole = backend.compute_experts(xs, weights, ids, p13, p2)
    for m in (0, 5, 36):
        alone = backend.compute_experts(xs[m:m + 1], weights[m:m + 1], ids[m:m + 1], p13, p2)
        assert torch.equal(alone[0], whole[m]), m
