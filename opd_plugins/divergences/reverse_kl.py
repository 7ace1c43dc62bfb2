"""``reverse_kl``: KL(student ‖ teacher), the mode-seeking divergence of on-policy distillation."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from opd_plugins.components import ComponentParams
from opd_plugins.divergences.base import Divergence, DivergenceTerms, StudentOutputs
from opd_plugins.divergences.full_vocab import FullVocabFormula, check_fused_params, student_divergence, xdiff
from opd_plugins.teachers.base import Capability, TeacherScores


class ReverseKLFormula(FullVocabFormula):
    """KL(s ‖ t) = Σ s (log s − log t); f(r) = −log r."""

    name = "reverse_kl"

    def value(self, s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
        return xdiff(s_lp, s_lp, t_lp).sum(-1)

    def probability_grad(self, s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
        return s_lp - t_lp  # (+1, which the softmax projection removes)

    def sampled_reward(self, log_r: torch.Tensor, form: str = "score") -> torch.Tensor:
        return log_r if form == "score" else -(log_r.exp() - 1 - log_r)


REVERSE_KL = ReverseKLFormula()


class ReverseKL(Divergence):
    """Reverse KL, KL(π_student ‖ π_teacher), per completion token (mode-seeking).

    ``estimator: sampled`` uses only the sampled token x_t ~ π_student: the value is the k1 estimate
    ``log π_s(x_t) − log π_t(x_t)`` and the loss is the score-function surrogate
    ``ρ_t · sg(log π_s(x_t) − log π_t(x_t))`` with ρ_t = exp(log π_s − sg(log π_old)) (1 on-policy), whose
    gradient is an unbiased estimate of ∇KL per position also when the tokens were sampled by an older policy (a
    generation batch reused across optimizer steps or iterations); a loss of ``log π_s − log π_t`` alone would
    have zero expected gradient. As a reward it is
    ``−(log π_s(x_t) − log π_t(x_t))``, which depends on the sampled token as the policy gradient requires.
    ``estimator: full`` computes ``Σ_v π_s(v)(log π_s(v) − log π_t(v))`` exactly from full-vocabulary log-probs
    and differentiates it directly, ``chunk_size`` tokens at a time through the shared recomputing kernel of
    :mod:`~opd_plugins.divergences._kernels` (0 = all at once, plain autograd; same values and gradients);
    ``fused_lm_head: true`` computes the student logits there too, chunk by chunk from the final hidden states.
    Paper: Agarwal et al. (GKD), https://arxiv.org/abs/2306.13649; Thinking Machines, "On-Policy Distillation".
    """

    name: ClassVar[str] = "reverse_kl"

    class Params(ComponentParams):
        estimator: Literal["sampled", "full"] = Field("sampled", description="Sampled-token (k1) or full-vocabulary.")
        chunk_size: int = Field(
            256, ge=0, description="estimator=full: tokens per chunk of the full-vocabulary computation; 0 = all at "
                                   "once (holds several (B, T, V) tensors).")
        fused_lm_head: bool = Field(
            False, description="estimator=full: compute the student logits chunk by chunk from the final hidden "
                               "states and the lm head (the (B, T, V) logits and their gradient never exist).")

        @model_validator(mode="after")
        def _fused_needs_full(self):
            if self.fused_lm_head and self.estimator != "full":
                raise ValueError("fused_lm_head applies to estimator: full only, because the sampled estimator needs "
                                 "no logits; set estimator: full or fused_lm_head: false")
            check_fused_params(self)
            return self

    def requires(self) -> Capability:
        return "full" if self.params.estimator == "full" else "sampled"

    def uses_hidden_states(self) -> bool:
        return self.params.fused_lm_head

    def per_token(self, student: StudentOutputs, teacher: TeacherScores) -> DivergenceTerms:
        mask = student.mask * teacher.mask
        if self.params.estimator == "full":
            kl = student_divergence(self.name, student, teacher, REVERSE_KL, self.params.chunk_size) * mask
            return DivergenceTerms(loss=kl, value=kl.detach())
        log_ratio = ((student.token_logps - teacher.token_logps) * mask).detach()
        return DivergenceTerms(loss=student.policy_ratio() * log_ratio * mask, value=log_ratio)

    def reward_requires(self) -> str:
        return "sampled"  # the sampled tokens' log-probs only

    def reward(self, student: StudentOutputs, teacher: TeacherScores) -> torch.Tensor:
        """``−(log π_s(x_t) − log π_t(x_t))`` at the sampled token, whichever estimator the loss uses (the exact
        per-position KL does not depend on the sampled token and would give no policy gradient)."""
        mask = student.mask * teacher.mask
        return (-(student.token_logps - teacher.token_logps) * mask).detach()
