"""Built-in advantage estimators."""

from opd_plugins import hookimpl
from opd_plugins.advantages.base import AdvantageEstimator, AdvantageInputs, degenerate_groups
from opd_plugins.advantages.grpo import GRPOAdvantage


@hookimpl
def opd_register_components():
    return [GRPOAdvantage]


__all__ = ["AdvantageEstimator", "AdvantageInputs", "GRPOAdvantage", "degenerate_groups"]
