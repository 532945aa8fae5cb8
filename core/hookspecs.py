"""The device contract: every hook a dsserve device plugin may implement.

A plugin is a module or object with functions marked `@dsserve.hookimpl`, registered through the
`dsserve.plugins` entry-point group. The backend hooks for a device are asked only of the plugins
whose `dsserve_devices` provide that device (and of plugins the user let override it, see
`dsserve.core.plugins`), so an implementation need not check `device.name`. pluggy asks them in turn
(the last registered first; `tryfirst=True` jumps the queue) and the first non-None answer wins; the
core's torch-native reference (`dsserve.core.reference`) answers last, so a plugin implements only
what it does better. Return None for a spec you do not serve.
"""
from __future__ import annotations

import pluggy

from .backends import (
    AttentionBackend,
    AttentionSpec,
    Communicator,
    Device,
    LayerOps,
    LinearMethod,
    LinearSpec,
    MoEBackend,
    MoESpec,
)

PROJECT = "dsserve"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def dsserve_devices() -> list[Device]:
    """Return the devices this plugin provides (possibly unavailable on this machine).

    Called once when the plugin manager starts; the results of all plugins are collected. Report a
    device even where its libraries are missing: `Device.is_available()` then says why. Importing
    the plugin module must not import device libraries (torch_npu, triton, ...); do that lazily.
    """


@hookspec(firstresult=True)
def dsserve_attention_backend(device: Device, spec: AttentionSpec) -> AttentionBackend | None:
    """Return an attention backend for `spec` on `device`, or None.

    For `spec.kind == "mla"` return an `MLAAttentionBackend`, for "mha" an `MHAAttentionBackend`.
    Called once per distinct spec when the model is built; the instance serves every layer with
    that spec and must keep no per-layer state. Return None for dtypes, head sizes or page sizes
    your kernels do not handle: the next plugin, and finally the reference, is asked.
    """


@hookspec(firstresult=True)
def dsserve_moe_backend(device: Device, spec: MoESpec) -> MoEBackend | None:
    """Return a `MoEBackend` doing routing (`select_experts`) and routed-expert compute
    (`compute_experts`) for `spec` on `device`, or None."""


@hookspec(firstresult=True)
def dsserve_linear_method(device: Device, spec: LinearSpec) -> LinearMethod | None:
    """Return the `LinearMethod` for `spec.quant` on `device` (how weights are created, repacked
    after loading and applied), or None when that scheme is not served here."""


@hookspec(firstresult=True)
def dsserve_layer_ops(device: Device) -> LayerOps | None:
    """Return the `LayerOps` (RMSNorm with the residual add, rotary embedding) for `device`, or None.

    Called once when the model is built; the instance serves every layer. Its ops fall back on the
    reference's for inputs the device's kernels do not handle (another dtype, say): a plugin that
    cannot serve some of them subclasses `dsserve.core.reference.ReferenceLayerOps`.
    """


@hookspec(firstresult=True)
def dsserve_communicator(device: Device, group: object, rank: int, world_size: int) -> Communicator | None:
    """Return a `Communicator` for tensor-parallel rank `rank` of `world_size`, or None to defer.

    `group` is the torch.distributed process group (None: the default group, or no group at all
    when world_size is 1). `broadcast(x, src)` takes `src` as a rank within that group.
    """
