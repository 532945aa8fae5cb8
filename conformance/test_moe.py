"""MoE backends: expert routing (`select_experts`) and routed-expert compute (`compute_experts`).

Routing is discrete: the chosen expert sets must equal the reference's exactly. The router logits are
drawn so that no row has a near-tie at any boundary the routing decides on (the k-th best expert, the
kept groups), so a correct implementation cannot legitimately differ. The weights must be close.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from dsserve.conformance.harness import (
    BOUNDS,
    DTYPES,
    HOST,
    ORACLE_DTYPE,
    Case,
    Context,
    Guarded,
    dtype_name,
)
from dsserve.conformance.quant_common import QUANT_FORMATS, dequantize64, quantized_weight
from dsserve.core.backends import MoEBackend, MoESpec
from dsserve.core.reference import ReferenceMoE, select_experts

ROUTINGS = [(scoring, method, norm) for scoring in ("softmax", "sigmoid")
            for method in ("greedy", "group_limited_greedy", "noaux_tc") for norm in (False, True)]
# tokens, experts, top-k, groups, groups kept
ROUTING_SHAPES = {
    "e8-k2": (33, 8, 2, 4, 2),     # dsserve-tiny's router
    "e64-k6": (48, 64, 6, 8, 3),   # DeepSeek-V2-Lite-like
    "e256-k8": (16, 256, 8, 8, 4),  # DeepSeek-V3's router
}
# tokens, experts, top-k, hidden, intermediate
COMPUTE_SHAPES = {
    "t1-e8": (1, 8, 2, 64, 32),
    "t37-e16": (37, 16, 6, 64, 48),
    "t128-e32": (128, 32, 8, 128, 64),
}
# The routed experts round more often than one GEMM does (the activation between the two GEMMs, each
# expert's output before the weighted sum), so bfloat16 gets more room: the reference itself reaches
# about 2.5e-5 here.
COMPUTE_BOUNDS = {**BOUNDS, torch.bfloat16: 3e-4}
# A row is used only if every routing decision in it wins by this much (relative to the row's
# largest score): far above float32 rounding, so the expected expert set is unambiguous.
MARGIN = 1e-3


def moe_spec(experts, top_k, groups, kept, scoring, method, norm, dtype, hidden=64, inter=32) -> MoESpec:
    return MoESpec(num_experts=experts, top_k=top_k, hidden_size=hidden, intermediate_size=inter,
                   scoring_func=scoring, topk_method=method, n_group=groups, topk_group=kept,
                   norm_topk_prob=norm, routed_scaling_factor=2.5, dtype=dtype)


def routing_margin(logits: torch.Tensor, bias: torch.Tensor | None, spec: MoESpec) -> torch.Tensor:
    """Per row, the smallest lead (relative) of a chosen group or expert over the first one left out."""
    x = logits.to(ORACLE_DTYPE)
    scores = x.softmax(dim=-1) if spec.scoring_func == "softmax" else x.sigmoid()
    choice = scores + bias.to(ORACLE_DTYPE) if (spec.topk_method == "noaux_tc" and bias is not None) else scores
    tokens, experts = choice.shape
    scale = choice.abs().amax(dim=-1)
    gaps = []
    if spec.topk_method != "greedy" and spec.n_group > 1 and spec.topk_group < spec.n_group:
        grouped = choice.view(tokens, spec.n_group, -1)
        if spec.topk_method == "group_limited_greedy":
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        ordered = group_scores.sort(dim=-1, descending=True)
        gaps.append(ordered.values[:, spec.topk_group - 1] - ordered.values[:, spec.topk_group])
        keep = torch.zeros(tokens, spec.n_group, dtype=torch.bool)
        keep.scatter_(1, ordered.indices[:, :spec.topk_group], True)
        choice = choice.masked_fill(~keep.repeat_interleave(experts // spec.n_group, dim=1), float("-inf"))
    ordered = choice.sort(dim=-1, descending=True).values
    if torch.isfinite(ordered[:, spec.top_k]).all():
        gaps.append(ordered[:, spec.top_k - 1] - ordered[:, spec.top_k])
    return torch.stack(gaps, dim=-1).amin(dim=-1) / scale


def untied_logits(spec: MoESpec, tokens: int, bias: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """[tokens, E] float32 router logits whose rows all have a clear routing."""
    rows = []
    while sum(r.shape[0] for r in rows) < tokens:
        cand = torch.randn(4 * tokens, spec.num_experts, generator=gen) * 2
        rows.append(cand[routing_margin(cand, bias, spec) > MARGIN])
    return torch.cat(rows)[:tokens]


def by_expert(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by expert id: routings compare as sets (the order within a row is free)."""
    ids_sorted, order = ids.to(HOST, torch.int64).sort(dim=-1)
    return weights.to(HOST).gather(1, order), ids_sorted


def routing_cases():
    for shape in ROUTING_SHAPES:
        for scoring, method, norm in ROUTINGS:
            yield pytest.param(shape, scoring, method, norm, id=f"{shape}-{scoring}-{method}-norm{int(norm)}")


