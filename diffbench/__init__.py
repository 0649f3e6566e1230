"""diffbench: a plugin-based benchmark suite for diffusion models.

Plugins implement the hooks in :mod:`diffbench.hookspecs`, marked with :data:`hookimpl`,
and are found through the ``diffbench`` entry-point group.
"""
import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("diffbench")
"""Marks a plugin's hook implementations: ``@diffbench.hookimpl def register_samplers(register): ...``"""

__all__ = ["hookimpl", "__version__"]
