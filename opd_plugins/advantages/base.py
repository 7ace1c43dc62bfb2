"""The advantage-estimator contract."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from opd_plugins.components import Component


@dataclass
class AdvantageInputs:
    """What an estimator may use.

    * ``rewards``: ``(N,)`` total rewards of the *global* generation batch (NaN where no reward function
      applied), in groups of ``num_generations`` consecutive completions of the same prompt.
    * ``local``: this rank's rows of the global batch (a slice); the output covers only those rows.
    * ``mask``: ``(B, T)`` loss mask of this rank's completions (injected hint/prefix tokens already excluded).
    * ``token_reward``: ``(B, T)`` the divergence's per-token reward (teacher guidance), when the estimator sets
      ``needs_token_reward`` and the recipe has a teacher and a divergence; else None.
    * ``logps``: ``(B, T)`` the policy's log-probs of the sampled tokens (no gradient), when the estimator sets
      ``needs_logps``; else None.
    * ``ref_logps``: ``(B, T)`` the reference policy's log-probs of the sampled tokens, when the estimator has a
      :meth:`~AdvantageEstimator.reference`; else None.
    * ``token_value``: ``(B, T)`` the divergence's per-token value D̂_t (exact for full-vocabulary divergences,
      the sampled-token estimate otherwise), when :meth:`~AdvantageEstimator.needs_token_value`; else None.
    * ``step`` / ``max_steps``: training progress (for scheduled coefficients).
    """

    rewards: torch.Tensor
    num_generations: int
    local: slice | None = None
    mask: torch.Tensor | None = None
    token_reward: torch.Tensor | None = None
    logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    token_value: torch.Tensor | None = None
    step: int = 0
    max_steps: int = 0

    @property
    def local_slice(self) -> slice:
        return self.local if self.local is not None else slice(0, self.rewards.shape[0])


class AdvantageEstimator(Component):
    """Base class of advantage estimators.

    :meth:`compute` returns ``(B,)`` sequence-level or ``(B, T)`` token-level advantages for the rows in
    ``inputs.local``, with no NaN. Estimators that need groups declare ``min_generations``; those that need
    teacher guidance or the policy's log-probs set ``needs_token_reward`` / ``needs_logps``.
    """

    kind: ClassVar[str] = "advantage"
    min_generations: ClassVar[int] = 1
    needs_token_reward: ClassVar[bool] = False
    needs_logps: ClassVar[bool] = False

    def compute(self, inputs: AdvantageInputs) -> torch.Tensor:
        raise NotImplementedError

    def excluded(self, inputs: AdvantageInputs) -> torch.Tensor | None:
        """``(B,)`` bool: this rank's completions to remove from every loss term of this step (their tokens leave the
        mask and the token normaliser), e.g. MC-GRPO's median pivot; None (default) for none. Nested estimators
        pass theirs on."""
        for nested in self.nested_components().values():
            if isinstance(nested, AdvantageEstimator):
                rows = nested.excluded(inputs)
                if rows is not None:
                    return rows
        return None

    def needs_token_value(self) -> bool:
        """Whether :meth:`compute` reads ``inputs.token_value`` (the divergence's per-token value, for a
        reward-to-go); default False."""
        return False

    def reference(self) -> Any:
        """A teacher component scoring the sampled tokens as a reference policy π_ref, when the estimator uses one
        (``inputs.ref_logps``); the trainer sets it up and scores each generation batch with it. Nested estimators
        pass theirs on."""
        for nested in self.nested_components().values():
            if isinstance(nested, AdvantageEstimator) and nested.reference() is not None:
                return nested.reference()
        return None

    def num_generations_problem(self, num_generations: int) -> str | None:
        """Why this estimator cannot work with groups of ``num_generations`` (checked at validation), or None.
        ``min_generations`` covers the common case; override for other constraints (e.g. odd group sizes)."""
        return None


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


def reward_to_go(token_reward: torch.Tensor, mask: torch.Tensor,
                 token_value: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, T)`` the dense advantage of the sequence-level divergence: ``A_t = d_t − Σ_{t'>t} D̂_t'`` over each
    row's valid positions (0 at masked ones).

    ``d_t`` is the divergence's sampled-token reward, whose policy gradient at position t is −∇D_t with the
    prefix fixed (OPD's per-position gradient); ``D̂_t'`` (``token_value``) is the divergence's value at the later
    positions, exact for a full-vocabulary divergence, unbiased for a sampled-token one (default: ``−d``, right
    for the reverse KL's k1 reward). Later positions depend on y_t through the states they visit, so
    E_π[Σ_t A_t ∇log π(y_t | y_<t)] = −∇ E_π[Σ_t D_t], the gradient of the sequence-level objective."""
    m = mask.to(token_reward.dtype)
    future = -token_reward if token_value is None else token_value.to(token_reward.dtype)
    later = (future * m).flip(1).cumsum(1).flip(1) - future * m  # Σ_{t'>t} D̂_t'
    return (token_reward - later) * m
