"""The torch-native reference ops against plain, obviously-correct formulations.

Everything here is the oracle for every device plugin, so each op is checked against a second,
independent implementation: dense per-head attention with Python-loop softmax, per-token Python
routing, Hugging Face's DeepSeek routers, per-token expert loops and a real two-process gloo group.
"""
from __future__ import annotations

import math
import socket
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from dsserve.core.backends import AttentionSpec, Device, LinearSpec, MoESpec
from dsserve.core.forward_batch import AttentionMetadata
from dsserve.core.reference import (
    ReferenceMHAAttention,
    ReferenceMLAAttention,
    ReferenceMoE,
    SingleProcessCommunicator,
    TorchDistributedCommunicator,
    UnquantizedLinear,
    select_experts,
)

CPU = torch.device("cpu")


def _id(value):
    return str(value).replace("torch.", "")


TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2)}

# ------------------------------------------------------------------------------------ paged layout


def make_layout(prefix_lens, extend_lens, page_size, gen, spare_pages=3):
    """A page table of shuffled, non-contiguous page ids, with spare pages nobody owns."""
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    need = [(n + page_size - 1) // page_size for n in seq_lens]
    num_pages = sum(need) + spare_pages
    perm = torch.randperm(num_pages, generator=gen)
    table = torch.zeros(len(seq_lens), max(need) + 2, dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[used:used + n].to(torch.int32)
        used += n
    meta = AttentionMetadata.build(
        prefix_lens=prefix_lens, extend_lens=extend_lens, page_table=table, page_size=page_size, device=CPU
    )
    return meta, num_pages


def fill_random(cache, gen):
    for c in cache if isinstance(cache, tuple) else (cache,):
        c.copy_(torch.randn(c.shape, generator=gen, dtype=torch.float64).to(c.dtype))


def write_prefix(flat, meta, full_rows):
    """Simulate earlier passes: each sequence's prefix rows are already in the cache."""
    for i, rows in enumerate(full_rows):
        p = meta.prefix_lens_cpu[i]
        if p:
            flat[meta.cache_slots(i)[:p]] = rows[:p].to(flat.dtype)


def check_cache_writes(flat_after, flat_before, loc, new_rows):
    """The new tokens landed exactly at their slots and nothing else changed."""
    assert torch.equal(flat_after[loc], new_rows.to(flat_after.dtype))
    untouched = torch.ones(flat_after.shape[0], dtype=torch.bool)
    untouched[loc] = False
    assert torch.equal(flat_after[untouched], flat_before[untouched])


def softmax_attend(scores, values):
    """softmax(scores) @ values, the softmax written out."""
    m = max(scores.tolist())
    e = torch.exp(scores - m)
    return (e / e.sum()) @ values


# ------------------------------------------------------------------------------------------- MLA

H, NOPE, ROPE, RANK, VDIM = 4, 16, 8, 32, 16
MLA_PREFIX = [0, 5, 17, 3]
MLA_EXTEND = [7, 1, 9, 12]


def mla_spec(dtype, page_size):
    return AttentionSpec(
        kind="mla", num_heads=H, num_kv_heads=1, head_dim=NOPE + ROPE, v_head_dim=VDIM,
        scale=(NOPE + ROPE) ** -0.5, dtype=dtype, page_size=page_size, kv_lora_rank=RANK, qk_rope_head_dim=ROPE,
    )


def dense_mla(q_nope, q_pe, full, prefix, w_kc, w_vc, scale):
    """Expanded per-head attention of n queries at positions prefix..prefix+n-1 over `full`."""
    c, k_pe = full[:, :RANK], full[:, RANK:]
    n = q_nope.shape[0]
    out = torch.zeros(n, H, VDIM, dtype=torch.float64)
    for h in range(H):
        keys = torch.cat([c @ w_kc[h].T, k_pe], dim=-1)
        vals = c @ w_vc[h]
        for j in range(n):
            q = torch.cat([q_nope[j, h], q_pe[j, h]])
            seen = prefix + j + 1
            out[j, h] = softmax_attend((keys[:seen] @ q) * scale, vals[:seen])
    return out


def mla_case(dtype, page_size, prefix_lens, extend_lens, seed):
    gen = torch.Generator().manual_seed(seed)
    meta, num_pages = make_layout(prefix_lens, extend_lens, page_size, gen)
    backend = ReferenceMLAAttention(mla_spec(dtype, page_size))
    cache = backend.create_cache(num_pages, CPU)
    assert cache.shape == (num_pages, page_size, RANK + ROPE)
    fill_random(cache, gen)
    flat = cache.view(-1, RANK + ROPE)
    # Round through the cache dtype so the oracle sees exactly what the cache holds.
    full = [torch.randn(p + e, RANK + ROPE, generator=gen, dtype=torch.float64).to(dtype)
            for p, e in zip(prefix_lens, extend_lens)]
    write_prefix(flat, meta, full)
    latent = torch.cat([f[p:] for f, p in zip(full, prefix_lens)])
    return gen, meta, backend, cache, flat, full, latent


@pytest.mark.parametrize("dtype,page_size", [
    (torch.float32, 1), (torch.float32, 4), (torch.float32, 16), (torch.float64, 4)], ids=_id)
def test_mla_extend_matches_dense(dtype, page_size):
    gen, meta, backend, cache, flat, full, latent = mla_case(dtype, page_size, MLA_PREFIX, MLA_EXTEND, seed=page_size)
    T = sum(MLA_EXTEND)
    q_nope = torch.randn(T, H, NOPE, generator=gen, dtype=torch.float64).to(dtype)
    q_pe = torch.randn(T, H, ROPE, generator=gen, dtype=torch.float64).to(dtype)
    w_kc = torch.randn(H, NOPE, RANK, generator=gen, dtype=torch.float64).to(dtype) * 0.3
    w_vc = torch.randn(H, RANK, VDIM, generator=gen, dtype=torch.float64).to(dtype)
    before = flat.clone()
    backend.prepare(meta)
    out = backend.forward_extend(q_nope, q_pe, latent, cache, meta, w_kc, w_vc)
    assert out.shape == (T, H, VDIM) and out.dtype == dtype
    check_cache_writes(flat, before, meta.out_cache_loc, latent)
    start = 0
    for i, (p, n) in enumerate(zip(MLA_PREFIX, MLA_EXTEND)):
        rows = slice(start, start + n)
        start += n
        want = dense_mla(q_nope[rows].double(), q_pe[rows].double(), full[i].double(), p,
                         w_kc.double(), w_vc.double(), backend.spec.scale)
        torch.testing.assert_close(out[rows].double(), want, atol=TOL[dtype][0], rtol=TOL[dtype][1])


def test_mla_extend_without_prepare_and_chunked():
    """A prompt split in two chunks (second chunk sees the first through the cache) equals one pass."""
    dtype = torch.float32
    gen = torch.Generator().manual_seed(7)
    L, cut, ps = 21, 13, 4
    table = torch.tensor([[5, 2, 7, 0, 3, 6, 0]], dtype=torch.int32)
    backend = ReferenceMLAAttention(mla_spec(dtype, ps))
    lat = torch.randn(L, RANK + ROPE, generator=gen)
    q_nope, q_pe = torch.randn(L, H, NOPE, generator=gen), torch.randn(L, H, ROPE, generator=gen)
    w_kc, w_vc = torch.randn(H, NOPE, RANK, generator=gen) * 0.3, torch.randn(H, RANK, VDIM, generator=gen)
    one = AttentionMetadata.build(prefix_lens=[0], extend_lens=[L], page_table=table, page_size=ps, device=CPU)
    whole = backend.forward_extend(q_nope, q_pe, lat, backend.create_cache(8, CPU), one, w_kc, w_vc)
    cache = backend.create_cache(8, CPU)
    parts = []
    for p, e in ((0, cut), (cut, L - cut)):
        meta = AttentionMetadata.build(prefix_lens=[p], extend_lens=[e], page_table=table, page_size=ps, device=CPU)
        rows = slice(p, p + e)
        parts.append(backend.forward_extend(q_nope[rows], q_pe[rows], lat[rows], cache, meta, w_kc, w_vc))
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,page_size", [
    (torch.float32, 1), (torch.float32, 4), (torch.float32, 16), (torch.float64, 16), (torch.bfloat16, 16)],
    ids=_id)
