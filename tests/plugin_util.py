"""Running the process-wide registry with a test plugin that serves cpu's ops for a while."""
from __future__ import annotations

import contextlib

from dsserve.core.plugins import PluginRegistry, default_registry


@contextlib.contextmanager
def serving_cpu(plugin: object, name: str):
    """`plugin` registered and let override cpu's hooks (as DSSERVE_PLUGIN_OVERRIDES=name:cpu would)
    inside the block; engines built there use its answers."""
    registry: PluginRegistry = default_registry()
    registry.register(plugin, name=name)
    registry.allow_override(name, "cpu")
    try:
        yield registry
    finally:
        registry.unregister(name)
