"""``passk``: pass@k-style advantage — only each group's best completion is credited."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from opd_plugins.advantages.base import AdvantageEstimator, AdvantageInputs, grouped
from opd_plugins.advantages.grpo import _nanstd
from opd_plugins.components import ComponentParams


class PassKAdvantage(AdvantageEstimator):
    """Pass@k-style credit: the best completion of each group gets ``(r_max − r_second) / (std + eps)``,
    every other completion 0.

    The objective is the group's *best* outcome (pass@k with k = num_generations), so only a completion that
    beats all its siblings is reinforced, by its margin over the runner-up; ties at the top give 0. ``scale:
    none`` keeps the raw margin. NaN (unscored) rewards are left out; a group with fewer than two scored
    completions gets 0. This is verl's ``grpo_passk`` estimator (its docstring cites Tang et al., "Optimizing
    Language Models for Inference Time Objectives using Reinforcement Learning", https://arxiv.org/abs/2503.19595).
    The paper catalog (§3) has no pass@k estimator of its own; this follows verl's definition exactly.
    """

    name: ClassVar[str] = "passk"
    min_generations: ClassVar[int] = 2

    class Params(ComponentParams):
        scale: Literal["group", "none"] = Field("group", description="Divide the margin by the group std + eps, or not.")
        eps: float = Field(1e-6, ge=0, description="Added to the group std (verl's 1e-6).")

    def compute(self, inputs: AdvantageInputs) -> torch.Tensor:
        g = grouped(inputs.rewards.float(), inputs.num_generations)
        scored = (~torch.isnan(g)).sum(1)
        top = torch.where(torch.isnan(g), torch.full_like(g, float("-inf")), g)
        values, idx = torch.topk(top, k=min(2, g.shape[1]), dim=1)  # a tie at the top gives margin 0
        margin = values[:, 0] - values[:, -1]
        if self.params.scale == "group":
            margin = margin / (_nanstd(g, dim=1) + self.params.eps)
        margin = torch.where(scored >= 2, margin, torch.zeros_like(margin))
        adv = torch.zeros_like(g).scatter(1, idx[:, :1], torch.nan_to_num(margin, nan=0.0).unsqueeze(1))
        return adv.reshape(-1)[inputs.local_slice]