def test_mla_decode_matches_dense(dtype, page_size):
    prefix = [0, 9, 33, 4, 16]
    gen, meta, backend, cache, flat, full, latent = mla_case(dtype, page_size, prefix, [1] * len(prefix), seed=10 + page_size)
    assert meta.is_decode
    B = len(prefix)
    q_lat = torch.randn(B, H, RANK, generator=gen, dtype=torch.float64).to(dtype) * 0.3
    q_pe = torch.randn(B, H, ROPE, generator=gen, dtype=torch.float64).to(dtype)
    before = flat.clone()
    backend.prepare(meta)
    out = backend.forward_decode(q_lat, q_pe, latent, cache, meta)
    assert out.shape == (B, H, RANK) and out.dtype == dtype
    check_cache_writes(flat, before, meta.out_cache_loc, latent)
    scale = backend.spec.scale
    for b in range(B):
        c, k_pe = full[b][:, :RANK].double(), full[b][:, RANK:].double()
        for h in range(H):
            scores = (c @ q_lat[b, h].double() + k_pe @ q_pe[b, h].double()) * scale
            want = softmax_attend(scores, c)
            torch.testing.assert_close(out[b, h].double(), want, atol=TOL[dtype][0], rtol=TOL[dtype][1])


def test_mla_decode_fp8_cache():
    """An 8-bit float cache (--kv-cache-dtype fp8) with float32 queries."""
    fp8 = torch.float8_e4m3fn
    gen = torch.Generator().manual_seed(21)
    prefix = [5, 11, 2]
    meta, num_pages = make_layout(prefix, [1, 1, 1], 4, gen)
    backend = ReferenceMLAAttention(mla_spec(fp8, 4))
    cache = backend.create_cache(num_pages, CPU)
    raw = cache.view(-1, RANK + ROPE).view(torch.uint8)  # index_put has no fp8 kernel on CPU
    raw.copy_(torch.randn(raw.shape, generator=gen).to(fp8).view(torch.uint8))
    full = [torch.randn(p + 1, RANK + ROPE, generator=gen).to(fp8) for p in prefix]
    for i, rows in enumerate(full):
        raw[meta.cache_slots(i)[:-1]] = rows[:-1].view(torch.uint8)
    latent32 = torch.cat([f[-1:] for f in full]).float()
    before = raw.clone()
    q_lat, q_pe = torch.randn(3, H, RANK, generator=gen) * 0.3, torch.randn(3, H, ROPE, generator=gen)
    out = backend.forward_decode(q_lat, q_pe, latent32, cache, meta)
    assert out.dtype == torch.float32
    check_cache_writes(raw, before, meta.out_cache_loc, latent32.to(fp8).view(torch.uint8))
    for b in range(3):
        c, k_pe = full[b][:, :RANK].double(), full[b][:, RANK:].double()
        for h in range(H):
            want = softmax_attend((c @ q_lat[b, h].double() + k_pe @ q_pe[b, h].double()) * backend.spec.scale, c)
            torch.testing.assert_close(out[b, h].double(), want, atol=2e-5, rtol=2e-5)


