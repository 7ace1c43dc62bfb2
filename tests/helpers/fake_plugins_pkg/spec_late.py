"""Defines a new hook, opd_late_hook, that another plugin (loaded earlier) implements."""

import pluggy

hookspec = pluggy.HookspecMarker("opd")


@hookspec
def opd_late_hook(value: int) -> int:
    """A hook defined by a plugin.

    :param value: a number.
    :returns: the number, transformed.

    Called: by tests only.
    """
