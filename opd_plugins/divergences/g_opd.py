"""``g_opd``: Generalized On-Policy Distillation (G-OPD) and reward extrapolation (ExOPD), per-token."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from opd_plugins.components import ComponentParams
from opd_plugins.divergences.base import Divergence, DivergenceTerms, StudentOutputs
from opd_plugins.teachers.base import TeacherScores


class GOPD(Divergence):
    """G-OPD: OPD as dense KL-constrained RL with a reward scale λ and a reference model π_ref,

    ``J = E_{y~π_s}[ λ·log(π_T(y)/π_ref(y)) − KL(π_s ‖ π_ref) ]``, i.e. the per-token reward at the sampled token

    ``r_t = λ·(log π_T(x_t) − log π_ref(x_t)) − (log π_s(x_t) − log π_ref(x_t))
         = (log π_T(x_t) − log π_s(x_t)) + (λ − 1)·(log π_T(x_t) − log π_ref(x_t))``.

    λ = 1 is standard OPD for any π_ref (r_t is exactly ``reverse_kl``'s reward); λ > 1 is ExOPD (reward
    extrapolation: the optimum π ∝ π_ref·(π_T/π_ref)^λ goes beyond the teacher); 0 < λ < 1 interpolates towards
    π_ref. *Reward correction* (strong-to-weak distillation) takes π_ref = the teacher's base model before its RL.

    The reference log-prob of the sampled token is read from ``teacher.ref_token_logps`` ``(B, T)`` when the
    teacher provides it. Without it the π_ref terms are dropped, ``r_t = λ·log π_T(x_t) − log π_s(x_t)``: a
    uniform reference up to a per-token constant, which does not change the expected policy gradient (the optimum
    becomes π ∝ π_T^λ, a sharpened teacher for λ > 1).

    Value: ``−r_t`` (the k1 estimate of KL(π_s ‖ π_T) at λ = 1; for λ ≠ 1 an objective, not a divergence: it is
    not zero where student equals teacher). Loss: the score-function surrogate ``sg(−r_t)·log π_s(x_t)``, whose
    expected gradient is exactly −∇J per position. Reward: ``r_t``. Needs only sampled-token log-probs.
    Temperature: all log-probs are at their models' sampling/scoring temperatures; nothing is rescaled here.

    Paper: Yang et al., "Learning beyond Teacher: Generalized On-Policy Distillation with Reward Extrapolation",
    https://arxiv.org/abs/2602.12125.
    """

    name: ClassVar[str] = "g_opd"

    class Params(ComponentParams):
        reward_scale: float = Field(1.0, ge=0.0, description="λ, the weight of the teacher reward against the KL to "
                                                              "the reference: 1 = standard OPD, > 1 = ExOPD.")

    def token_reward(self, student: StudentOutputs, teacher: TeacherScores) -> torch.Tensor:
        """``r_t`` (masked, detached)."""
        mask = student.mask * teacher.mask
        t_lp, s_lp = teacher.token_logps.detach(), student.token_logps.detach()
        ref = getattr(teacher, "ref_token_logps", None)
        implicit = t_lp if ref is None else t_lp - ref.detach()
        return (((t_lp - s_lp) + (self.params.reward_scale - 1.0) * implicit) * mask).detach()

    def per_token(self, student: StudentOutputs, teacher: TeacherScores) -> DivergenceTerms:
        mask = student.mask * teacher.mask
        value = -self.token_reward(student, teacher)
        return DivergenceTerms(loss=student.policy_ratio() * value * mask, value=value)

    def reward(self, student: StudentOutputs, teacher: TeacherScores) -> torch.Tensor:
        return self.token_reward(student, teacher)