def test_mla_absorbed_decode_equals_expanded():
    """decode(q_nope absorbed by w_kc) @ w_vc == per-head attention with expanded K and V."""
    dtype = torch.float64
    prefix = [3, 12, 0, 27]
    gen, meta, backend, cache, _, full, latent = mla_case(dtype, 4, prefix, [1] * 4, seed=99)
    B = len(prefix)
    q_nope = torch.randn(B, H, NOPE, generator=gen, dtype=dtype)
    q_pe = torch.randn(B, H, ROPE, generator=gen, dtype=dtype)
    w_kc = torch.randn(H, NOPE, RANK, generator=gen, dtype=dtype) * 0.3
    w_vc = torch.randn(H, RANK, VDIM, generator=gen, dtype=dtype)
    q_lat = torch.einsum("bhn,hnr->bhr", q_nope, w_kc)
    out_lat = backend.forward_decode(q_lat, q_pe, latent, cache, meta)
    got = torch.einsum("bhr,hrv->bhv", out_lat, w_vc)
    for b in range(B):
        want = dense_mla(q_nope[b:b + 1], q_pe[b:b + 1], full[b], prefix[b], w_kc, w_vc, backend.spec.scale)
        torch.testing.assert_close(got[b], want[0], atol=1e-10, rtol=1e-10)
    # and the same token through forward_extend (expanded path) agrees
    ext = ReferenceMLAAttention(backend.spec).forward_extend(
        q_nope, q_pe, latent, cache.clone(), meta, w_kc, w_vc)
    torch.testing.assert_close(ext, got, atol=1e-10, rtol=1e-10)


