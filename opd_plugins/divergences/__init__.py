"""Built-in divergence objectives."""

from opd_plugins import hookimpl
from opd_plugins.divergences.base import Divergence, DivergenceTerms, StudentOutputs
from opd_plugins.divergences.reverse_kl import ReverseKL


@hookimpl
def opd_register_components():
    return [ReverseKL]


__all__ = ["Divergence", "DivergenceTerms", "StudentOutputs", "ReverseKL"]
