"""opd_plugins: on-policy distillation, self-distillation and RLVR as composable plugins on TRL.

Nothing heavy is imported here: ``import opd_plugins`` must stay cheap so that ``opd-plugins validate``
and ``opd-plugins list`` answer in a moment.
"""

from __future__ import annotations

from opd_plugins.markers import PROJECT, __version__, hookimpl


def get_plugin_manager(*args, **kwargs):
    """Build a plugin manager (built-ins, entry points, extra modules). See :mod:`opd_plugins.manager`."""
    from opd_plugins.manager import get_plugin_manager as _get

    return _get(*args, **kwargs)


__all__ = ["__version__", "hookimpl", "get_plugin_manager", "PROJECT"]