# ------------------------------------------------------------------------------------------- MHA

MHA_H, MHA_D, MHA_DV = 8, 16, 12


def mha_case(dtype, page_size, kv_heads, prefix_lens, extend_lens, seed):
    gen = torch.Generator().manual_seed(seed)
    meta, num_pages = make_layout(prefix_lens, extend_lens, page_size, gen)
    spec = AttentionSpec(kind="mha", num_heads=MHA_H, num_kv_heads=kv_heads, head_dim=MHA_D, v_head_dim=MHA_DV,
                         scale=MHA_D ** -0.5, dtype=dtype, page_size=page_size)
    backend = ReferenceMHAAttention(spec)
    cache = backend.create_cache(num_pages, CPU)
    assert cache[0].shape == (num_pages, page_size, kv_heads, MHA_D)
    assert cache[1].shape == (num_pages, page_size, kv_heads, MHA_DV)
    fill_random(cache, gen)
    k_flat = cache[0].view(-1, kv_heads, MHA_D)
    v_flat = cache[1].view(-1, kv_heads, MHA_DV)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)
    full_k = [rnd(p + e, kv_heads, MHA_D) for p, e in zip(prefix_lens, extend_lens)]
    full_v = [rnd(p + e, kv_heads, MHA_DV) for p, e in zip(prefix_lens, extend_lens)]
    write_prefix(k_flat, meta, full_k)
    write_prefix(v_flat, meta, full_v)
    k = torch.cat([f[p:] for f, p in zip(full_k, prefix_lens)])
    v = torch.cat([f[p:] for f, p in zip(full_v, prefix_lens)])
    q = rnd(sum(extend_lens), MHA_H, MHA_D)
    return meta, backend, cache, k_flat, v_flat, full_k, full_v, q, k, v


def dense_mha(q, full_k, full_v, prefix, kv_heads, scale):
    group = MHA_H // kv_heads
    n = q.shape[0]
    out = torch.zeros(n, MHA_H, MHA_DV, dtype=torch.float64)
    for h in range(MHA_H):
        kh = h // group
        for j in range(n):
            seen = prefix + j + 1
            out[j, h] = softmax_attend((full_k[:seen, kh] @ q[j, h]) * scale, full_v[:seen, kh])
    return out


@pytest.mark.parametrize("kv_heads", [2, 8])
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("mode", ["extend", "decode"])
def test_mha_matches_dense(mode, page_size, kv_heads):
    dtype = torch.float32
    if mode == "extend":
        prefix, extend = [0, 6, 19], [9, 1, 5]
    else:
        prefix, extend = [0, 7, 20, 33], [1, 1, 1, 1]
    meta, backend, cache, k_flat, v_flat, full_k, full_v, q, k, v = mha_case(
        dtype, page_size, kv_heads, prefix, extend, seed=100 * kv_heads + page_size)
    k_before, v_before = k_flat.clone(), v_flat.clone()
    backend.prepare(meta)
    fwd = backend.forward_extend if mode == "extend" else backend.forward_decode
    out = fwd(q, k, v, cache, meta)
    assert out.shape == (q.shape[0], MHA_H, MHA_DV) and out.dtype == dtype
    check_cache_writes(k_flat, k_before, meta.out_cache_loc, k)
    check_cache_writes(v_flat, v_before, meta.out_cache_loc, v)
    start = 0
    for i, (p, n) in enumerate(zip(prefix, extend)):
        rows = slice(start, start + n)
        start += n
        want = dense_mha(q[rows].double(), full_k[i].double(), full_v[i].double(), p, kv_heads, backend.spec.scale)
        torch.testing.assert_close(out[rows].double(), want, atol=TOL[dtype][0], rtol=TOL[dtype][1])


