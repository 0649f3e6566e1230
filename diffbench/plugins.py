"""The plugin manager: loads entry points of the ``diffbench`` group and ``--plugin`` files,
and collects what their hooks register into a :class:`~diffbench.registry.Registry`."""
from __future__ import annotations

import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pluggy

from diffbench import hookspecs
from diffbench.registry import COMPONENT_CLASSES, KINDS, ConfigError, Registry, with_plugin

GROUP = "diffbench"


class PluginError(ConfigError):
    """A plugin could not be loaded or registered something invalid."""


def _entry_point_plugins():
    """Yield (plugin label, module) for every entry point in the group; raise naming the one that fails."""
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution"
        label = f"{ep.name} ({ep.value}, from {dist})"
        try:
            yield label, ep.load()
        except (Exception, SystemExit) as exc:  # a plugin's sys.exit() must not end diffbench
            raise PluginError(f"plugin {label} raised while loading: {type(exc).__name__}: {exc}") from exc


def load_file_plugin(path: str | Path):
    """Import a plugin module from a .py file (``--plugin path.py``)."""
    path = Path(path)
    if not path.is_file():
        raise PluginError(f"--plugin {path}: no such file")
    if path.suffix != ".py":
        raise PluginError(f"--plugin {path}: not a Python file (.py)")
    name = f"diffbench_file_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # SyntaxError, ImportError, a sys.exit() at import, ...
        raise PluginError(f"plugin file {path} raised while loading: {type(exc).__name__}: {exc}") from exc
    return module


def build_registry(extra_plugins=(), *, entry_points_too: bool = True) -> Registry:
    """Register every plugin's components. ``extra_plugins``: modules/objects or .py paths."""
    manager = pluggy.PluginManager(GROUP)
    manager.add_hookspecs(hookspecs)
    plugins = list(_entry_point_plugins()) if entry_points_too else []
    for plugin in extra_plugins:
        if isinstance(plugin, (str, Path)):
            plugins.append((f"file {plugin}", load_file_plugin(plugin)))
        else:
            plugins.append((getattr(plugin, "__name__", type(plugin).__name__), plugin))

    registry = Registry()
    for label, plugin in plugins:
        if not manager.is_registered(plugin):
            try:
                manager.register(plugin, name=label)
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"plugin {label}: {exc}") from exc
    for kind in KINDS:
        # Call each implementation on its own, in registration order (entry points first), so
        # that every component, and every error, is attributed to the plugin that registered it.
        for impl in getattr(manager.hook, f"register_{kind}").get_hookimpls():
            _call_hook(registry, kind, impl.plugin_name, impl.function)
    return registry


def _call_hook(registry: Registry, kind: str, label: str, hook) -> None:
    expected = COMPONENT_CLASSES[kind]

    def register(component):
        if not isinstance(component, expected):
            raise PluginError(f"plugin {label}: register_{kind} got {type(component).__name__}, expected {expected.__name__}")
        registry.add(with_plugin(component, label))

    try:
        hook(register=register)
    except PluginError:
        raise
    except ConfigError as exc:
        raise PluginError(f"plugin {label}: {exc}") from exc
    except (Exception, SystemExit) as exc:
        raise PluginError(f"plugin {label} raised in register_{kind}: {type(exc).__name__}: {exc}") from exc
