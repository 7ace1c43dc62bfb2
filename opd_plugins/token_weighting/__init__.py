"""Built-in token weightings (the kind's members arrive with the divergence-objectives work)."""

from opd_plugins import hookimpl
from opd_plugins.token_weighting.base import TokenWeighting


@hookimpl
def opd_register_components():
    return []


__all__ = ["TokenWeighting"]
