"""``k2``: Schulman's k2 estimator ½(log r)² of reverse KL at the sampled token (biased value, unbiased gradient)."""

from __future__ import annotations

from typing import ClassVar

from opd_plugins.divergences.base import Divergence, DivergenceTerms, StudentOutputs
from opd_plugins.teachers.base import TeacherScores


class K2(Divergence):
    """k2 = ``½·(log π_s(x) − log π_t(x))²`` at the sampled token x ~ π_s.

    Value: a *biased* estimate of KL(π_s ‖ π_t) (E_s[k2] is an f-divergence that agrees with KL only to second
    order around π_s = π_t), but non-negative at every sample and with low variance.

    Loss: ``k2`` itself, differentiated through log π_s(x) (the sampled token fixed). Its gradient is
    ``(log π_s(x) − log π_t(x))·∇log π_s(x)``, the same per sample as k1's score-function surrogate, so its
    expected gradient is exactly ∇KL(π_s ‖ π_t): biased as a value, unbiased as a loss (KDRL reports k2 working
    better than k3 as the KD term). Tokens sampled by an older policy are weighted by sg(ρ), ρ = π_s/π_old, which
    keeps that expectation. Reward: ``−k2``. As a reward its policy gradient is *not* −∇KL; use ``k1`` (or
    ``reverse_kl``) for OPD as RL.

    Needs only the teacher's log-prob of the sampled token. Temperature: the student's log-probs are taken from
    logits already divided by the sampling temperature, the teacher's at the teacher's temperature.

    Paper: J. Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html; KDRL (Xu et al.),
    https://arxiv.org/abs/2506.02208.
    """

    name: ClassVar[str] = "k2"

    def per_token(self, student: StudentOutputs, teacher: TeacherScores) -> DivergenceTerms:
        mask = student.mask * teacher.mask
        log_ratio = (student.token_logps - teacher.token_logps) * mask
        k2 = 0.5 * log_ratio.square()
        return DivergenceTerms(loss=student.policy_ratio().detach() * k2 * mask, value=k2.detach())
