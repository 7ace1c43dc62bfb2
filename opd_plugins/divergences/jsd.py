"""``jsd``: generalized Jensen–Shannon divergence with TRL's β convention (β = 0 forward KL, β = 1 reverse KL)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

import torch

from opd_plugins.divergences.forward_kl import FORWARD_KL
from opd_plugins.divergences.full_vocab import FullVocabDivergence, FullVocabFormula, FullVocabParams, safe_log, xdiff
from opd_plugins.divergences.reverse_kl import REVERSE_KL


class JSDFormula(FullVocabFormula):
    """β·KL(t ‖ m) + (1 − β)·KL(s ‖ m), m = (1 − β)·s + β·t (0 < β < 1); f(r) = β r log(r/u) − (1 − β) log u with
    u = 1 − β + β r, f'(1) = 0."""

    name = "jsd"

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def _log_m(self, s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
        return torch.logaddexp(s_lp + safe_log(1 - self.beta), t_lp + safe_log(self.beta))

    def value(self, s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
        lm, b = self._log_m(s_lp, t_lp), self.beta
        return b * xdiff(t_lp, t_lp, lm).sum(-1) + (1 - b) * xdiff(s_lp, s_lp, lm).sum(-1)

    def probability_grad(self, s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
        return (1 - self.beta) * (s_lp - self._log_m(s_lp, t_lp))

    def sampled_reward(self, log_r: torch.Tensor, form: str = "score") -> torch.Tensor:
        b, r = self.beta, log_r.exp()
        log_u = torch.log1p(b * (r - 1))
        return (1 - b) * log_u if form == "score" else -(b * r * (log_r - log_u) - (1 - b) * log_u)


class JSD(FullVocabDivergence):
    """Generalized JSD per completion token over the full vocabulary, exactly as TRL's
    ``GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, beta=β, reduction="none").sum(-1)``:

    * β = 0: KL(teacher ‖ student) (forward); β = 1: KL(student ‖ teacher) (reverse);
    * 0 < β < 1: ``β·KL(t ‖ m) + (1 − β)·KL(s ‖ m)`` with the mixture ``m = (1 − β)·s + β·t``.

    The mixture form tends to 0 as β → 0 or 1, so the endpoints are defined separately (as TRL does): the value is
    not continuous in β there. ``DistillationTrainer`` defaults to β = 1; GKD to 0.5. Computed in chunks of
    ``chunk_size`` tokens with a recomputing autograd function (no (B, T, V) probability tensors held); the
    gradient with respect to the logits is ``s ⊙ (g − ⟨s, g⟩)`` with ``g = (1 − β)·log(s/m)``.

    Temperature: the student logits arrive already divided by the sampling temperature and the teacher's log-probs
    are scored at the teacher's temperature (TRL's ``temperature`` argument is 1 here).

    Reward at the sampled token (r = π_t(x)/π_s(x), u = 1 − β + β·r): ``score`` gives ``(1 − β)·log u`` (the
    log-ratio ``log r`` at β = 1 and ``r − 1`` at β = 0), whose policy gradient is −∇JSD in expectation;
    ``estimate`` gives ``−(β·r·log(r/u) − (1 − β)·log u)``, an unbiased non-negative estimate of −JSD.

    Paper: Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"
    (GKD), https://arxiv.org/abs/2306.13649.
    """

    name: ClassVar[str] = "jsd"

    class Params(FullVocabParams):
        beta: float = Field(0.5, ge=0.0, le=1.0, description="Interpolation β in [0, 1]: 0 = forward KL, 1 = reverse "
                                                              "KL, otherwise the generalized JSD (TRL's convention).")

    def formula(self) -> FullVocabFormula:
        beta = self.params.beta
        if beta == 0:
            return FORWARD_KL
        if beta == 1:
            return REVERSE_KL
        return JSDFormula(beta)
