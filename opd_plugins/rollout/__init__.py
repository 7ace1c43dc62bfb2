"""Built-in rollout backends."""

from opd_plugins.markers import hookimpl
from opd_plugins.rollout.async_rollout import AsyncRollout
from opd_plugins.rollout.base import RolloutBackend
from opd_plugins.rollout.fp8 import FP8Rollout
from opd_plugins.rollout.hf_generate import HFGenerate
from opd_plugins.rollout.perturbed import PerturbedHFGenerate
from opd_plugins.rollout.replay import ReplayRollout
from opd_plugins.rollout.vllm import VLLMRollout


@hookimpl
def opd_register_components():
    return [HFGenerate, PerturbedHFGenerate, ReplayRollout, FP8Rollout, VLLMRollout, AsyncRollout]


__all__ = ["AsyncRollout", "FP8Rollout", "HFGenerate", "PerturbedHFGenerate", "ReplayRollout", "RolloutBackend",
           "VLLMRollout"]
