"""``k1``: Schulman's k1 estimator of reverse KL at the sampled token, with the unbiased score-function loss."""

from __future__ import annotations

from typing import ClassVar

from opd_plugins.divergences.base import Divergence, DivergenceTerms, StudentOutputs
from opd_plugins.teachers.base import TeacherScores


class K1(Divergence):
    """k1 = ``log π_s(x) − log π_t(x)`` at the sampled token x ~ π_s: an unbiased estimate of KL(π_s ‖ π_t)
    (E_s[k1] = KL exactly), with high variance and no sign (a single sample can be negative).

    Loss: the score-function surrogate ``ρ·sg(k1)`` (ρ = exp(log π_s − sg(log π_old)), 1 on-policy), whose expected
    gradient is exactly ∇KL(π_s ‖ π_t) per position (Σ_x π_s(x)·k1(x)·∇log π_s(x) = ∇KL), also for tokens sampled by
    an older policy. Using ``k1`` itself as a loss would be wrong: its expected
    gradient E_s[∇log π_s] is zero. This is what ``reverse_kl`` with ``estimator: sampled`` computes; ``k1`` names it
    alongside ``k2`` and ``k3``. Reward: ``−k1``, the standard OPD per-token reward (its policy gradient is −∇KL).

    Needs only the teacher's log-prob of the sampled token. Temperature: the student's log-probs are taken from
    logits already divided by the sampling temperature, the teacher's at the teacher's temperature.

    Paper: J. Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html; OPD:
    Thinking Machines, "On-Policy Distillation", https://thinkingmachines.ai/blog/on-policy-distillation/.
    """

    name: ClassVar[str] = "k1"

    def per_token(self, student: StudentOutputs, teacher: TeacherScores) -> DivergenceTerms:
        mask = student.mask * teacher.mask
        k1 = ((student.token_logps - teacher.token_logps) * mask).detach()
        return DivergenceTerms(loss=student.policy_ratio() * k1 * mask, value=k1)
