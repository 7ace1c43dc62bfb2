"""``forward_kl``: KL(teacher ‖ student) over the full vocabulary (mode-covering; supervised KD's objective)."""

from __future__ import annotations

from typing import ClassVar

import torch

from opd_plugins.divergences.full_vocab import FullVocabDivergence, FullVocabFormula, FullVocabParams, xdiff


class ForwardKLFormula(FullVocabFormula):
    """KL(t ‖ s) = Σ t (log t − log s); f(r) = r log r."""

    name = "forward_kl"

    def value(self, s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
        return xdiff(t_lp, t_lp, s_lp).sum(-1)

    def logit_grad(self, s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
        t = t_lp.exp()
        return s_lp.exp() * t.sum(-1, keepdim=True) - t  # g = −t/s projected: s − t (for normalised t)

    def sampled_reward(self, log_r: torch.Tensor, form: str = "score") -> torch.Tensor:
        r = log_r.exp()
        return r - 1 if form == "score" else -(r * log_r - (r - 1))


FORWARD_KL = ForwardKLFormula()


class ForwardKL(FullVocabDivergence):
    """Forward KL, KL(π_teacher ‖ π_student) = Σ_v π_t(v)(log π_t(v) − log π_s(v)), per completion token.

    Computed exactly from the student's logits and the teacher's full-vocabulary log-probs, in chunks of
    ``chunk_size`` tokens (a custom autograd function that recomputes each chunk in the backward pass, so no
    ``(B, T, V)`` probability tensors are held besides the inputs). Its gradient with respect to the logits is
    ``π_s − π_t``. Equal to TRL's ``generalized_jsd_loss`` with ``beta=0``.

    Temperature: the student logits arrive already divided by the sampling temperature and the teacher's log-probs
    are scored at the teacher's temperature; nothing is rescaled here.

    Reward (OPD as RL, at the sampled token x ~ π_s, with r = π_t(x)/π_s(x)): ``score`` gives ``r − 1``, whose
    policy gradient equals −∇KL(t‖s) in expectation (unbounded above where the student samples a token the teacher
    prefers by far); ``estimate`` gives ``−(r log r − r + 1)``, an unbiased non-negative estimate of −KL(t‖s) whose
    policy gradient is biased.

    Paper: Hinton et al. (KD), https://arxiv.org/abs/1503.02531; Agarwal et al. (GKD, β = 0),
    https://arxiv.org/abs/2306.13649.
    """

    name: ClassVar[str] = "forward_kl"

    class Params(FullVocabParams):
        pass

    def formula(self) -> FullVocabFormula:
        return FORWARD_KL
