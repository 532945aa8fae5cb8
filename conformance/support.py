"""`dsserve conformance --device X --support`: which hook families and dtypes the device's plugins
implement, found by asking the hooks for representative specs. Nothing is run."""
from __future__ import annotations

from typing import Callable

import torch

from dsserve.core.backends import LinearSpec, MoESpec
from dsserve.core.plugins import DeviceError, PluginRegistry
from dsserve.core.table import table_lines

from .attention_common import FP8_CACHE_DTYPE, PAGE_SIZES, make_spec
from .harness import DTYPES, Context, class_path, dtype_name, is_reference, make_context, one_line
from .quant_common import QUANT_FORMATS
from .runner import describe_device


def _moe(dtype: torch.dtype, quant: str = "none", block: tuple[int, int] | None = None) -> MoESpec:
    return MoESpec(num_experts=8, top_k=2, hidden_size=256, intermediate_size=128, scoring_func="sigmoid",
                   topk_method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True,
                   routed_scaling_factor=2.5, dtype=dtype, quant=quant, weight_block_size=block)


def _format(fmt: str, block: tuple[int, int] | None) -> str:
    """How a case names a weight format: quant=fp8_block 128x128, quant=awq group 128."""
    if block is None:
        return f"quant={fmt}"
    return f"quant={fmt} " + (f"group {block[1]}" if fmt == "awq" else f"{block[0]}x{block[1]}")


# Cases whose hook arguments name no dtype, asked once ("-" in the DTYPES column): the communicators,
# and the 8-bit caches, whose spec names the cache's dtype only (a backend that takes one takes any
# query dtype).
_DTYPE_FREE = ("communicator", "kv_cache=")


def _questions() -> list[tuple[str, str, str, Callable[[torch.dtype], dict]]]:
    """(family, case, hook, dtype -> hook keyword arguments)."""
    qs = []
    for kind, shape in (("mla", "small"), ("mha", "gqa")):
        for page in PAGE_SIZES:
            qs.append(("attention", f"{kind} page_size={page}", "attention_backend",
                       lambda dt, k=kind, s=shape, p=page: {"spec": make_spec(k, s, dt, p)}))
        qs.append(("attention", f"{kind} page_size={PAGE_SIZES[-1]} kv_cache={dtype_name(FP8_CACHE_DTYPE)}",
                   "attention_backend",
                   lambda dt, k=kind, s=shape: {"spec": make_spec(k, s, FP8_CACHE_DTYPE, PAGE_SIZES[-1])}))
    formats = [("none", None)] + [(fmt, block) for fmt, (block, _) in QUANT_FORMATS.items()]
    for fmt, block in formats:
        qs.append(("moe", _format(fmt, block), "moe_backend", lambda dt, f=fmt, b=block: {"spec": _moe(dt, f, b)}))
    for fmt, block in formats:
        qs.append(("linear", _format(fmt, block), "linear_method", lambda dt, f=fmt, b=block: {
            "spec": LinearSpec(256, 256, False, dt, quant=f, weight_block_size=b)}))
    for world in (1, 2):
        qs.append(("communicator", f"world_size={world}", "communicator",
                   lambda dt, w=world: {"group": None, "rank": 0, "world_size": w}))
    return qs


def _ask(ctx: Context, hook: str, kwargs: dict) -> tuple[str, str]:
    """(who answers: "plugin" (an implementation of the device's plugins) / "reference" (one of the
    core's reference classes, whoever returned it) / "nobody" / "error", implementation)."""
    try:
        full = getattr(ctx.registry, hook)(device=ctx.device, **kwargs)
    except DeviceError:
        return "nobody", "-"
    except Exception as exc:  # a plugin's hook raised: report it, do not stop the listing
        return "error", f"{type(exc).__name__}: {one_line(exc)[:80]}"
    impl = class_path(full)
    return ("reference" if is_reference(impl) else "plugin"), impl


def support_report(device_name: str | None = None, registry: PluginRegistry | None = None) -> str:
    ctx = make_context(device_name, registry, None)
    rows, served = [], set()
    for family, case, hook, kwargs_for in _questions():
        dtypes = ["-"] if any(word in f"{family} {case}" for word in _DTYPE_FREE) else list(DTYPES)
        answers: dict[tuple[str, str], list[str]] = {}
        for name in dtypes:
            kwargs = kwargs_for(DTYPES.get(name, torch.float32))
            who, impl = _ask(ctx, hook, kwargs)
            answers.setdefault((who, impl), []).append(name)
            if who == "plugin" and name != "-":
                served.add(name)
        for (who, impl), names in answers.items():
            rows.append([family, case, " ".join(names), who, impl])
    lines = [describe_device(ctx), ""]
    lines += table_lines(["HOOK FAMILY", "CASE", "DTYPES", "ANSWERED BY", "IMPLEMENTATION"], rows, 140)
    lines.append("")
    order = [n for n in DTYPES if n in served]
    lines.append("dtypes the device's plugins serve for some hook: " + (", ".join(order) or "none")
                 + ". ANSWERED BY 'plugin': an implementation of the device's plugins (the conformance suite "
                   "checks it); 'reference': one of the core's torch-native reference classes, whether a plugin "
                   "returns it or leaves the hook to the fallback; 'nobody': nothing serves it, so a model "
                   "needing it cannot run on this device.")
    return "\n".join(lines)
