"""``quality_gate``: KEPO's quality-gated distillation — the divergence applies only to high-quality rollouts."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from opd_plugins.components import ComponentParams
from opd_plugins.divergences.base import StudentOutputs
from opd_plugins.teachers.base import TeacherScores
from opd_plugins.token_weighting._common import require_rewards, require_teacher, row_mean, valid_tokens
from opd_plugins.token_weighting.base import TokenWeighting


class QualityGate(TokenWeighting):
    """Weight 1 on rollouts whose quality is at or above ``threshold``, 0 on the others.

    KEPO (Ezzati et al. 2026, https://arxiv.org/abs/2602.00400) applies dense teacher distillation only to
    high-quality trajectories: low-quality ones usually start from an early logical error, and distilling under
    a flawed prefix injects misaligned gradients. This is the opposite direction to ``correctness_gate``'s
    default (see docs/components.md).

    ``metric: reward`` (default) measures quality by the rollout's total task reward (NaN rewards: weight 0
    under ``unscored: skip``, 1 under ``distill``); it is then the same gate as
    ``correctness_gate {apply_to: correct}``. ``metric: teacher_logp`` uses the teacher's mean log-prob of the
    rollout's sampled tokens (≤ 0; ``threshold: -1.0`` keeps the rollouts on which the teacher's perplexity is at
    most e ≈ 2.7) and needs no reward (:meth:`requires_rewards` is false then, so a recipe without a task may use
    it).
    """

    name: ClassVar[str] = "quality_gate"
    needs_rewards: ClassVar[bool] = True

    class Params(ComponentParams):
        metric: Literal["reward", "teacher_logp"] = Field(
            "reward", description="Quality of a rollout: its total task reward, or the teacher's mean token log-prob.")
        threshold: float = Field(1.0, description="Rollouts whose quality is >= threshold keep the divergence.")
        unscored: Literal["skip", "distill"] = Field(
            "skip", description="metric=reward, rollouts with no reward (NaN): skip (weight 0) or distill (weight 1).")

        @model_validator(mode="after")
        def _reachable(self) -> "QualityGate.Params":
            if self.metric == "teacher_logp" and self.threshold > 0:
                raise ValueError(f"threshold {self.threshold} is unreachable with metric=teacher_logp, because a mean "
                                 "log-prob is at most 0: set a negative threshold, e.g. -1.0")
            return self

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.last_stats: dict[str, float] = {}
        self._warned = False

    def requires_rewards(self) -> bool:
        return self.params.metric == "reward"

    def quality(self, inputs: dict[str, Any], student: StudentOutputs, teacher: TeacherScores | None) -> torch.Tensor:
        """``(B,)`` quality of each rollout (NaN when unknown)."""
        B = student.token_logps.shape[0]
        if self.params.metric == "reward":
            return require_rewards(inputs, self.name, B).to(student.token_logps.device)
        teacher = require_teacher(teacher, self.name, "metric=teacher_logp")
        valid = valid_tokens(student, teacher)
        q = row_mean(teacher.token_logps.float(), valid)
        return torch.where(valid.any(1), q, torch.full_like(q, float("nan")))

    def weights(self, inputs: dict[str, Any], student: StudentOutputs, teacher: TeacherScores | None) -> torch.Tensor:
        q = self.quality(inputs, student, teacher)
        known = ~torch.isnan(q)
        gate = known & (q >= self.params.threshold)
        if self.params.metric == "reward":
            if self.params.unscored == "distill":
                gate = gate | ~known
            if not bool(known.any()) and not self._warned:
                self._warned = True
                warnings.warn(f"token weighting {self.name!r} got a batch with no scored rollout (every reward is "
                              "NaN); is there a reward function?", stacklevel=2)
        B = q.numel()
        self.last_stats = {"kept_fraction": float(gate.sum()) / B}
        if known.any():
            self.last_stats["quality_mean"] = float(q[known].mean())
        return gate.unsqueeze(1).to(student.token_logps.dtype) * student.mask