@pytest.mark.parametrize("shape,scoring,method,norm", list(routing_cases()))
def test_select_experts(ctx: Context, make_case, shape, scoring, method, norm):
    tokens, experts, top_k, groups, kept = ROUTING_SHAPES[shape]
    dtype = ctx.default_dtype()
    case = make_case("moe", f"moe select_experts scoring={scoring} method={method} norm_topk_prob={norm} "
                            f"shape={shape} dtype={dtype_name(dtype)}")
    spec = moe_spec(experts, top_k, groups, kept, scoring, method, norm, dtype)
    backend = case.serve(ctx, "moe_backend", expect=MoEBackend, spec=spec)
    check_routing(ctx, case, backend, spec, tokens)


def check_routing(ctx: Context, case: Case, backend: MoEBackend, spec: MoESpec, tokens: int) -> None:
    dev = ctx.torch_device
    gen = torch.Generator().manual_seed(case.seed)
    bias = torch.randn(spec.num_experts, generator=gen) * 0.1 if spec.topk_method == "noaux_tc" else None
    logits = untied_logits(spec, tokens, bias, gen)
    g_logits = Guarded("router_logits", logits, torch.float32, dev)
    g_bias = Guarded("correction_bias", bias, torch.float32, dev) if bias is not None else None
    args = (g_logits.tensor, g_bias.tensor if g_bias else None)

    with case.calling("select_experts"):
        out = backend.select_experts(*args)
    for g in (g_logits, g_bias):
        if g is not None:
            g.check(case)
    if not (isinstance(out, tuple) and len(out) == 2):
        case.fail(f"select_experts returned {type(out).__name__}, not (topk_weights, topk_ids)")
        case.done()
    weights, ids = out
    shape = (tokens, spec.top_k)
    ok = case.check_tensor("select_experts topk_weights", weights, shape, torch.float32, dev)
    ok &= case.check_tensor("select_experts topk_ids", ids, shape, torch.int64, dev)
    if ok:
        want_w, want_ids = by_expert(*select_experts(logits, bias, spec))
        got_w, got_ids = by_expert(weights, ids)
        wrong = (got_ids != want_ids).any(dim=-1)
        if bool(wrong.any()):
            t = int(wrong.nonzero()[0])
            case.fail(f"chose other experts than the reference for {int(wrong.sum())} of {tokens} tokens "
                      f"(token {t}: {got_ids[t].tolist()} instead of {want_ids[t].tolist()})")
        else:
            case.compare("topk_weights", got_w, want_w, torch.float32)
    ref = ReferenceMoE(spec)
    case.timed(lambda: backend.select_experts(*args), lambda: ref.select_experts(*args), dev)
    case.done()


def compute_cases():
    for shape in COMPUTE_SHAPES:
        for dtype in DTYPES:
            yield pytest.param(shape, dtype, id=f"{shape}-{dtype}")


@pytest.mark.parametrize("shape,dtype", list(compute_cases()))
def test_compute_experts(ctx: Context, make_case, shape, dtype):
    tokens, experts, top_k, hidden, inter = COMPUTE_SHAPES[shape]
    case = make_case("moe", f"moe compute_experts shape={shape} dtype={dtype}")
    spec = moe_spec(experts, top_k, 1, 1, "sigmoid", "greedy", True, DTYPES[dtype], hidden, inter)
    backend = case.serve(ctx, "moe_backend", expect=MoEBackend, spec=spec)
    check_compute(ctx, case, backend, spec, tokens)


def check_compute(ctx: Context, case: Case, backend: MoEBackend, spec: MoESpec, tokens: int) -> None:
    dev, dtype = ctx.torch_device, spec.dtype
    case.note_dtype(dtype)
    gen = torch.Generator().manual_seed(case.seed)
    E, k, D, inter = spec.num_experts, spec.top_k, spec.hidden_size, spec.intermediate_size

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=ORACLE_DTYPE) * std).to(dtype).to(ORACLE_DTYPE)

    hidden = rnd(tokens, D)
    w13 = rnd(E, 2 * inter, D, std=D ** -0.5)
    w2 = rnd(E, D, inter, std=inter ** -0.5)
    # Distinct experts per token, skewed so that some experts get many tokens and some none.
    skew = torch.rand(tokens, E, generator=gen) * torch.linspace(1.0, 3.0, E)
    ids = skew.argsort(dim=-1, descending=True)[:, :k].contiguous()
    weights = torch.rand(tokens, k, generator=gen) + 0.1

    with case.calling("process_weights_after_loading"):
        w13_served, w2_served = backend.process_weights_after_loading(w13.to(dev, dtype), w2.to(dev, dtype))
    guarded = [Guarded("hidden", hidden, dtype, dev), Guarded("topk_weights", weights, torch.float32, dev),
               Guarded("topk_ids", ids, torch.int64, dev), Guarded("w13", w13_served, w13_served.dtype, dev),
               Guarded("w2", w2_served, w2_served.dtype, dev)]
    args = [g.tensor for g in guarded]
    with case.calling("compute_experts"):
        out = backend.compute_experts(*args)
    for g in guarded:
        g.check(case)
    if case.check_tensor("compute_experts", out, (tokens, D), dtype, dev):
        oracle = ReferenceMoE(replace(spec, dtype=ORACLE_DTYPE)).compute_experts(hidden, weights, ids, w13, w2)
        case.compare("", out, oracle, dtype, COMPUTE_BOUNDS[dtype])
    ref, ref_args = ReferenceMoE(spec), [*args[:3], w13.to(dev, dtype), w2.to(dev, dtype)]
    case.timed(lambda: backend.compute_experts(*args), lambda: ref.compute_experts(*ref_args), dev)
    case.done()


