"""The human listing behind `dsserve plugins`: every plugin, where it came from, the hook families it
implements, the devices it provides with their availability and default dtype, and the overrides
the user enabled.

Plain aligned text in at most `WIDTH` columns; the last column of a table wraps under itself.
"""
from __future__ import annotations

import textwrap

import torch

from .plugins import HOOK_FAMILIES, OVERRIDES_ENV, DeviceError, PluginRegistry, availability
from .table import table_lines

WIDTH = 100
_FAMILY_ORDER = list(HOOK_FAMILIES.values())


def _family_rank(family: str) -> int:
    """Hook families in the contract's order (devices first), not alphabetically."""
    return _FAMILY_ORDER.index(family) if family in _FAMILY_ORDER else len(_FAMILY_ORDER)


def _dtype_name(dtype: object) -> str:
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else str(dtype)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _availability(device) -> str:
    ok, reason = availability(device)  # a broken third-party plugin must not break the listing
    return "yes" if ok else f"no: {reason or 'unavailable (no reason given)'}"


def _default_dtype(device) -> str:
    try:
        return _dtype_name(device.default_dtype())
    except Exception as exc:
        return f"error ({type(exc).__name__})"


def render_plugins(registry: PluginRegistry) -> str:
    """The plugin and device tables as one string (no trailing newline)."""
    infos = registry.plugins()

    plugin_rows = []
    for info in infos:
        hooks = sorted(info.hooks, key=_family_rank)
        plugin_rows.append([info.name, info.source, ", ".join(hooks) or "-"])

    device_rows = []
    for info in infos:
        for device in info.devices:
            device_rows.append([
                getattr(device, "name", "?"),
                info.name,
                _default_dtype(device),
                _availability(device),
            ])

    lines = [f"plugins ({len(infos)})", ""]
    lines += table_lines(["PLUGIN", "SOURCE", "HOOKS"], plugin_rows, WIDTH)
    lines += ["", f"devices ({len(device_rows)})", ""]
    if device_rows:
        lines += table_lines(["DEVICE", "PLUGIN", "DTYPE", "AVAILABLE"], device_rows, WIDTH)
    else:
        lines.append("no plugin provides a device")

    try:
        chosen = registry.select_device(None)
        default = (f"default device: {chosen.name} (the available one with the highest priority; "
                   "override with --device)")
    except DeviceError as exc:
        default = f"default device: none ({_one_line(exc)})"
    overrides = ", ".join(f"{plugin}:{device}" for plugin, device in sorted(registry.overrides)) or "none"
    notes = [default, f"overrides of other plugins' devices: {overrides} (set with {OVERRIDES_ENV}=plugin:device)"]
    lines.append("")
    for note in notes:
        lines += textwrap.wrap(note, WIDTH, subsequent_indent="  ", break_on_hyphens=False)
    return "\n".join(lines)
