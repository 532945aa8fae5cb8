"""Linear methods: unquantized, and every quantized format of `dsserve.core.quant` (fp8_block,
int8_block, int8_channel, awq), each served by the device's plugins or left to the reference.

Each method goes through its whole life as the model loader drives it: `create_weights` (the
checkpoint's names and shapes, laid out as `param_block` says), the loader filling them in place,
`process_weights_after_loading`, then `apply` on activations of several leading shapes, and
`dequantized_weight` (the real weight, which MLA's absorbed projections use).
"""
from __future__ import annotations

import pytest
import torch
from dsserve.conformance.harness import (
    BOUNDS,
    DTYPES,
    ORACLE_DTYPE,
    Case,
    Context,
    Guarded,
    normalised_error,
    one_line,
)
from dsserve.core.backends import LinearMethod, LinearSpec
from dsserve.core.quant import weight_format
from dsserve.conformance.quant_common import QUANT_FORMATS, dequantize64, quantized_weight
from dsserve.core.reference import ReferenceQuantizedLinear, UnquantizedLinear

# leading shape of x, in_features, out_features, bias
UNQUANTIZED_SHAPES = {
    "m1": ((1,), 64, 48, False),
    "m33-bias": ((33,), 96, 128, True),
    "m2x5-bias": ((2, 5), 64, 80, True),
}
QUANT_SHAPES = {
    "m7": ((7,), 256, 384, False),
    "m1-partial-blocks-bias": ((1,), 200, 136, True),
    "m3x4": ((3, 4), 512, 256, False),
}
def _cases(shapes):
    for shape in shapes:
        for dtype in DTYPES:
            yield pytest.param(shape, dtype, id=f"{shape}-{dtype}")


def _create(ctx: Context, case: Case, method: LinearMethod) -> dict[str, torch.Tensor]:
    with case.calling("create_weights"), ctx.torch_device:  # the loader allocates on the device
        params = method.create_weights()
    if not isinstance(params, dict):
        case.fail(f"create_weights returned {type(params).__name__}, not a dict of tensors")
        case.done()
    return params


def _expect_param(case: Case, params: dict, name: str, shape: tuple, dtype_ok, dtype_text: str) -> bool:
    t = params.get(name)
    if not isinstance(t, torch.Tensor):
        case.fail(f"create_weights has no tensor '{name}' (it returned {sorted(params)})")
        return False
    if tuple(t.shape) != shape or not dtype_ok(t.dtype):
        case.fail(f"create_weights' '{name}' is {tuple(t.shape)} {t.dtype}, the checkpoint stores {shape} {dtype_text}")
        return False
    return True


