"""``dr_grpo``: group-mean baseline, no standard-deviation scaling (Dr. GRPO)."""

from __future__ import annotations

from typing import ClassVar

import torch

from opd_plugins.advantages.base import AdvantageEstimator, AdvantageInputs, grouped
from opd_plugins.components import ComponentParams


class DrGRPOAdvantage(AdvantageEstimator):
    """Dr. GRPO's unbiased advantage: ``A_i = r_i − mean_group(r)``, with no division by the group's std.

    Dividing by the std up-weights prompts that are almost always solved or failed (question-level difficulty
    bias); Dr. GRPO drops it. The paper's second fix — no per-sequence length normalisation in the loss — is the
    loss's job, not the estimator's: set ``trainer.args.loss_type: dr_grpo`` (TRL divides the summed token
    losses by ``batch × max_completion_length``). NaN (unscored) rewards are left out of the mean and get
    advantage 0. The same numbers as ``grpo`` with ``scale: none`` and TRL's ``scale_rewards: none``.
    Paper: Liu et al., "Understanding R1-Zero-Like Training: A Critical Perspective",
    https://arxiv.org/abs/2503.20783
    """

    name: ClassVar[str] = "dr_grpo"
    min_generations: ClassVar[int] = 2

    class Params(ComponentParams):
        pass

    def compute(self, inputs: AdvantageInputs) -> torch.Tensor:
        g = grouped(inputs.rewards.float(), inputs.num_generations)
        adv = g - torch.nanmean(g, dim=1, keepdim=True)
        return torch.nan_to_num(adv.reshape(-1), nan=0.0)[inputs.local_slice]