def test_mha_decode_equals_extend_bf16():
    """The two paths agree on the same one-token-per-sequence pass, in bfloat16 too."""
    prefix = [2, 15, 30]
    meta, backend, cache, *_, q, k, v = mha_case(torch.bfloat16, 4, 2, prefix, [1, 1, 1], seed=5)
    dec = backend.forward_decode(q, k, v, cache, meta)
    ext = backend.forward_extend(q, k, v, tuple(c.clone() for c in cache), meta)
    assert dec.dtype == torch.bfloat16
    torch.testing.assert_close(dec.float(), ext.float(), atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------- MoE routing

E, K, G, KG = 32, 6, 4, 2


def moe_spec(scoring, method, norm, scale=2.5, dtype=torch.float32, experts=E, top_k=K, hidden=16, inter=8):
    return MoESpec(num_experts=experts, top_k=top_k, hidden_size=hidden, intermediate_size=inter,
                   scoring_func=scoring, topk_method=method, n_group=G, topk_group=KG, norm_topk_prob=norm,
                   routed_scaling_factor=scale, dtype=dtype)


def loop_route(logits, bias, spec):
    """Per-token routing on Python floats."""
    ids_out, w_out = [], []
    per = spec.num_experts // spec.n_group
    for row in logits.tolist():
        if spec.scoring_func == "softmax":
            m = max(row)
            ex = [math.exp(x - m) for x in row]
            scores = [x / sum(ex) for x in ex]
        else:
            scores = [1.0 / (1.0 + math.exp(-x)) for x in row]
        choice = list(scores)
        if spec.topk_method == "noaux_tc":
            choice = [s + b for s, b in zip(scores, bias.tolist())]
        allowed = list(range(spec.num_experts))
        if spec.topk_method != "greedy":
            group_score = []
            for g in range(spec.n_group):
                members = sorted(choice[g * per:(g + 1) * per], reverse=True)
                group_score.append(members[0] if spec.topk_method == "group_limited_greedy" else members[0] + members[1])
            kept = sorted(range(spec.n_group), key=lambda g: -group_score[g])[:spec.topk_group]
            allowed = [e for e in allowed if e // per in kept]
        ids = sorted(allowed, key=lambda e: -choice[e])[:spec.top_k]
        w = [scores[e] for e in ids]
        if spec.norm_topk_prob:
            total = sum(w)
            w = [x / (total + 1e-20) for x in w]
        ids_out.append(ids)
        w_out.append([x * spec.routed_scaling_factor for x in w])
    return torch.tensor(w_out, dtype=torch.float64), torch.tensor(ids_out, dtype=torch.int64)


def canonical(weights, ids):
    """Rows sorted by expert id, so routings compare as sets."""
    ids_sorted, order = ids.sort(dim=-1)
    return weights.gather(1, order), ids_sorted


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy", "noaux_tc"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_select_experts_matches_loop(scoring, method, norm):
    gen = torch.Generator().manual_seed(sum(map(ord, f"{scoring}{method}{norm}")))
    logits = torch.randn(64, E, generator=gen) * 2
    bias = torch.randn(E, generator=gen) * 0.2
    spec = moe_spec(scoring, method, norm)
    w, ids = ReferenceMoE(spec).select_experts(logits, bias if method == "noaux_tc" else None)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64 and w.shape == ids.shape == (64, K)
    want_w, want_ids = canonical(*loop_route(logits, bias, spec))
    got_w, got_ids = canonical(w, ids)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w.double(), want_w, atol=1e-6, rtol=1e-6)
    # the plain function is what the backend runs
    assert torch.equal(canonical(*select_experts(logits, bias if method == "noaux_tc" else None, spec))[1], got_ids)


def test_noaux_weights_are_unbiased_scores():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(16, E, generator=gen)
    bias = torch.randn(E, generator=gen)
    spec = moe_spec("sigmoid", "noaux_tc", norm=False, scale=1.0)
    w, ids = select_experts(logits, bias, spec)
    torch.testing.assert_close(w, logits.sigmoid().gather(1, ids))


@pytest.mark.parametrize("norm", [False, True])
def test_select_experts_matches_transformers_v3(norm):
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import (
        DeepseekV3Config,
    )
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3TopkRouter,
    )

    hidden = 24
    cfg = DeepseekV3Config(hidden_size=hidden, n_routed_experts=E, num_experts_per_tok=K, n_group=G,
                           topk_group=KG, norm_topk_prob=norm, routed_scaling_factor=2.5,
                           num_attention_heads=4, num_key_value_heads=4)
    router = DeepseekV3TopkRouter(cfg)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, hidden, generator=gen) * 0.3)
        router.e_score_correction_bias.copy_(torch.randn(E, generator=gen) * 0.1)
        logits, hf_w, hf_ids = router(torch.randn(48, hidden, generator=gen))
    spec = moe_spec("sigmoid", "noaux_tc", norm, hidden=hidden)
    w, ids = select_experts(logits, router.e_score_correction_bias, spec)
    got_w, got_ids = canonical(w, ids)
    want_w, want_ids = canonical(hf_w, hf_ids)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_select_experts_matches_transformers_v2(method):
    from transformers.models.deepseek_v2.configuration_deepseek_v2 import (
        DeepseekV2Config,
    )
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
        DeepseekV2TopkRouter,
    )

    hidden = 24
    cfg = DeepseekV2Config(hidden_size=hidden, n_routed_experts=E, num_experts_per_tok=K, n_group=G,
                           topk_group=KG, topk_method=method, routed_scaling_factor=16.0,
                           num_attention_heads=4, num_key_value_heads=4)
    router = DeepseekV2TopkRouter(cfg)
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, hidden, generator=gen) * 0.5)
        logits, hf_w, hf_ids = router(torch.randn(48, hidden, generator=gen))
    spec = moe_spec("softmax", method, norm=False, scale=16.0, hidden=hidden)
    w, ids = select_experts(logits, None, spec)
    got_w, got_ids = canonical(w, ids)
    want_w, want_ids = canonical(hf_w, hf_ids)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------- MoE experts


