"""``grpo``: group-relative advantages."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from opd_plugins.advantages.base import AdvantageEstimator, AdvantageInputs, grouped
from opd_plugins.components import ComponentParams


class GRPOAdvantage(AdvantageEstimator):
    """Group-relative advantage: ``A_i = (r_i − mean_group(r)) / (std + eps)``.

    ``scale: group`` divides by each group's standard deviation (GRPO), ``batch`` by the whole batch's,
    ``none`` not at all (Dr. GRPO's unbiased form). NaN rewards are left out of the statistics and get
    advantage 0. Matches TRL's ``scale_rewards`` semantics.
    Paper: Shao et al., "DeepSeekMath" (GRPO), https://arxiv.org/abs/2402.03300
    """

    name: ClassVar[str] = "grpo"
    min_generations: ClassVar[int] = 2

    class Params(ComponentParams):
        scale: Literal["group", "batch", "none"] = Field("group", description="Divide by group std, batch std, or nothing.")
        eps: float = Field(1e-4, ge=0, description="Added to the standard deviation.")

    def compute(self, inputs: AdvantageInputs) -> torch.Tensor:
        return self.sequence_advantages(inputs.rewards, inputs.num_generations)[inputs.local_slice]

    def sequence_advantages(self, rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
        """Advantages of the whole global batch ``(N,)``."""
        g = grouped(rewards.float(), num_generations)
        adv = g - torch.nanmean(g, dim=1, keepdim=True)
        if self.params.scale == "group":
            adv = adv / (_nanstd(g, dim=1, keepdim=True) + self.params.eps)
        elif self.params.scale == "batch":
            adv = adv / (_nanstd(g.reshape(-1), dim=0) + self.params.eps)
        return torch.nan_to_num(adv.reshape(-1), nan=0.0)


def _nanstd(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """Sample standard deviation ignoring NaN (Bessel-corrected, as TRL's ``nanstd``)."""
    n = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True) / (n - 1).clamp(min=1)
    std = var.sqrt()
    return std if keepdim else std.squeeze(dim)
