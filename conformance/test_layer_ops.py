"""Layer ops: RMSNorm (plain, with the residual add fused, in place on strided rows) and rotary
embedding (interleaved pairs and halves, in place inside a wider tensor), against float64 math.

Inputs the op must not write are guarded (a write past a tensor lands on a sentinel); the residual,
`out` and the rotated tensor are the ones written, and the columns of the wider tensor around them
must come back unchanged.
"""
from __future__ import annotations

import pytest
import torch
from dsserve.conformance.harness import DTYPES, HOST, ORACLE_DTYPE, Context, Guarded
from dsserve.core.backends import LayerOps
from dsserve.core.reference import ReferenceLayerOps

EPS = 1e-6
# rows, dim: one decode row; a prefill chunk of a width no vector divides
NORM_SHAPES = {"rows1-dim1024": (1, 1024), "rows37-dim200": (37, 200)}


def _norm64(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(NORM_SHAPES))
def test_rms_norm(ctx: Context, make_case, shape, dtype):
    rows, dim = NORM_SHAPES[shape]
    dt, dev = DTYPES[dtype], ctx.torch_device
    case = make_case("layer-ops", f"layer-ops rms_norm shape={shape} dtype={dtype}")
    case.note_dtype(dt)
    ops = case.serve(ctx, "layer_ops", expect=LayerOps)
    gen = torch.Generator().manual_seed(case.seed)

    def rnd(*s, mean=0.0, std=1.0):
        return (mean + std * torch.randn(*s, generator=gen, dtype=ORACLE_DTYPE)).to(dt).to(ORACLE_DTYPE)

    x, residual, w = rnd(rows, dim, std=3.0), rnd(rows, dim), rnd(dim, mean=1.0, std=0.3)
    g_x, g_w = Guarded("x", x, dt, dev), Guarded("weight", w, dt, dev)
    with case.calling("rms_norm(x, weight, eps)"):
        out = ops.rms_norm(g_x.tensor, g_w.tensor, EPS)
    if case.check_tensor("rms_norm", out, (rows, dim), dt, dev):
        case.compare("rms_norm", out.to(HOST, ORACLE_DTYPE), _norm64(x, w), dt)

    g_res = Guarded("residual", residual, dt, dev)
    summed = (x.to(dt) + residual.to(dt)).to(ORACLE_DTYPE)   # the unfused add rounds to the dtype
    with case.calling("rms_norm(x, weight, eps, residual)"):
        out = ops.rms_norm(g_x.tensor, g_w.tensor, EPS, residual=g_res.tensor)
    if case.check_tensor("rms_norm with residual", out, (rows, dim), dt, dev):
        case.compare("rms_norm with residual", out.to(HOST, ORACLE_DTYPE), _norm64(summed, w), dt)
    case.compare("the residual after the fused add", g_res.tensor.to(HOST, ORACLE_DTYPE), summed, dt)
    g_res.check(case, in_place=True)

    wide = Guarded("x (columns of a wider tensor, normalised in place)",
                   torch.cat([x, residual[:, :8]], dim=1), dt, dev)
    part = wide.tensor[:, :dim]
    with case.calling("rms_norm(x, weight, eps, out=x) on strided rows"):
        ops.rms_norm(part, g_w.tensor, EPS, out=part)
    case.compare("rms_norm in place on strided rows", part.to(HOST, ORACLE_DTYPE), _norm64(x, w), dt)
    if not torch.equal(wide.tensor[:, dim:].to(HOST), residual[:, :8].to(dt)):
        case.fail("rms_norm in place changed the columns beside its rows")
    wide.check(case, in_place=True)
    for g in (g_x, g_w):
        g.check(case)
    case.timed(lambda: ops.rms_norm(g_x.tensor, g_w.tensor, EPS),
               lambda: ReferenceLayerOps().rms_norm(g_x.tensor, g_w.tensor, EPS), dev)
    case.done()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
def test_rotary(ctx: Context, make_case, interleaved, dtype):
    tokens, heads, nope, rope, table = 19, 3, 32, 64, 500
    dt, dev = DTYPES[dtype], ctx.torch_device
    layout = "interleaved" if interleaved else "halves"
    case = make_case("layer-ops", f"layer-ops rotary layout={layout} dtype={dtype}")
    case.note_dtype(dt)
    ops = case.serve(ctx, "layer_ops", expect=LayerOps)
    gen = torch.Generator().manual_seed(case.seed)
    q = torch.randn(tokens, heads, nope + rope, generator=gen, dtype=ORACLE_DTYPE).to(dt).to(ORACLE_DTYPE)
    angles = torch.outer(torch.arange(table, dtype=ORACLE_DTYPE),
                         10000.0 ** -(torch.arange(0, rope, 2, dtype=ORACLE_DTYPE) / rope))
    cos, sin = angles.cos().float(), angles.sin().float()
    positions = torch.randint(0, table, (tokens,), generator=gen)
    g_q = Guarded("q (its last 64 dims rotated in place)", q, dt, dev)
    with case.calling("rotary_(q[..., nope:], positions, cos, sin)"):
        ops.rotary_(g_q.tensor[..., nope:], positions.to(dev), cos.to(dev), sin.to(dev), interleaved)
    x, c, s = q[..., nope:], cos[positions].double().unsqueeze(1), sin[positions].double().unsqueeze(1)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        want = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    else:
        a, b = x.chunk(2, dim=-1)
        want = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    got = g_q.tensor.to(HOST, ORACLE_DTYPE)
    case.compare("rotary", got[..., nope:], want, dt)
    if not torch.equal(got[..., :nope], q[..., :nope]):
        case.fail("rotary changed the dims before the rotated ones")
    g_q.check(case, in_place=True)
    cos_d, sin_d, pos_d = cos.to(dev), sin.to(dev), positions.to(dev)
    case.timed(lambda: ops.rotary_(g_q.tensor[..., nope:], pos_d, cos_d, sin_d, interleaved),
               lambda: ReferenceLayerOps().rotary_(g_q.tensor[..., nope:], pos_d, cos_d, sin_d, interleaved), dev)
    case.done()
