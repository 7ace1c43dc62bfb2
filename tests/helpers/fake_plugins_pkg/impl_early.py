"""Implements opd_late_hook, which spec_late (loaded after this module) defines."""

from opd_plugins import hookimpl


@hookimpl
def opd_late_hook(value):
    return value + 1
