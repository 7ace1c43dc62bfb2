"""The project marker, the hook-implementation marker and the version: the bottom of the import graph.

``opd_plugins/__init__.py`` re-exports these; modules of the package import them from here, so that the package
root may import the plugin manager lazily without an import cycle.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

PROJECT = "opd"
hookimpl = pluggy.HookimplMarker(PROJECT)
"""Marker for hook implementations: ``@opd_plugins.hookimpl``."""

__all__ = ["PROJECT", "__version__", "hookimpl"]
