"""``median``: median-centred group advantages (MC-GRPO)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from opd_plugins.advantages.base import AdvantageEstimator, AdvantageInputs, grouped
from opd_plugins.components import ComponentParams


class MedianAdvantage(AdvantageEstimator):
    """MC-GRPO: the group's **median** reward is the baseline, ``A_i = (r_i − med) / (MAD + eps)``.

    The median is far less sensitive to an outlier reward than the mean, so small groups flip fewer advantage
    signs. MC-GRPO samples G+1 completions per prompt — an odd group — so exactly one of them *is* the median:
    that pivot has advantage 0 and is dropped from back-propagation, leaving G completions with gradient.
    ``MAD = median_i |r_i − med|`` (median absolute deviation) replaces the std, as in the authors' code
    (``scale: none`` keeps ``r − med``).

    As in the authors' code: each group's non-zero advantages are multiplied by ``(G+1) / n_nonzero``
    (``rescale``), so a group where few rollouts differ from the median keeps the size of its signal; and the
    pivot is removed from every loss term (``drop_pivot``): its tokens leave the loss mask and the token
    normaliser, so it gets no policy-gradient, divergence or KL term either. The pivot of a group is the rollout
    at the middle of its rewards sorted stably (among ties at the median, the middle one by position).

    In a recipe, ``trainer.args.num_generations`` is the whole group, G+1: set it odd (3 for the paper's G=2).
    An even group has no single median rollout, so it is an error unless ``even_groups: midpoint`` (the
    ordinary median, the mean of the two middle rewards; no rollout is a pivot, none is dropped).

    NaN (unscored) rewards are left out of the median and the MAD and get advantage 0; an even number of
    scored rewards (an odd group with unscored rows) uses the lower median, as ``torch.nanmedian``.
    With 0/1 rewards the MAD is often 0, so the advantages are ±1/eps (±1000 by default) for the rollouts on
    the minority side — the authors' behaviour; use ``scale: none`` when other loss terms must keep their
    relative weight.
    Paper: Kim, "MC-GRPO: Median-Centered Group Relative Policy Optimization for Small-Rollout Reinforcement
    Learning", https://arxiv.org/abs/2601.22582 (code: https://github.com/lotusroot-kim/MC-GRPO)
    """

    name: ClassVar[str] = "median"
    min_generations: ClassVar[int] = 3

    class Params(ComponentParams):
        scale: Literal["mad", "none"] = Field("mad", description="Divide by the group's MAD + eps, or not at all.")
        eps: float = Field(1e-3, gt=0, description="Added to the MAD (the authors' 1e-3).")
        even_groups: Literal["error", "midpoint"] = Field(
            "error", description="An even num_generations: an error (G+1 is odd), or the mean of the two middle rewards.")
        rescale: bool = Field(True, description="Multiply each group's non-zero advantages by (G+1)/n_nonzero "
                                                "(the authors' code).")
        drop_pivot: bool = Field(True, description="Remove each odd group's median rollout from every loss term.")

    @classmethod
    def example_params(cls) -> Params:
        # The contract suite runs with groups of 4; the paper's odd groups are covered by the unit tests.
        return cls.Params(even_groups="midpoint")

    def num_generations_problem(self, num_generations: int) -> str | None:
        """Why this group size cannot work, or None (for recipe validation, before any model loads)."""
        if num_generations % 2 == 0 and self.params.even_groups == "error":
            return (f"advantage 'median' (MC-GRPO) needs an odd group so that one rollout is the median pivot, got "
                    f"num_generations={num_generations}; set trainer.args.num_generations to G+1, an odd number "
                    f"such as {num_generations + 1} or {num_generations - 1}, or set advantage.params.even_groups: "
                    f"midpoint")
        return None

    def compute(self, inputs: AdvantageInputs) -> torch.Tensor:
        problem = self.num_generations_problem(inputs.num_generations)
        if problem:
            raise ValueError(problem)
        g = grouped(inputs.rewards.float(), inputs.num_generations)
        midpoint = self.params.even_groups == "midpoint"
        med = _nanmedian(g, midpoint)
        adv = g - med
        if self.params.scale == "mad":
            adv = adv / (_nanmedian(adv.abs(), midpoint) + self.params.eps)
        adv = torch.nan_to_num(adv, nan=0.0)
        if self.params.rescale:  # the authors' (G+1)/n_nonzero per group
            nonzero = (adv != 0).sum(1, keepdim=True)
            adv = torch.where(nonzero > 0, adv * g.shape[1] / nonzero.clamp(min=1), adv)
        return adv.reshape(-1)[inputs.local_slice]

    def excluded(self, inputs: AdvantageInputs) -> torch.Tensor | None:
        """The pivot (median) rollout of each odd group, for this rank's rows ``(B,)``; None without pivots."""
        G = inputs.num_generations
        if not self.params.drop_pivot or G % 2 == 0:
            return None
        g = grouped(inputs.rewards.float(), G)
        n = (~torch.isnan(g)).sum(1)
        order = torch.sort(torch.where(torch.isnan(g), torch.full_like(g, float("inf")), g), dim=1, stable=True).indices
        pivot = order.gather(1, ((n - 1) // 2).clamp(min=0).unsqueeze(1)).squeeze(1)
        out = torch.zeros_like(g, dtype=torch.bool)
        has = n > 0
        out[torch.arange(g.shape[0])[has], pivot[has]] = True
        return out.reshape(-1)[inputs.local_slice]


def _nanmedian(g: torch.Tensor, midpoint: bool) -> torch.Tensor:
    """Row medians ``(n_groups, 1)`` ignoring NaN: the lower median for an even count, or the midpoint."""
    n = (~torch.isnan(g)).sum(1, keepdim=True)
    ordered = torch.sort(torch.where(torch.isnan(g), torch.full_like(g, float("inf")), g), dim=1).values
    lo = ordered.gather(1, ((n - 1) // 2).clamp(min=0))
    hi = ordered.gather(1, (n // 2).clamp(max=g.shape[1] - 1))
    med = (lo + hi) / 2 if midpoint else lo
    return torch.where(n > 0, med, torch.full_like(med, float("nan")))
