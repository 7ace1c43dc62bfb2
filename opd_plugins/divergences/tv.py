"""``tv``: total variation distance ½ Σ_v |π_s(v) − π_t(v)| over the full vocabulary."""

from __future__ import annotations

from typing import ClassVar

import torch

from opd_plugins.divergences.full_vocab import FullVocabDivergence, FullVocabFormula, FullVocabParams


class TVFormula(FullVocabFormula):
    """½ Σ |s − t|; f(r) = ½|r − 1| (subgradient 0 at r = 1)."""

    name = "tv"

    def value(self, s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
        return 0.5 * (s_lp.exp() - t_lp.exp()).abs().sum(-1)

    def probability_grad(self, s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.sign(s_lp.exp() - t_lp.exp())

    def sampled_reward(self, log_r: torch.Tensor, form: str = "score") -> torch.Tensor:
        r = log_r.exp()
        return 0.5 * torch.sign(r - 1) if form == "score" else -0.5 * (r - 1).abs()


TOTAL_VARIATION = TVFormula()


class TV(FullVocabDivergence):
    """Total variation distance, ``½ Σ_v |π_s(v) − π_t(v)|`` ∈ [0, 1], per completion token.

    Bounded, symmetric, and insensitive to how small the probabilities in the tails are (unlike either KL), at the
    price of a gradient that does not shrink as the student approaches the teacher: ∂TV/∂π_s(v) = ½·sign(π_s(v) −
    π_t(v)), taken as 0 where they are equal (a subgradient, so ``TV(p, p)`` has zero gradient). Computed in chunks
    of ``chunk_size`` tokens with a recomputing autograd function.

    Temperature: the student logits arrive already divided by the sampling temperature and the teacher's log-probs
    are scored at the teacher's temperature; nothing is rescaled here.

    Reward at the sampled token (r = π_t(x)/π_s(x)): ``score`` gives ``½·sign(r − 1)`` (+½ where the teacher
    prefers the token more than the student does), whose policy gradient is −∇TV in expectation; ``estimate``
    gives ``−½|r − 1|``, an unbiased non-negative estimate of −TV.

    Paper: total variation as a distillation objective in "f-Divergence Minimization for Sequence-Level Knowledge
    Distillation" (Wen et al., f-DISTILL), https://arxiv.org/abs/2307.15190.
    """

    name: ClassVar[str] = "tv"

    class Params(FullVocabParams):
        pass

    def formula(self) -> FullVocabFormula:
        return TOTAL_VARIATION
