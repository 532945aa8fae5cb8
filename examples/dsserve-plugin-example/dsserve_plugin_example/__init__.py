"""dsserve-plugin-example: what a third-party dsserve plugin looks like.

It registers through the "dsserve.plugins" entry point (see pyproject.toml) and does two things:

* adds a device, `example-cpu`, backed by the host CPU. For it this plugin serves the MoE backend
  only; every other hook returns None here, so dsserve's torch-native reference answers them;
* can override one op of another plugin's device: the MoE backend of `cpu`, where the user asks
  for it with DSSERVE_PLUGIN_OVERRIDES=example:cpu (dsserve asks a device's hooks only of the plugins
  providing it unless told so; `tryfirst=True` then puts this answer before the cpu plugin's).

Importing this module imports nothing beyond dsserve and torch, as a plugin for a device whose
library may be missing must: such imports go inside the hooks.
"""
from __future__ import annotations

from dsserve import hookimpl
from dsserve.core.backends import Device, MoEBackend, MoESpec

from .device import DEVICE_NAME, ExampleCpuDevice
from .moe import ReverseOrderMoE

__all__ = ["ExampleCpuDevice", "ReverseOrderMoE", "DEVICE_NAME"]


@hookimpl
def dsserve_devices() -> list[Device]:
    return [ExampleCpuDevice()]


@hookimpl(tryfirst=True)
def dsserve_moe_backend(device: Device, spec: MoESpec) -> MoEBackend | None:
    # Asked for example-cpu, and for cpu where the user enabled example:cpu.
    if spec.quant != "none":
        return None  # not ours: the next plugin (finally the reference) is asked
    return ReverseOrderMoE(spec)
