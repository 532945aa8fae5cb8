"""RMSNorm (with the fused residual add) and rotary embedding: the reference against float64 math,
and the cpu plugin's C++ kernels against the reference on random inputs, strided rows included."""
from __future__ import annotations

import pytest
import torch

from dsserve.core.reference import ReferenceLayerOps
from dsserve.models.layers.rotary import rope_inv_freq
from dsserve.plugins.cpu import native
from dsserve.plugins.cpu.layer_ops import CpuLayerOps

needs_kernels = pytest.mark.skipif(native.isa() is None or native.kernels() is None,
                                   reason="no AVX2/FMA on this CPU or no C++ toolchain: the reference serves")
# one rounding of the result to the dtype (bfloat16: 2^-8 relative), plus float32 sums in another order
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}
DTYPES = [torch.float32, torch.bfloat16]


def _norm64(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x, w = x.double(), w.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotary64(x: torch.Tensor, positions: torch.Tensor, cos, sin, interleaved: bool) -> torch.Tensor:
    x, c, s = x.double(), cos[positions].double().unsqueeze(1), sin[positions].double().unsqueeze(1)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * c - b * s, b * c + a * s), dim=-1)


def _tables(dim: int, positions: int = 300):
    inv_freq, _ = rope_inv_freq(dim, 10000.0, None)
    freqs = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def _ops():
    return [pytest.param(ReferenceLayerOps(), id="reference"),
            pytest.param("cpu", id="cpu", marks=needs_kernels)]


def _make(ops):
    return CpuLayerOps(native.kernels()) if ops == "cpu" else ops


@pytest.mark.parametrize("ops", _ops())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 1024), (37, 512), (5, 100)])
def test_rms_norm_is_the_float64_norm(ops, dtype, rows, dim):
    ops, g = _make(ops), torch.Generator().manual_seed(rows * dim)
    x = (torch.randn(rows, dim, generator=g) * 3).to(dtype)
    w = (1 + 0.3 * torch.randn(dim, generator=g)).to(dtype)
    out = ops.rms_norm(x, w, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), _norm64(x, w, 1e-6), **TOL[dtype])


@pytest.mark.parametrize("ops", _ops())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 40])
def test_rms_norm_adds_the_residual_in_place_first(ops, dtype, rows):
    ops, g = _make(ops), torch.Generator().manual_seed(rows)
    x, residual = (torch.randn(rows, 256, generator=g).to(dtype) for _ in range(2))
    w = (1 + 0.3 * torch.randn(256, generator=g)).to(dtype)
    summed = x + residual  # rounded to the dtype, as the unfused add is
    out = ops.rms_norm(x, w, 1e-5, residual=residual)
    assert torch.equal(residual, summed)
    torch.testing.assert_close(out.double(), _norm64(summed, w, 1e-5), **TOL[dtype])


@pytest.mark.parametrize("ops", _ops())
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_in_place_on_strided_rows(ops, dtype):
    """MLA's latent: the first 96 columns of a 128-wide projection normalised where they are."""
    ops, g = _make(ops), torch.Generator().manual_seed(3)
    wide = torch.randn(9, 128, generator=g).to(dtype)
    before, c = wide.clone(), wide[:, :96]
    w = (1 + 0.3 * torch.randn(96, generator=g)).to(dtype)
    assert ops.rms_norm(c, w, 1e-6, out=c).data_ptr() == c.data_ptr()
    torch.testing.assert_close(wide[:, :96].double(), _norm64(before[:, :96], w, 1e-6), **TOL[dtype])
    assert torch.equal(wide[:, 96:], before[:, 96:])


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_rms_norm_rounds_as_the_reference(dtype):
    g = torch.Generator().manual_seed(4)
    x, residual = (torch.randn(64, 1024, generator=g).to(dtype) for _ in range(2))
    w = (1 + 0.3 * torch.randn(1024, generator=g)).to(dtype)
    r_ref, r_cpu = residual.clone(), residual.clone()
    want = ReferenceLayerOps().rms_norm(x, w, 1e-6, residual=r_ref)
    got = CpuLayerOps(native.kernels()).rms_norm(x, w, 1e-6, residual=r_cpu)
    assert torch.equal(r_cpu, r_ref)
    if dtype == torch.float32:  # sums of 1024 squares in another order
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    else:  # both round a float32 result once: at most one unit in the last place apart
        assert ((got.double() - want.double()).abs() <= 2.0 ** -7 * want.double().abs()).all()


@pytest.mark.parametrize("ops", _ops())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
def test_rotary_in_place_is_the_float64_rotation(ops, dtype, interleaved):
    ops, g = _make(ops), torch.Generator().manual_seed(int(interleaved))
    cos, sin = _tables(64)
    # q's rope part: the last 64 of 192 dims of each of 4 heads, rotated inside q
    q = torch.randn(21, 4, 192, generator=g).to(dtype)
    before = q.clone()
    positions = torch.randint(0, 300, (21,), generator=g)
    ops.rotary_(q[..., 128:], positions, cos, sin, interleaved)
    torch.testing.assert_close(q[..., 128:].double(), _rotary64(before[..., 128:], positions, cos, sin, interleaved),
                               **TOL[dtype])
    assert torch.equal(q[..., :128], before[..., :128])


@needs_kernels
def test_cpu_rotary_refuses_a_position_outside_its_table():
    cos, sin = _tables(8, positions=10)
    with pytest.raises(RuntimeError, match="position 10 is outside the rotary table of 10"):
        CpuLayerOps(native.kernels()).rotary_(torch.randn(2, 1, 8), torch.tensor([3, 10]), cos, sin, True)


@needs_kernels
def test_cpu_layer_ops_hand_other_dtypes_to_the_reference():
    ops, x = CpuLayerOps(native.kernels()), torch.randn(3, 16, dtype=torch.float16)
    w = torch.ones(16, dtype=torch.float16)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), ReferenceLayerOps().rms_norm(x, w, 1e-6))
