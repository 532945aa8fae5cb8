"""The plugin manager: finds device plugins, picks the device, resolves backends through the hooks.

A device's hooks are asked only of the plugins that provide that device (then of the reference):
installing a plugin for one device never changes what another device runs. A plugin that means to
replace an op of another plugin's device (a faster MoE kernel for `cpu`, say) does so only where
the user enables it: DSSERVE_PLUGIN_OVERRIDES=plugin:device[,plugin:device...].
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points

import pluggy

from . import hookspecs
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

ENTRY_POINT_GROUP = "dsserve.plugins"
DISABLE_ENV = "DSSERVE_DISABLE_PLUGINS"
OVERRIDES_ENV = "DSSERVE_PLUGIN_OVERRIDES"
_WARNED_ENV = "DSSERVE_DISABLE_PLUGINS_WARNED"  # the unknown names already warned about
REFERENCE_NAME = "reference"
log = logging.getLogger("dsserve")
HOOK_FAMILIES = {
    "dsserve_devices": "devices",
    "dsserve_attention_backend": "attention",
    "dsserve_moe_backend": "moe",
    "dsserve_linear_method": "linear",
    "dsserve_layer_ops": "layer-ops",
    "dsserve_communicator": "communicator",
}


class DeviceError(RuntimeError):
    """The requested device is unknown or unavailable; the message is meant for the user."""


@dataclass
class PluginInfo:
    name: str
    source: str  # "built-in, dsserve 0.1.0", "dsserve-plugin-example 1.0", or "registered in-process"
    devices: list[Device]
    hooks: list[str]


def availability(device: Device) -> tuple[bool, str]:
    """`device.is_available()`, with an exception from a faulty plugin turned into the reason."""
    try:
        ok, reason = device.is_available()
    except Exception as exc:
        detail = " ".join(str(exc).split())
        return False, f"is_available() raised {type(exc).__name__}" + (f": {detail}" if detail else "")
    return bool(ok), " ".join(str(reason).split())


class PluginRegistry:
    """Owns one pluggy PluginManager with the reference, the entry-point plugins and any extras."""

    def __init__(self, load_entry_points: bool = True, blocked: list[str] | None = None,
                 overrides: list[str] | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        if blocked is None:
            blocked = _env_list(DISABLE_ENV)
            _warn_unknown_disabled(blocked)
        for name in blocked:
            self.pm.set_blocked(name)
        self.overrides = _parse_overrides(_env_list(OVERRIDES_ENV) if overrides is None else overrides)
        self._providers: dict[str, set[str]] | None = None  # device name -> plugins providing it
        from . import reference

        self.pm.register(reference, name=REFERENCE_NAME)
        if load_entry_points:
            self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        self.pm.check_pending()

    # -- plugins
    def register(self, plugin: object, name: str | None = None) -> None:
        self.pm.register(plugin, name=name)
        self.pm.check_pending()
        self._providers = None

    def unregister(self, name: str) -> None:
        """Remove `name` and the overrides granted to it (it may be registered again)."""
        self.pm.unregister(name=name)
        self.overrides = {(p, d) for p, d in self.overrides if p != name}
        self._providers = None

    def block(self, name: str) -> None:
        """Unregister `name` and refuse it from now on."""
        self.pm.set_blocked(name)
        self._providers = None

    def plugins(self) -> list[PluginInfo]:
        dists = {id(p): d for p, d in self.pm.list_plugin_distinfo()}
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:  # blocked
                continue
            dist = dists.get(id(plugin))
            if dist is not None:
                own = dist.project_name == "dsserve"
                source = f"{'built-in, ' if own else ''}{dist.project_name} {dist.version}"
            elif name == REFERENCE_NAME:
                source = "built-in, dsserve core (torch-native reference)"
            else:
                source = "registered in-process"
            hooks = [
                HOOK_FAMILIES[c.name] for c in self.pm.get_hookcallers(plugin) or [] if c.name in HOOK_FAMILIES
            ]
            devices = plugin.dsserve_devices() if hasattr(plugin, "dsserve_devices") else []
            infos.append(PluginInfo(name, source, list(devices or []), sorted(hooks)))
        return infos

    # -- devices
    def devices(self) -> list[tuple[Device, str]]:
        """Every device any plugin provides, with the name of the plugin providing it."""
        out = []
        for info in self.plugins():
            out.extend((d, info.name) for d in info.devices)
        return out

    def select_device(self, name: str | None = None) -> Device:
        """The device named `name`, or the available device with the highest priority."""
        found = self.devices()
        if name in (None, "", "auto"):
            probed = [(d, availability(d)) for d, _ in found]
            usable = [d for d, (ok, _) in probed if ok]
            if not usable:
                raise DeviceError("no available device: " + "; ".join(
                    f"{d.name}: {reason}" for d, (_, reason) in probed) if found else "no device plugin is installed")
            return max(usable, key=lambda d: d.priority)
        matches = [(d, p) for d, p in found if d.name == name]
        if not matches:
            known = ", ".join(sorted({d.name for d, _ in found})) or "none"
            raise DeviceError(f"unknown device '{name}'; devices provided by installed plugins: {known}")
        reasons = []
        for device, plugin in matches:
            ok, reason = availability(device)
            if ok:
                return device
            reasons.append(f"device '{name}' (plugin '{plugin}') is unavailable: {reason}")
        raise DeviceError("; ".join(reasons))

    def allow_override(self, plugin: str, device: str) -> None:
        """Let `plugin` answer `device`'s hooks too (what DSSERVE_PLUGIN_OVERRIDES says)."""
        self.overrides.add((plugin, device))

    def plugins_for(self, device: Device) -> set[str]:
        """The plugins asked for `device`'s ops: those providing it, those the user let override it
        (DSSERVE_PLUGIN_OVERRIDES), and the reference."""
        if self._providers is None:
            self._providers = {}
            for d, plugin in self.devices():
                self._providers.setdefault(d.name, set()).add(plugin)
        overriding = {plugin for plugin, name in self.overrides if name == device.name}
        return self._providers.get(device.name, set()) | overriding | {REFERENCE_NAME}

    def _hook(self, name: str, device: Device):
        """Hook `name` as called for `device`: pluggy's caller without the other devices' plugins."""
        asked = self.plugins_for(device)
        others = [p for n, p in self.pm.list_name_plugin() if p is not None and n not in asked]
        return self.pm.subset_hook_caller(name, remove_plugins=others)

    # -- backends: the first plugin answering wins, the reference answers last
    def attention_backend(self, device: Device, spec: AttentionSpec) -> AttentionBackend:
        return _answer(self._hook("dsserve_attention_backend", device)(device=device, spec=spec), device,
                       f"{spec.kind} attention in {str(spec.dtype).removeprefix('torch.')}")

    def moe_backend(self, device: Device, spec: MoESpec) -> MoEBackend:
        return _answer(self._hook("dsserve_moe_backend", device)(device=device, spec=spec), device,
                       f"MoE experts with quantization '{spec.quant}'")

    def linear_method(self, device: Device, spec: LinearSpec) -> LinearMethod:
        return _answer(self._hook("dsserve_linear_method", device)(device=device, spec=spec), device,
                       f"quantization '{spec.quant}'")

    def layer_ops(self, device: Device) -> LayerOps:
        return _answer(self._hook("dsserve_layer_ops", device)(device=device), device, "layer ops (RMSNorm, rotary embedding)")

    def communicator(self, device: Device, group: object, rank: int, world_size: int) -> Communicator:
        caller = self._hook("dsserve_communicator", device)
        return _answer(caller(device=device, group=group, rank=rank, world_size=world_size),
                       device, f"collectives over {world_size} ranks")


