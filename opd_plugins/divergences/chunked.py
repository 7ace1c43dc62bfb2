"""The full-vocabulary kernels by divergence name: what earlier releases had here, kept for their callers.

The kernels are :mod:`opd_plugins.divergences._kernels` and each divergence's maths is its
:class:`~opd_plugins.divergences.full_vocab.FullVocabFormula`, in the divergence's own file; new code passes a formula
(``chunked_divergence(logits, teacher_logps, ReverseKL.formula(...))``). This module maps the names
:data:`KINDS` onto those formulas.
"""

from __future__ import annotations

import torch

from opd_plugins.divergences._kernels import chunked_divergence, fused_divergence, fused_token_logps
from opd_plugins.divergences.forward_kl import FORWARD_KL
from opd_plugins.divergences.full_vocab import (  # noqa: F401 - re-exported
    FullVocabDivergence,
    FullVocabFormula,
    FullVocabParams,
    check_fused_params,
    student_divergence,
)
from opd_plugins.divergences.jsd import JSDFormula
from opd_plugins.divergences.reverse_kl import REVERSE_KL
from opd_plugins.divergences.skew_kl import SkewForwardKLFormula, SkewReverseKLFormula
from opd_plugins.divergences.tv import TOTAL_VARIATION

KINDS: tuple[str, ...] = ("reverse_kl", "forward_kl", "jsd", "tv", "skew_forward_kl", "skew_reverse_kl")


def formula_of(kind: str, coef: float = 0.0) -> FullVocabFormula:
    """The built-in formula named ``kind`` (``coef``: JSD's β, a skewed KL's α)."""
    fixed = {"reverse_kl": REVERSE_KL, "forward_kl": FORWARD_KL, "tv": TOTAL_VARIATION}
    if kind in fixed:
        return fixed[kind]
    if kind == "jsd":
        return JSDFormula(coef)
    if kind == "skew_forward_kl":
        return SkewForwardKLFormula(coef)
    if kind == "skew_reverse_kl":
        return SkewReverseKLFormula(coef)
    raise ValueError(f"unknown divergence kind {kind!r}; expected one of {', '.join(KINDS)}")


def divergence_from_logps(kind: str, coef: float, s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
    """Per-token divergence from normalised log-probs ``(..., V)``; plain differentiable torch ops."""
    return formula_of(kind, coef).value(s_lp, t_lp)


def full_vocab_divergence(student_logits: torch.Tensor, teacher_logps: torch.Tensor, kind: str, coef: float = 0.0,
                          chunk_size: int = 256) -> torch.Tensor:
    """:func:`~opd_plugins.divergences._kernels.chunked_divergence` of the built-in divergence ``kind``."""
    return chunked_divergence(student_logits, teacher_logps, formula_of(kind, coef), chunk_size)


def fused_full_vocab_divergence(hidden: torch.Tensor, weight: torch.Tensor, teacher_logps: torch.Tensor, kind: str,
                                coef: float = 0.0, temperature: float = 1.0, chunk_size: int = 256,
                                target_ids: torch.Tensor | None = None, bias: torch.Tensor | None = None):
    """:func:`~opd_plugins.divergences._kernels.fused_divergence` of the built-in divergence ``kind``."""
    return fused_divergence(hidden, weight, teacher_logps, formula_of(kind, coef), temperature, chunk_size,
                            target_ids, bias)


def sampled_reward(kind: str, coef: float, log_r: torch.Tensor, form: str = "score") -> torch.Tensor:
    """Per-token reward from ``log_r = log t(x) − log s(x)`` at the sampled token ``x ~ s``."""
    return formula_of(kind, coef).sampled_reward(log_r, form)


__all__ = ["KINDS", "divergence_from_logps", "formula_of", "full_vocab_divergence", "fused_full_vocab_divergence",
           "fused_token_logps", "sampled_reward"]
