"""dsserve.plugins.npu: Huawei Ascend NPUs through `torch_npu`.

What it provides, for the device name "npu" only:
* the `npu` device, and when it is unusable, why (torch_npu missing or failing to import, no NPU);
* attention: MHA/GQA by `torch_npu.npu_fused_infer_attention_score` over the paged cache
  (`kernels.NpuMHAAttention`); MLA by the torch reference (`kernels.NpuMLAAttention`, see
  kernels.py for why the op's MLA form does not fit dsserve's interleaved latent cache);
* MoE: `npu_moe_gating_top_k_softmax` routing (softmax + greedy; other methods by the reference's
  select_experts) and `npu_moe_init_routing` / `npu_grouped_matmul` / `npu_moe_finalize_routing`
  experts (`kernels.NpuMoE`);
* linear: unquantized GEMMs left to the reference (F.linear runs on the NPU); FP8 not served;
* collectives: the reference `TorchDistributedCommunicator` over torch.distributed's HCCL groups.
A spec the fused ops do not accept, or a machine where torch_npu cannot be imported, is answered
None with a reason logged once, so the reference serves it.

Verification: written from torch_npu's documentation only; NOTHING here has run on Ascend hardware
(no NPU is available to this project). The host-side argument builders are tested on CPU.

Importing this module does not import torch_npu: `is_available()` looks for it with
importlib.util.find_spec and imports it only then (the import registers torch.npu), and the
backends import it inside their calls.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch
from dsserve.core.backends import (
    AttentionBackend,
    AttentionSpec,
    Communicator,
    Device,
    LinearMethod,
    LinearSpec,
    MoEBackend,
    MoESpec,
)
from dsserve.core.hookspecs import hookimpl
from dsserve.core.reference import torch_communicator

from ..gpu import say_once

__all__ = ["NpuDevice"]

TORCH_NPU = "torch_npu"
DEVICE_NAME = "npu"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _torch_release() -> str:
    return torch.__version__.split("+")[0]


class NpuDevice(Device):
    """Ascend NPUs; tensors on torch's "npu" type (registered by torch_npu), process groups over HCCL."""

    name = "npu"
    torch_type = "npu"
    dist_backend = "hccl"
    priority = 100

    def is_available(self) -> tuple[bool, str]:
        if importlib.util.find_spec(TORCH_NPU) is None:
            return False, (f"torch_npu is not installed (pip install torch-npu matching torch "
                           f"{_torch_release()})")
        try:
            importlib.import_module(TORCH_NPU)
        except Exception as exc:  # noqa: BLE001 -- a CANN or torch mismatch surfaces as any kind of import error
            return False, (f"torch_npu failed to import: {type(exc).__name__}: {_first_line(str(exc))} "
                           f"(check CANN's set_env.sh is sourced and torch_npu matches torch "
                           f"{_torch_release()})")
        npu = getattr(torch, "npu", None)
        if npu is None or not npu.is_available():
            return False, ("no Ascend NPU visible (torch.npu.device_count() == 0; check "
                           "ASCEND_RT_VISIBLE_DEVICES)")
        return True, ""

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def memory_info(self) -> tuple[int, int]:
        free, total = torch.npu.mem_get_info(torch.npu.current_device())
        return int(free), int(total)

    def setup(self, local_rank: int = 0, ranks_on_node: int = 1) -> None:
        torch.npu.set_device(local_rank)

    def describe(self) -> str:
        ok, reason = self.is_available()
        if not ok:
            return f"npu: unavailable: {reason}"
        index = torch.npu.current_device()
        return f"npu: {torch.npu.get_device_name(index)}, {torch.npu.device_count()} visible; bfloat16"


@hookimpl
def dsserve_devices() -> list[Device]:
    return [NpuDevice()]


# ------------------------------------------------------------------------------------ backend hooks


def torch_npu_problem() -> str | None:
    """Why torch_npu's fused ops cannot be used in this process, or None."""
    if importlib.util.find_spec(TORCH_NPU) is None:
        return "torch_npu is not installed"
    try:
        importlib.import_module(TORCH_NPU)
    except Exception as exc:  # noqa: BLE001 -- any import failure means: let the reference serve
        return f"torch_npu failed to import ({type(exc).__name__}: {_first_line(str(exc))})"
    return None


def _usable(what: str) -> bool:
    problem = torch_npu_problem()
    if problem:
        say_once(f"npu: {what} by the torch reference ({problem})")
        return False
    return True


@hookimpl
def dsserve_attention_backend(device: Device, spec: AttentionSpec) -> AttentionBackend | None:
    if not _usable(f"{spec.kind} attention"):
        return None
    from .kernels import NpuMHAAttention, NpuMLAAttention

    if spec.kind == "mla":
        say_once("npu: MLA attention by the torch reference (the fused MLA form needs a split latent cache)")
        return NpuMLAAttention(spec)
    why = NpuMHAAttention.unsupported(spec)
    if why:
        say_once(f"npu: {spec.kind} attention by the torch reference (npu_fused_infer_attention_score: {why})")
        return None
    say_once("npu: MHA attention by npu_fused_infer_attention_score (PageAttention, BSND)")
    return NpuMHAAttention(spec)


@hookimpl
def dsserve_moe_backend(device: Device, spec: MoESpec) -> MoEBackend | None:
    if not _usable("MoE"):
        return None
    from .kernels import NpuMoE

    why = NpuMoE.unsupported(spec)
    if why:
        say_once(f"npu: MoE by the torch reference (fused MoE ops: {why})")
        return None
    if not NpuMoE.fused_gating(spec):
        say_once(f"npu: MoE routing {spec.scoring_func}/{spec.topk_method} by the reference select_experts")
    return NpuMoE(spec)


@hookimpl
def dsserve_linear_method(device: Device, spec: LinearSpec) -> LinearMethod | None:
    if spec.quant != "none":
        say_once(f"npu: {spec.quant} linear layers by the torch reference (not served by the npu plugin)")
    return None  # unquantized: the reference's F.linear runs on the NPU


@hookimpl
def dsserve_communicator(device: Device, group: object, rank: int, world_size: int) -> Communicator | None:
    """torch.distributed collectives over HCCL groups."""
    return torch_communicator(group, rank, world_size)
