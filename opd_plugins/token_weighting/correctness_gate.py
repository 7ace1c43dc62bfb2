"""``correctness_gate``: distil on incorrect rollouts only, on correct ones only, or on all."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from opd_plugins.components import ComponentParams
from opd_plugins.divergences.base import StudentOutputs
from opd_plugins.teachers.base import TeacherScores
from opd_plugins.token_weighting._common import (
    masked_mean, require_rewards, split_by_reward, token_divergence, valid_tokens,
)
from opd_plugins.token_weighting.base import TokenWeighting


class CorrectnessGate(TokenWeighting):
    """Weight 1 on the rollouts the gate admits and 0 elsewhere, by task reward.

    A rollout is correct when its total reward is at least ``threshold``. ``apply_to: incorrect`` (default)
    distils only on incorrect rollouts, where the teacher's signal aligns best with what would make the student
    succeed (Ilhan et al. 2026, "Unmasking On-Policy Distillation", https://arxiv.org/abs/2605.10889); KDRL's
    reward-guided KD masks the KD term on correct responses (Xu et al. 2025, https://arxiv.org/abs/2506.02208),
    and SCOPE and HyperEyes route failures to the teacher too. ``apply_to: correct`` is the opposite choice
    (KEPO's quality gate, see ``quality_gate``); ``all`` admits every scored rollout, which turns the gate into
    a diagnostic. The papers disagree on the direction, so it is a parameter.

    Unscored rollouts (reward NaN: no reward function scored them) get weight 0 under ``unscored: skip``
    (default: the gate cannot tell which side they are on) or 1 under ``unscored: distill``.

    ``last_stats`` holds the mean per-token divergence of the correct and of the incorrect rows, whatever the gate
    admits (the sampled-token reverse-KL estimate ``log π_s(x_t) − log π_t(x_t)``, cheap at any vocabulary size;
    a key is left out when its group has no token in the micro-batch), and the share of rows of each kind and
    admitted.
    """

    name: ClassVar[str] = "correctness_gate"
    needs_rewards: ClassVar[bool] = True

    class Params(ComponentParams):
        apply_to: Literal["incorrect", "correct", "all"] = Field(
            "incorrect", description="Which rollouts keep the divergence: incorrect, correct, or all scored ones.")
        threshold: float = Field(1.0, description="A rollout is correct when its total reward is >= threshold.")
        unscored: Literal["skip", "distill"] = Field(
            "skip", description="Rollouts with no reward (NaN): skip (weight 0) or distill (weight 1).")

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.last_stats: dict[str, float] = {}
        self._warned = False

    @classmethod
    def example_params(cls) -> Params:
        """Splits rewards in [0, 1] into both groups."""
        return cls.Params(threshold=0.5)

    def weights(self, inputs: dict[str, Any], student: StudentOutputs, teacher: TeacherScores | None) -> torch.Tensor:
        B = student.token_logps.shape[0]
        rewards = require_rewards(inputs, self.name, B).to(student.token_logps.device)
        correct, incorrect, unscored = split_by_reward(rewards, self.params.threshold)
        gate = {"incorrect": incorrect, "correct": correct, "all": correct | incorrect}[self.params.apply_to]
        if self.params.unscored == "distill":
            gate = gate | unscored
        if bool(unscored.all()) and not self._warned:
            self._warned = True
            warnings.warn(f"token weighting {self.name!r} got a batch with no scored rollout (every reward is NaN); "
                          "is there a reward function?", stacklevel=2)
        self.last_stats = self._stats(student, teacher, correct, incorrect, unscored, gate)
        return gate.unsqueeze(1).to(student.token_logps.dtype) * student.mask

    def _stats(self, student, teacher, correct, incorrect, unscored, gate) -> dict[str, float]:
        B = correct.numel()
        stats = {"correct_fraction": float(correct.sum()) / B, "incorrect_fraction": float(incorrect.sum()) / B,
                 "unscored_fraction": float(unscored.sum()) / B, "kept_fraction": float(gate.sum()) / B}
        if teacher is None:
            return stats
        valid = valid_tokens(student, teacher)
        div = token_divergence(student, teacher, full=False)
        for key, rows in (("divergence_correct", correct), ("divergence_incorrect", incorrect)):
            value = masked_mean(div, valid & rows.unsqueeze(1))
            if value is not None:
                stats[key] = value
        return stats
