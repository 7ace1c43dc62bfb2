"""A function marked as a hook implementation without the opd_ prefix."""

from opd_plugins import hookimpl


@hookimpl
def register_components():
    return []
