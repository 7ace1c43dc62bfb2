"""The advantage-estimator contract."""

from __future__ import annotations

from typing import ClassVar

import torch

from opd_plugins.components import Component


class AdvantageEstimator(Component):
    """Base class of advantage estimators.

    :meth:`compute` receives the global batch's total rewards ``(N,)`` (NaN where no reward function applied),
    ordered in groups of ``num_generations`` completions of the same prompt, and returns ``(N,)`` sequence-level
    (or ``(N, T)`` token-level) advantages with no NaN.
    """

    kind: ClassVar[str] = "advantage"
    min_generations: ClassVar[int] = 1

    def compute(self, rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
        raise NotImplementedError


def grouped(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    return rewards.view(-1, num_generations)


def degenerate_groups(rewards: torch.Tensor, num_generations: int) -> list[int]:
    """Indices of groups whose (non-NaN) rewards are all equal: they carry no relative signal."""
    g = grouped(rewards, num_generations)
    lo = torch.where(torch.isnan(g), torch.full_like(g, float("inf")), g).min(1).values
    hi = torch.where(torch.isnan(g), torch.full_like(g, float("-inf")), g).max(1).values
    return [i for i, same in enumerate((hi - lo <= 1e-8) | torch.isinf(lo)) if bool(same)]
