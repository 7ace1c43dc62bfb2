"""Registers a malformed component (CamelCase name, no docstring)."""

from typing import ClassVar

from opd_plugins import hookimpl
from opd_plugins.divergences.base import Divergence


class Bad(Divergence):
    name: ClassVar[str] = "BadName"


Bad.__doc__ = None


@hookimpl
def opd_register_components():
    return [Bad]
