"""``skew_kl``: skewed KL (DistiLLM), a KL against a student–teacher mixture that stays finite and smooth."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

import torch

from opd_plugins.divergences.full_vocab import FullVocabDivergence, FullVocabFormula, FullVocabParams, safe_log, xdiff


class SkewForwardKLFormula(FullVocabFormula):
    """SKL: KL(t ‖ α·t + (1 − α)·s); f(r) = r log(r/u), u = α r + 1 − α, f'(1) = 1 − α."""

    name = "skew_forward_kl"

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def _log_m(self, s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
        return torch.logaddexp(t_lp + safe_log(self.alpha), s_lp + safe_log(1 - self.alpha))

    def value(self, s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
        return xdiff(t_lp, t_lp, self._log_m(s_lp, t_lp)).sum(-1)

    def probability_grad(self, s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
        return -(1 - self.alpha) * (t_lp - self._log_m(s_lp, t_lp)).exp()  # −(1 − α)·t/m

    def sampled_reward(self, log_r: torch.Tensor, form: str = "score") -> torch.Tensor:
        a, r = self.alpha, log_r.exp()
        u = a * r + (1 - a)
        if form == "score":
            return (1 - a) * (r / u - 1)
        return -(r * (log_r - u.log()) - (1 - a) * (r - 1))


class SkewReverseKLFormula(FullVocabFormula):
    """SRKL: KL(s ‖ α·s + (1 − α)·t); f(r) = −log w, w = α + (1 − α) r, f'(1) = −(1 − α)."""

    name = "skew_reverse_kl"

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def _log_m(self, s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
        return torch.logaddexp(s_lp + safe_log(self.alpha), t_lp + safe_log(1 - self.alpha))

    def value(self, s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
        return xdiff(s_lp, s_lp, self._log_m(s_lp, t_lp)).sum(-1)

    def probability_grad(self, s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
        log_s_over_m = s_lp - self._log_m(s_lp, t_lp)
        return log_s_over_m - self.alpha * log_s_over_m.exp()  # log(s/m) + 1 − α·s/m (constant dropped)

    def sampled_reward(self, log_r: torch.Tensor, form: str = "score") -> torch.Tensor:
        a, r = self.alpha, log_r.exp()
        w = a + (1 - a) * r
        if form == "score":
            return w.log() - (1 - a) * (r / w - 1)
        return -(-w.log() + (1 - a) * (r - 1))


class SkewKL(FullVocabDivergence):
    """Skewed KL per completion token over the full vocabulary (DistiLLM's SKL / SRKL):

    * ``direction: forward`` (SKL): ``KL(π_t ‖ α·π_t + (1 − α)·π_s)``
    * ``direction: reverse`` (SRKL): ``KL(π_s ‖ α·π_s + (1 − α)·π_t)``

    α = 0 is the plain forward/reverse KL. Mixing α of the first distribution into the second bounds the log-ratio
    by −log α, which keeps the loss and its gradient finite where the student (SKL) or the teacher (SRKL) puts
    almost no mass. Computed in chunks of ``chunk_size`` tokens with a recomputing autograd function.

    Temperature: the student logits arrive already divided by the sampling temperature and the teacher's log-probs
    are scored at the teacher's temperature; nothing is rescaled here.

    Reward at the sampled token (r = π_t(x)/π_s(x)): ``score`` gives the reward whose policy gradient is −∇D in
    expectation (SKL: ``(1 − α)(r/u − 1)``, u = α·r + 1 − α; SRKL: ``log w − (1 − α)(r/w − 1)``, w = α + (1 − α)·r);
    ``estimate`` an unbiased non-negative estimate of −D.

    Paper: Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models",
    https://arxiv.org/abs/2402.03898 (α = 0.1 there).
    """

    name: ClassVar[str] = "skew_kl"

    class Params(FullVocabParams):
        alpha: float = Field(0.1, ge=0.0, lt=1.0, description="Skew α in [0, 1): the share of the first "
                                                              "distribution mixed into the second (0 = plain KL).")
        direction: Literal["forward", "reverse"] = Field(
            "forward", description="forward: KL(teacher ‖ α·teacher + (1 − α)·student) (SKL); "
                                   "reverse: KL(student ‖ α·student + (1 − α)·teacher) (SRKL).")

    def formula(self) -> FullVocabFormula:
        cls = SkewForwardKLFormula if self.params.direction == "forward" else SkewReverseKLFormula
        return cls(self.params.alpha)
