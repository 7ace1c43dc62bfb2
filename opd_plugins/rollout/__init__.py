"""Built-in rollout backends."""

from opd_plugins import hookimpl
from opd_plugins.rollout.base import RolloutBackend
from opd_plugins.rollout.hf_generate import HFGenerate


@hookimpl
def opd_register_components():
    return [HFGenerate]


__all__ = ["RolloutBackend", "HFGenerate"]
