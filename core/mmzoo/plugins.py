"""The plugin manager: finds plugins through the ``mmzoo`` entry-point group, once.

Switches (environment variables):

- ``MMZOO_PLUGINS=a,b``: load only these third-party plugins (built-ins always load).
- ``MMZOO_DISABLE_PLUGIN_AUTOLOAD=1``: load no third-party plugin, only built-ins.
- ``MMZOO_BLOCK_PLUGINS=a,b``: skip these plugins by name.

Built-ins are the entry points of the ``mmzoo`` distribution itself; they go through the
same hooks as everything else.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy

from mmzoo import hookspecs
from mmzoo_kernels import registry as kernel_registry
from mmzoo_kernels.registry import KernelImpl, KernelOp

GROUP = "mmzoo"
BUILTIN_DISTRIBUTION = "mmzoo"

hookimpl = pluggy.HookimplMarker(GROUP)


@dataclass
class PluginInfo:
    """What is known about one plugin: where it came from and whether it loaded."""

    name: str
    distribution: str
    version: str
    module: str
    builtin: bool
    hooks: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def label(self) -> str:
        """``name (distribution version)``, as used in messages."""
        return f"{self.name} ({self.distribution} {self.version})"


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


class PluginManager:
    """Loads plugins lazily and once; records provenance and load failures."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.failures: list[PluginInfo] = []
        self._loaded = False

    def load(self) -> None:
        """Import and register every enabled entry point; a broken one is reported, not fatal."""
        if self._loaded:
            return
        self._loaded = True
        only = _env_list("MMZOO_PLUGINS")
        blocked = set(_env_list("MMZOO_BLOCK_PLUGINS") or [])
        no_autoload = os.environ.get("MMZOO_DISABLE_PLUGIN_AUTOLOAD", "").lower() in ("1", "true", "yes")
        seen: set[str] = set()
        for ep in sorted(metadata.entry_points(group=GROUP), key=lambda e: e.name):
            if ep.name in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(ep.name)
            dist = ep.dist.metadata["Name"] if ep.dist is not None else "unknown"
            version = ep.dist.version if ep.dist is not None else "unknown"
            builtin = dist == BUILTIN_DISTRIBUTION
            if ep.name in blocked:
                continue
            if not builtin and (no_autoload or (only is not None and ep.name not in only)):
                continue
            info = PluginInfo(ep.name, dist, version, ep.value, builtin)
            try:
                module = importlib.import_module(ep.value)
            except Exception as exc:  # a broken plugin must not take the others down
                info.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                self.failures.append(info)
                print(f"mmzoo: plugin {info.label} failed to load: {info.error}", file=sys.stderr)
                continue
            self.register(module, info)
        if only is not None:
            missing = sorted(set(only) - seen)
            if missing:
                print(
                    f"mmzoo: MMZOO_PLUGINS names {', '.join(missing)}, which no installed "
                    f"distribution provides; installed: {', '.join(sorted(seen)) or 'none'}",
                    file=sys.stderr,
                )

    def register(self, module: ModuleType | object, info: PluginInfo) -> None:
        """Register a plugin object (a module or any object with hookimpls) under ``info.name``."""
        self.pm.register(module, name=info.name)
        info.hooks = sorted(
            caller.name
            for caller in self.pm.get_hookcallers(module) or []
            if caller.name.startswith("mmzoo_")
        )
        self.plugins[info.name] = info

    def hookimpls(self, hook_name: str) -> list[tuple[PluginInfo, Callable[..., Any]]]:
        """The implementations of one hook, each with the plugin that supplied it."""
        self.load()
        caller = getattr(self.pm.hook, hook_name)
        return [(self.plugins[impl.plugin_name], impl.function) for impl in caller.get_hookimpls()]


_manager: PluginManager | None = None


def get_manager() -> PluginManager:
    """The process-wide plugin manager (created on first use, plugins loaded lazily)."""
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


def reset() -> None:
    """Forget loaded plugins and everything registered from them (used by tests).

    The model registry notices the new manager by itself; the kernel registry is told.
    """
    global _manager
    _manager = None
    kernel_registry.reset()


def _collect_kernels(register: Callable[[KernelOp | KernelImpl, str], None]) -> None:
    """Every plugin's ``mmzoo_register_kernels``, each op and impl labelled with its plugin."""
    for plugin, hook in get_manager().hookimpls("mmzoo_register_kernels"):
        hook(register=lambda entry, _label=plugin.label: register(entry, _label))


# The kernels package imports nothing from mmzoo: the plugin manager hands it its implementations.
kernel_registry.set_collector(_collect_kernels)
