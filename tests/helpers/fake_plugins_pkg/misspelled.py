"""A hook implementation with a misspelled hook name."""

from opd_plugins import hookimpl


@hookimpl
def opd_regster_components():
    return []