def loop_experts(hidden, weights, ids, w13, w2):
    inter = w13.shape[1] // 2
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        x = hidden[t].double()
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate = w13[e, :inter].double() @ x
            up = w13[e, inter:].double() @ x
            out[t] += float(weights[t, j]) * (w2[e].double() @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("dtype,tokens,experts", [
    (torch.float32, 40, 8), (torch.float32, 5, 16), (torch.float64, 12, 8), (torch.bfloat16, 24, 8)], ids=_id)
def test_compute_experts_matches_loop(dtype, tokens, experts):
    gen = torch.Generator().manual_seed(tokens * experts)
    hidden_size, inter, k = 32, 24, 3
    spec = moe_spec("softmax", "greedy", False, dtype=dtype, experts=experts, top_k=k, hidden=hidden_size, inter=inter)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * scale).to(dtype)
    hidden = rnd(tokens, hidden_size)
    w13 = rnd(experts, 2 * inter, hidden_size, scale=0.2)
    w2 = rnd(experts, hidden_size, inter, scale=0.2)
    weights, ids = select_experts(torch.randn(tokens, experts, generator=gen), None, spec)
    out = ReferenceMoE(spec).compute_experts(hidden, weights, ids, w13, w2)
    assert out.shape == hidden.shape and out.dtype == dtype
    want = loop_experts(hidden, weights, ids, w13, w2)
    atol, rtol = TOL[dtype]
    if dtype == torch.bfloat16:  # one bf16 rounding of the output and of the down GEMM's operand
        atol, rtol = 3e-2, 3e-2
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)


def test_compute_experts_empty_batch():
    spec = moe_spec("softmax", "greedy", False, experts=4, top_k=2, hidden=8, inter=4)
    out = ReferenceMoE(spec).compute_experts(
        torch.randn(0, 8), torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.int64),
        torch.randn(4, 8, 8), torch.randn(4, 8, 4))
    assert out.shape == (0, 8)


# ------------------------------------------------------------------------------------------ linear


