"""``k3``: Schulman's k3 estimator (r − 1) − log r of reverse KL at the sampled token (unbiased, non-negative)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from opd_plugins.components import ComponentParams
from opd_plugins.divergences.base import Divergence, DivergenceTerms, StudentOutputs
from opd_plugins.teachers.base import TeacherScores


class K3(Divergence):
    """k3 = ``(r − 1) − log r`` with ``r = π_t(x)/π_s(x)`` at the sampled token x ~ π_s.

    Value: an *unbiased* estimate of KL(π_s ‖ π_t) (E_s[r − 1] = 0, so E_s[k3] = E_s[k1]), non-negative at every
    sample and of lower variance than k1 when π_s ≈ π_t. This is the KL penalty estimator of GRPO.

    Loss (``surrogate``):

    * ``pathwise`` (default, the usual use, as in GRPO's KL term): ``k3`` differentiated through log π_s(x). Its
      gradient is ``(1 − r)·∇log π_s(x)``, whose expectation is −Σ_x π_t(x)∇log π_s(x) = ∇KL(π_t ‖ π_s): the
      gradient of the *forward* KL, so as a reverse-KL loss it is **biased** (both vanish at π_s = π_t).
    * ``score_function``: ``ρ·sg(k3) + sg(ρ)·k3``, the full gradient of E_s[k3] (score term plus pathwise term),
      whose expectation is exactly ∇KL(π_s ‖ π_t) (ρ = π_s/π_old weights tokens an older policy sampled; 1
      on-policy).

    Reward: ``−k3``; unbiased as a value, but as a reward its policy gradient is not −∇KL (the pathwise part is
    dropped); use ``k1`` (or ``reverse_kl``) for OPD as RL.

    Needs only the teacher's log-prob of the sampled token. Temperature: the student's log-probs are taken from
    logits already divided by the sampling temperature, the teacher's at the teacher's temperature.

    Paper: J. Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html; GRPO (Shao et al.),
    https://arxiv.org/abs/2402.03300.
    """

    name: ClassVar[str] = "k3"

    class Params(ComponentParams):
        surrogate: Literal["pathwise", "score_function"] = Field(
            "pathwise", description="pathwise: k3 as the loss (GRPO's use; its expected gradient is the forward KL's); "
                                    "score_function: sg(k3)·log π_s + k3 (expected gradient exactly ∇KL(π_s ‖ π_t)).")

    def per_token(self, student: StudentOutputs, teacher: TeacherScores) -> DivergenceTerms:
        mask = student.mask * teacher.mask
        log_r = (teacher.token_logps - student.token_logps) * mask
        k3 = (torch.expm1(log_r) - log_r) * mask
        ratio = student.policy_ratio()  # 1 on-policy; π_s/π_old for tokens sampled by an older policy
        loss = ratio.detach() * k3
        if self.params.surrogate == "score_function":
            loss = loss + ratio * k3.detach() * mask
        return DivergenceTerms(loss=loss, value=k3.detach())
