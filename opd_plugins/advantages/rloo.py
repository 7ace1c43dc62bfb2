"""``rloo``: REINFORCE leave-one-out baseline."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from opd_plugins.advantages.base import AdvantageEstimator, AdvantageInputs, grouped
from opd_plugins.advantages.grpo import _nanstd
from opd_plugins.components import ComponentParams


class RLOOAdvantage(AdvantageEstimator):
    """Leave-one-out baseline: ``A_i = r_i − mean_{j≠i} r_j`` over the other completions of the same prompt.

    The baseline of each completion excludes its own reward, so it is unbiased; it equals
    ``G/(G−1) · (r_i − mean_group)``. NaN (unscored) rewards are left out: the baseline averages the *scored*
    siblings, and an unscored completion — or the only scored one of its group — gets advantage 0 (TRL's
    ``RLOOTrainer`` does the same). ``normalize: true`` then standardises the scored advantages over the whole
    batch (TRL's ``normalize_advantages``).
    Papers: Kool et al., "Buy 4 REINFORCE Samples, Get a Baseline for Free!" (2019); Ahmadian et al., "Back to
    Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs",
    https://arxiv.org/abs/2402.14740
    """

    name: ClassVar[str] = "rloo"
    min_generations: ClassVar[int] = 2

    class Params(ComponentParams):
        normalize: bool = Field(False, description="Standardise the advantages over the batch (mean 0, std 1).")
        eps: float = Field(1e-4, ge=0, description="Added to the batch std when normalize is true.")

    def compute(self, inputs: AdvantageInputs) -> torch.Tensor:
        g = grouped(inputs.rewards.float(), inputs.num_generations)
        scored = (~torch.isnan(g)).sum(1, keepdim=True)
        total = torch.nansum(g, dim=1, keepdim=True)
        adv = (g - (total - g) / (scored - 1)).reshape(-1)  # NaN for unscored rows; ±inf/NaN where scored == 1
        adv = torch.where((scored > 1).expand_as(g).reshape(-1), adv, torch.full_like(adv, float("nan")))
        if self.params.normalize:
            adv = (adv - torch.nanmean(adv)) / (_nanstd(adv, dim=0) + self.params.eps)
        return torch.nan_to_num(adv, nan=0.0)[inputs.local_slice]
