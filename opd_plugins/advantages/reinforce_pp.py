"""``reinforce_pp``: REINFORCE++ — batch-normalised advantages."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from opd_plugins.advantages.base import AdvantageEstimator, AdvantageInputs, grouped
from opd_plugins.advantages.grpo import _nanstd
from opd_plugins.components import ComponentParams


class ReinforcePPAdvantage(AdvantageEstimator):
    """REINFORCE++: ``A_i = (x_i − mean_batch(x)) / sqrt(var_batch(x) + eps)`` with ``x_i = r_i − b_i``.

    ``baseline: none`` (REINFORCE++) uses ``x = r``: the whole-batch normalisation is the only baseline, so it
    needs no groups. ``baseline: group`` (verl's ``reinforce_plus_plus_baseline``, for reasoning tasks) first
    subtracts each prompt's group mean, then normalises over the batch — unlike GRPO, whose per-group std
    over-weights easy and hard prompts. Statistics cover the *global* batch (every
    rank gets the same normalisation); the variance is Bessel-corrected, as verl's ``masked_whiten``.
    Differences from verl: statistics are per sequence, not per token (verl whitens token-broadcast scores, so
    long completions weigh more), and the KL penalty belongs to the loss (``trainer.args.beta``), not the
    reward. NaN (unscored) rewards are left out of every statistic and get advantage 0.
    Paper: Hu, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models",
    https://arxiv.org/abs/2501.03262
    """

    name: ClassVar[str] = "reinforce_pp"

    class Params(ComponentParams):
        baseline: Literal["none", "group"] = Field(
            "none", description="Subtract nothing, or each prompt's group mean, before normalising.")
        eps: float = Field(1e-8, ge=0, description="Added to the batch variance.")

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        if self.params.baseline == "group":
            self.min_generations = 2

    def compute(self, inputs: AdvantageInputs) -> torch.Tensor:
        x = inputs.rewards.float()
        if self.params.baseline == "group":
            g = grouped(x, inputs.num_generations)
            x = (g - torch.nanmean(g, dim=1, keepdim=True)).reshape(-1)
        var = _nanstd(x, dim=0) ** 2
        adv = (x - torch.nanmean(x)) / torch.sqrt(var + self.params.eps)  # 0/0 (all equal, eps 0) → NaN → 0
        return torch.nan_to_num(adv, nan=0.0)[inputs.local_slice]
