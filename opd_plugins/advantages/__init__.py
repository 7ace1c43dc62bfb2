"""Built-in advantage estimators."""

from opd_plugins.markers import hookimpl
from opd_plugins.advantages.ace import ACEAdvantage
from opd_plugins.advantages.base import AdvantageEstimator, AdvantageInputs, degenerate_groups
from opd_plugins.advantages.dr_grpo import DrGRPOAdvantage
from opd_plugins.advantages.grpo import GRPOAdvantage
from opd_plugins.advantages.median import MedianAdvantage
from opd_plugins.advantages.passk import PassKAdvantage
from opd_plugins.advantages.reinforce_pp import ReinforcePPAdvantage
from opd_plugins.advantages.rloo import RLOOAdvantage
from opd_plugins.advantages.teacher_dense import TeacherDenseAdvantage
from opd_plugins.advantages.uni_opd_margin import UniOPDMarginAdvantage


@hookimpl
def opd_register_components():
    return [GRPOAdvantage, DrGRPOAdvantage, RLOOAdvantage, MedianAdvantage, ReinforcePPAdvantage, PassKAdvantage,
            TeacherDenseAdvantage, UniOPDMarginAdvantage, ACEAdvantage]


__all__ = [
    "ACEAdvantage", "AdvantageEstimator", "AdvantageInputs", "DrGRPOAdvantage", "GRPOAdvantage", "MedianAdvantage",
    "PassKAdvantage", "RLOOAdvantage", "ReinforcePPAdvantage", "TeacherDenseAdvantage", "UniOPDMarginAdvantage",
    "degenerate_groups",
]
