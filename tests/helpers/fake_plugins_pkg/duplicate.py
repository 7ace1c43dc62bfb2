"""Registers a second 'reverse_kl': a duplicate of the built-in."""

from typing import ClassVar

from opd_plugins import hookimpl
from opd_plugins.divergences.reverse_kl import ReverseKL


class OtherReverseKL(ReverseKL):
    """Another reverse KL (test plugin)."""

    name: ClassVar[str] = "reverse_kl"


@hookimpl
def opd_register_components():
    return [OtherReverseKL]