# tokens, experts, top-k, hidden, intermediate: the block formats' 128x128 blocks cover several rows
# of both gate and up here; the merged weight is quantized as one, as the checkpoint's merged scales
# describe it
QUANT_COMPUTE_SHAPES = {"t1-e8": (1, 8, 2, 128, 64), "t37-e16": (37, 16, 6, 256, 128)}


def quant_compute_cases():
    for fmt in QUANT_FORMATS:
        for shape in QUANT_COMPUTE_SHAPES:
            for dtype in DTYPES:
                yield pytest.param(fmt, shape, dtype, id=f"{fmt}-{shape}-{dtype}")


@pytest.mark.parametrize("fmt,shape,dtype", list(quant_compute_cases()))
def test_compute_quantized_experts(ctx: Context, make_case, fmt, shape, dtype):
    """Experts stored quantized (dicts of the format's tensors stacked over experts) against the
    dequantised experts computed in float64, with the format's bound for its activation rounding."""
    tokens, experts, top_k, hidden_size, inter = QUANT_COMPUTE_SHAPES[shape]
    block, bound = QUANT_FORMATS[fmt]
    dt = DTYPES[dtype]
    case = make_case("moe", f"moe compute_experts quant={fmt} shape={shape} dtype={dtype}")
    case.note_dtype(dt)
    spec = replace(moe_spec(experts, top_k, 1, 1, "sigmoid", "greedy", True, dt, hidden_size, inter),
                   quant=fmt, weight_block_size=block)
    backend = case.serve(ctx, "moe_backend", expect=MoEBackend, spec=spec)
    dev = ctx.torch_device
    gen = torch.Generator().manual_seed(case.seed)
    stored13 = [quantized_weight(fmt, block, 2 * inter, hidden_size, gen) for _ in range(experts)]
    stored2 = [quantized_weight(fmt, block, hidden_size, inter, gen) for _ in range(experts)]
    w13 = {name: torch.stack([s[name] for s in stored13]) for name in stored13[0]}
    w2 = {name: torch.stack([s[name] for s in stored2]) for name in stored2[0]}
    deq13 = torch.stack([dequantize64(fmt, block, s, 2 * inter, hidden_size) for s in stored13])
    deq2 = torch.stack([dequantize64(fmt, block, s, hidden_size, inter) for s in stored2])
    hidden = torch.randn(tokens, hidden_size, generator=gen, dtype=ORACLE_DTYPE).to(dt).to(ORACLE_DTYPE)
    skew = torch.rand(tokens, experts, generator=gen) * torch.linspace(1.0, 3.0, experts)
    ids = skew.argsort(dim=-1, descending=True)[:, :top_k].contiguous()
    weights = torch.rand(tokens, top_k, generator=gen) + 0.1
    with case.calling("process_weights_after_loading"):
        w13_served, w2_served = backend.process_weights_after_loading(
            {k: v.to(dev) for k, v in w13.items()}, {k: v.to(dev) for k, v in w2.items()})
    guarded = [Guarded("hidden", hidden, dt, dev), Guarded("topk_weights", weights, torch.float32, dev),
               Guarded("topk_ids", ids, torch.int64, dev)]
    args = [g.tensor for g in guarded]
    with case.calling("compute_experts"):
        out = backend.compute_experts(*args, w13_served, w2_served)
    for g in guarded:
        g.check(case)
    if case.check_tensor("compute_experts", out, (tokens, hidden_size), dt, dev):
        oracle_spec = replace(spec, dtype=ORACLE_DTYPE, quant="none", weight_block_size=None)
        oracle = ReferenceMoE(oracle_spec).compute_experts(hidden, weights, ids, deq13, deq2)
        case.compare("against the dequantised experts", out, oracle, dt, bound or COMPUTE_BOUNDS[dt])
    ref = ReferenceMoE(spec)
    ref13, ref2 = ({k: v.to(dev) for k, v in w.items()} for w in (w13, w2))
    case.timed(lambda: backend.compute_experts(*args, w13_served, w2_served),
               lambda: ref.compute_experts(*args, ref13, ref2), dev)
    case.done()
