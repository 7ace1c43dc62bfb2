"""Built-in token weightings: per-token weights that multiply the divergence loss (a recipe lists any number)."""

from opd_plugins.markers import hookimpl
from opd_plugins.token_weighting.base import TokenWeighting
from opd_plugins.token_weighting.correctness_gate import CorrectnessGate
from opd_plugins.token_weighting.quality_gate import QualityGate
from opd_plugins.token_weighting.scope import Scope
from opd_plugins.token_weighting.tip import TIP


@hookimpl
def opd_register_components():
    return [TIP, CorrectnessGate, Scope, QualityGate]


__all__ = ["TokenWeighting", "TIP", "CorrectnessGate", "Scope", "QualityGate"]
