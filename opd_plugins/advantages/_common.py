"""Helpers shared by the built-in estimators: the needs of nested estimators, per-row statistics across ranks.

Not a component module (it registers nothing).
"""

from __future__ import annotations

from typing import Any

import torch

from opd_plugins import collective
from opd_plugins.advantages.base import AdvantageEstimator, AdvantageInputs

# ---------------------------------------------------------------------------------------------------------------
# Nested estimators (`sparse: {name, params}` / `base: {name, params}`, built by the registry)
# ---------------------------------------------------------------------------------------------------------------


def adopt_needs(owner: AdvantageEstimator, nested: AdvantageEstimator | None) -> None:
    """The owner needs whatever its nested estimator needs (instance attributes shadow the ClassVars)."""
    if nested is None:
        return
    owner.min_generations = max(type(owner).min_generations, nested.min_generations)
    owner.needs_token_reward = type(owner).needs_token_reward or nested.needs_token_reward
    owner.needs_logps = type(owner).needs_logps or nested.needs_logps


# ---------------------------------------------------------------------------------------------------------------
# Per-row statistics
# ---------------------------------------------------------------------------------------------------------------


def row_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(B, T) → (B,)`` mean over the mask's tokens (0 for a row with no token)."""
    values = values.float()
    mask = torch.ones_like(values) if mask is None else mask.to(values)
    return (values * mask).sum(1) / mask.sum(1).clamp(min=1)


def gather_rows(local: torch.Tensor, inputs: AdvantageInputs) -> torch.Tensor:
    """This rank's per-row values ``(B,)`` → the global batch's ``(N,)`` (:func:`opd_plugins.collective.gather_rows`)."""
    return collective.gather_rows(local, inputs.rewards.shape[0], inputs.local_slice)


def require(tensor: torch.Tensor | None, what: str, owner: Any) -> torch.Tensor:
    """A clear error when the trainer did not fill an input the estimator declared it needs."""
    if tensor is None:
        hint = {"token_reward": "the recipe needs a teacher and a divergence (the divergence's per-token reward is the "
                                "guidance)",
                "ref_logps": "the estimator needs a reference policy (its `reference` param), which the trainer "
                             "scores the batch with",
                "token_value": "the trainer fills the divergence's per-token value when needs_token_value() is "
                               "true"}.get(what, "the trainer must pass the policy's log-probs "
                                                                  "(needs_logps)")
        raise ValueError(f"advantage {owner.name!r} needs inputs.{what}, which is None: {hint}")
    return tensor