def test_unquantized_linear():
    gen = torch.Generator().manual_seed(1)
    for bias in (False, True):
        method = UnquantizedLinear(LinearSpec(in_features=12, out_features=7, bias=bias, dtype=torch.float32))
        params = method.create_weights()
        assert params["weight"].shape == (7, 12) and params["weight"].dtype == torch.float32
        assert ("bias" in params) == bias and (not bias or params["bias"].shape == (7,))
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=gen))
        params = method.process_weights_after_loading(params)
        x = torch.randn(3, 5, 12, generator=gen)
        want = x @ params["weight"].T + (params["bias"] if bias else 0)
        torch.testing.assert_close(method.apply(params, x), want)


# ---------------------------------------------------------------------------------- communicators


def test_single_process_communicator():
    comm = SingleProcessCommunicator()
    x = torch.randn(3, 4)
    assert comm.world_size == 1 and comm.rank == 0
    assert comm.all_reduce(x) is x and comm.broadcast(x) is x
    assert torch.equal(comm.all_gather(x, dim=0), x)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, port: int, world: int) -> None:
    import torch.distributed as dist
    from dsserve.core import reference

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        for group in (None, dist.new_group(list(range(world)))):
            comm = reference.dsserve_communicator(device=None, group=group, rank=rank, world_size=world)
            assert isinstance(comm, TorchDistributedCommunicator)
            mine = lambda r: torch.arange(24, dtype=torch.float32).view(2, 3, 4) + 100 * r
            x = mine(rank)
            total = sum(mine(r) for r in range(world))
            assert torch.equal(comm.all_reduce(x.clone()), total)
            y = x.clone().transpose(0, 2)  # non-contiguous, reduced in place
            assert comm.all_reduce(y) is y and torch.equal(y, total.transpose(0, 2))
            for dim in (0, 1, -1):
                want = torch.cat([mine(r) for r in range(world)], dim=dim)
                assert torch.equal(comm.all_gather(x, dim=dim), want), dim
            for src in range(world):
                assert torch.equal(comm.broadcast(x.clone(), src=src), mine(src))
    finally:
        dist.destroy_process_group()


def test_torch_distributed_communicator_gloo():
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(_free_port(), 2), nprocs=2, join=True)


# ----------------------------------------------------------------------------------------- registry


class _DummyDevice(Device):
    name = "dummy"
    torch_type = "cpu"
    dist_backend = "gloo"

    def is_available(self):
        return True, ""

    def default_dtype(self):
        return torch.float32

    def memory_info(self):
        return 1 << 30, 1 << 30


def test_registry_falls_back_to_reference():
    from dsserve.core.plugins import DeviceError, PluginRegistry

    reg = PluginRegistry(load_entry_points=False)
    dev = _DummyDevice()
    assert isinstance(reg.attention_backend(dev, mla_spec(torch.float32, 4)), ReferenceMLAAttention)
    mha = AttentionSpec(kind="mha", num_heads=8, num_kv_heads=2, head_dim=16, v_head_dim=16, scale=0.25,
                        dtype=torch.float32)
    assert isinstance(reg.attention_backend(dev, mha), ReferenceMHAAttention)
    assert isinstance(reg.moe_backend(dev, moe_spec("sigmoid", "noaux_tc", True)), ReferenceMoE)
    assert isinstance(reg.linear_method(dev, LinearSpec(4, 4, False, torch.float32)), UnquantizedLinear)
    from dsserve.core.reference import ReferenceQuantizedLinear

    fp8 = LinearSpec(4, 4, False, torch.float32, quant="fp8_block")
    assert isinstance(reg.linear_method(dev, fp8), ReferenceQuantizedLinear)
    with pytest.raises(DeviceError):  # a scheme no plugin serves
        reg.linear_method(dev, LinearSpec(4, 4, False, torch.float32, quant="int8_w8a8"))
    assert isinstance(reg.communicator(dev, None, 0, 1), SingleProcessCommunicator)
    assert isinstance(reg.communicator(dev, None, 1, 2), TorchDistributedCommunicator)
    from dsserve.core.reference import ReferenceLayerOps

    assert isinstance(reg.layer_ops(dev), ReferenceLayerOps)
    info = {p.name: p for p in reg.plugins()}["reference"]
    assert info.devices == [] and info.hooks == ["attention", "communicator", "layer-ops", "linear", "moe"]