def _check_layout(case: Case, method: LinearMethod, params: dict) -> None:
    """Every created tensor lies along the weight's axes (`param_dims`) in units of its `param_block`."""
    n, k = method.spec.out_features, method.spec.in_features
    for name, t in params.items():
        with case.calling(f"param_block({name!r})"):
            rows, cols = method.param_block(name)
        with case.calling(f"param_dims({name!r})"):
            dims = method.param_dims(name)
        sizes = (-(-n // rows), -(-k // cols) if cols else 1)
        want = sizes[:1] if t.dim() == 1 else (sizes if tuple(dims) == (0, 1) else sizes[::-1])
        if t.dim() not in (1, 2) or tuple(t.shape) != want:
            case.fail(f"create_weights' '{name}' is {tuple(t.shape)}, but param_block/param_dims say one element "
                      f"covers {rows}x{cols or 'all'} of the {n}x{k} weight along dims {tuple(dims)}, so {want}")


def _check_dequantized(case: Case, method: LinearMethod, params: dict, weight: torch.Tensor) -> None:
    """`dequantized_weight` gives back the real weight [out, in] (exactly, up to its dtype's rounding)."""
    with case.calling("dequantized_weight"):
        w = method.dequantized_weight(params)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(weight.shape) or not w.is_floating_point():
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        case.fail(f"dequantized_weight returned {shape}, not a floating {tuple(weight.shape)} tensor")
        return
    err = normalised_error(w, weight)
    bound = BOUNDS.get(w.dtype, BOUNDS[torch.float32])
    if not err <= bound:
        case.fail(f"dequantized_weight differs from the loaded weight: normalised error {err:.1e} > {bound:.0e}")


def _load_and_apply(ctx: Context, case: Case, method: LinearMethod, params: dict, values: dict,
                    x: torch.Tensor, out_features: int):
    dev, dtype = ctx.torch_device, method.spec.dtype
    for name, value in values.items():
        params[name].copy_(value.to(params[name].device))  # what the loader does
    with case.calling("process_weights_after_loading"):
        params = method.process_weights_after_loading(params)
    g_x = Guarded("x", x, dtype, dev)
    with case.calling("apply"):
        out = method.apply(params, g_x.tensor)
    g_x.check(case)
    ok = case.check_tensor("apply", out, (*x.shape[:-1], out_features), dtype, dev)
    return params, g_x, out if ok else None


@pytest.mark.parametrize("shape,dtype", list(_cases(UNQUANTIZED_SHAPES)))
def test_unquantized(ctx: Context, make_case, shape, dtype):
    lead, k, n, bias = UNQUANTIZED_SHAPES[shape]
    dt = DTYPES[dtype]
    case = make_case("linear", f"linear quant=none shape={shape} in={k} out={n} dtype={dtype}")
    case.note_dtype(dt)
    spec = LinearSpec(k, n, bias, dt)
    method = case.serve(ctx, "linear_method", expect=LinearMethod, spec=spec)
    params = _create(ctx, case, method)
    ok = _expect_param(case, params, "weight", (n, k), lambda d: d == dt, str(dt))
    if bias:
        ok &= _expect_param(case, params, "bias", (n,), lambda d: d == dt, str(dt))
    if not ok:
        case.done()
    gen = torch.Generator().manual_seed(case.seed)

    def rnd(*s, std=1.0):
        return (torch.randn(*s, generator=gen, dtype=ORACLE_DTYPE) * std).to(dt).to(ORACLE_DTYPE)

    values = {"weight": rnd(n, k, std=k ** -0.5)}
    if bias:
        values["bias"] = rnd(n, std=0.1)
    x = rnd(*lead, k)
    _check_layout(case, method, params)
    params, g_x, out = _load_and_apply(ctx, case, method, params, {m: v.to(dt) for m, v in values.items()}, x, n)
    _check_dequantized(case, method, params, values["weight"])
    if out is not None:
        want = x @ values["weight"].T + (values["bias"] if bias else 0)
        case.compare("", out, want, dt)
    ref = UnquantizedLinear(spec)
    ref_params = {m: v.to(ctx.torch_device, dt) for m, v in values.items()}
    case.timed(lambda: method.apply(params, g_x.tensor), lambda: ref.apply(ref_params, g_x.tensor), ctx.torch_device)
    case.done()


def _cases_quant():
    for fmt in QUANT_FORMATS:
        for shape in QUANT_SHAPES:
            for dtype in DTYPES:
                yield pytest.param(fmt, shape, dtype, id=f"{fmt}-{shape}-{dtype}")


@pytest.mark.parametrize("fmt,shape,dtype", list(_cases_quant()))
def test_quantized(ctx: Context, make_case, fmt, shape, dtype):
    lead, k, n, bias = QUANT_SHAPES[shape]
    block, bound = QUANT_FORMATS[fmt]
    dt = DTYPES[dtype]
    size = "" if block is None else (f" group={block[1]}" if fmt == "awq" else f" block={block[0]}x{block[1]}")
    case = make_case("linear", f"linear quant={fmt}{size} shape={shape} in={k} out={n} dtype={dtype}")
    case.note_dtype(dt)
    spec = LinearSpec(k, n, bias, dt, quant=fmt, weight_block_size=block)
    method = case.serve(ctx, "linear_method", expect=LinearMethod, spec=spec)
    params = _create(ctx, case, method)
    layouts = weight_format(fmt, block).tensors()
    ok = True
    for name, lay in layouts.items():
        want_dtype = lay.dtype
        # an 8-bit float weight may be kept in the device's own 8-bit float format (e4m3fnuz)
        dtype_ok = ((lambda d: d.is_floating_point and d.itemsize == 1) if want_dtype.is_floating_point
                    and want_dtype.itemsize == 1 else (lambda d, w=want_dtype: d == w))
        ok &= _expect_param(case, params, name, lay.shape(n, k), dtype_ok, str(want_dtype))
    if bias:
        ok &= _expect_param(case, params, "bias", (n,), lambda d: d == dt, str(dt))
    if not ok:
        case.done()
    gen = torch.Generator().manual_seed(case.seed)
    values = quantized_weight(fmt, block, n, k, gen)
    deq = dequantize64(fmt, block, values, n, k)
    b = None
    if bias:
        b = (torch.randn(n, generator=gen, dtype=ORACLE_DTYPE) * 0.1).to(dt)
        values["bias"] = b
    x = (torch.randn(*lead, k, generator=gen, dtype=ORACLE_DTYPE)).to(dt).to(ORACLE_DTYPE)
    _check_layout(case, method, params)
    try:
        params, g_x, out = _load_and_apply(ctx, case, method, params, values, x, n)
    except RuntimeError as exc:  # copying the stored tensors into the method's own formats failed
        case.fail(f"loading the {fmt} checkpoint tensors failed: {one_line(exc)}")
        case.done()
    _check_dequantized(case, method, params, deq)
    if out is not None:
        want = x @ deq.T + (b.to(ORACLE_DTYPE) if b is not None else 0)
        case.compare("against the dequantised weight", out, want, dt, bound)
    ref = ReferenceQuantizedLinear(spec)
    ref_params = {m: v.to(ctx.torch_device) for m, v in values.items()}
    case.timed(lambda: method.apply(params, g_x.tensor), lambda: ref.apply(ref_params, g_x.tensor), ctx.torch_device)
    case.done()