def _env_list(name: str) -> list[str]:
    return [x.strip() for x in os.environ.get(name, "").split(",") if x.strip()]


def _warn_unknown_disabled(names: list[str]) -> None:
    """A name in DSSERVE_DISABLE_PLUGINS that no installed plugin has is likely a typo, and the plugin
    meant stays enabled: say so, with the names that would work. Once per process tree: the unknown
    names are noted in the environment, which the model worker processes inherit."""
    installed = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)} | {REFERENCE_NAME})
    unknown = [name for name in names if name not in installed]
    if not unknown or os.environ.get(_WARNED_ENV) == ",".join(unknown):
        return
    os.environ[_WARNED_ENV] = ",".join(unknown)
    log.warning("warning: %s: no installed plugin is named %s (installed plugins: %s)",
                DISABLE_ENV, " or ".join(f"'{name}'" for name in unknown), ", ".join(installed))


def _parse_overrides(entries: list[str]) -> set[tuple[str, str]]:
    """{(plugin, device)} from "plugin:device" entries."""
    pairs = set()
    for entry in entries:
        plugin, sep, device = entry.partition(":")
        if not sep or not plugin.strip() or not device.strip():
            raise DeviceError(f"{OVERRIDES_ENV}: '{entry}' is not PLUGIN:DEVICE (e.g. example:cpu)")
        pairs.add((plugin.strip(), device.strip()))
    return pairs


def _answer(backend, device: Device, what: str):
    if backend is None:
        raise DeviceError(f"no plugin serves {what} on device '{device.name}'")
    return backend


@lru_cache(maxsize=1)
def default_registry() -> PluginRegistry:
    """The process-wide registry: the reference plus every installed entry-point plugin."""
    return PluginRegistry()
