"""Full-vocabulary per-token divergences computed in chunks of tokens, and their sampled-token rewards.

:func:`full_vocab_divergence` takes student logits ``(..., V)`` (already divided by the temperature) and teacher
log-probs ``(..., V)`` and returns the per-token divergence ``(...)``. With ``chunk_size > 0`` it runs through
:class:`ChunkedDivergence`, a ``torch.autograd.Function`` that computes the forward pass ``chunk_size`` tokens at a
time and, in the backward pass, recomputes each chunk and applies the closed-form gradient with respect to the
logits. It saves only its two inputs, so besides them and the gradient of the logits nothing larger than
``(chunk_size, V)`` is alive: no full ``(B, T, V)`` probability tensor, let alone a student/teacher pair of them.
``chunk_size = 0`` is the plain autograd computation (the reference the chunked path is tested against).

Divergences (``s``, ``t`` the student and teacher distributions at one position; TRL's conventions):

* ``reverse_kl``: KL(s ‖ t) = Σ s (log s − log t)
* ``forward_kl``: KL(t ‖ s) = Σ t (log t − log s)
* ``jsd`` (0 < β < 1): β·KL(t ‖ m) + (1 − β)·KL(s ‖ m) with m = (1 − β)·s + β·t, as
  ``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`` (β = 0 and β = 1 are forward and reverse KL there)
* ``tv``: ½ Σ |s − t|
* ``skew_forward_kl`` (α): KL(t ‖ α·t + (1 − α)·s);  ``skew_reverse_kl`` (α): KL(s ‖ α·s + (1 − α)·t)

Every one is an f-divergence Σ_x s(x)·f(r(x)) of the ratio r = t/s, which is what the sampled-token rewards below
use: :func:`sampled_reward` gives, from the two log-probs of the *sampled* token alone, either the reward whose
policy gradient is exactly −∇D in expectation (``score``) or an unbiased, pointwise non-negative estimate of D
(``estimate``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from opd_plugins.components import ComponentParams
from opd_plugins.divergences.base import Divergence, DivergenceTerms, StudentOutputs
from opd_plugins.teachers.base import Capability, TeacherScores

KINDS: tuple[str, ...] = ("reverse_kl", "forward_kl", "jsd", "tv", "skew_forward_kl", "skew_reverse_kl")


def _log(x: float) -> float:
    return math.log(x) if x > 0 else float("-inf")


_INF = float("inf")


def _zero_nan(x: torch.Tensor) -> torch.Tensor:
    """NaN → 0 in place, infinities kept: the NaNs here are 0·(±∞) terms whose limit is 0 (as in xlogy)."""
    return x.nan_to_num_(nan=0.0, posinf=_INF, neginf=-_INF)


def _xdiff(p_logp: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``p · (a − b)`` with ``p = exp(p_logp)``, and 0 where p = 0 and a − b = ±∞."""
    return _zero_nan(p_logp.exp() * (a - b))


def divergence_from_logps(kind: str, coef: float, s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
    """Per-token divergence from normalised log-probs ``(..., V)``; plain differentiable torch ops."""
    if kind == "reverse_kl":
        return _xdiff(s_lp, s_lp, t_lp).sum(-1)
    if kind == "forward_kl":
        return _xdiff(t_lp, t_lp, s_lp).sum(-1)
    if kind == "jsd":
        lm = torch.logaddexp(s_lp + _log(1 - coef), t_lp + _log(coef))
        return coef * _xdiff(t_lp, t_lp, lm).sum(-1) + (1 - coef) * _xdiff(s_lp, s_lp, lm).sum(-1)
    if kind == "tv":
        return 0.5 * (s_lp.exp() - t_lp.exp()).abs().sum(-1)
    if kind == "skew_forward_kl":
        lm = torch.logaddexp(t_lp + _log(coef), s_lp + _log(1 - coef))
        return _xdiff(t_lp, t_lp, lm).sum(-1)
    if kind == "skew_reverse_kl":
        lm = torch.logaddexp(s_lp + _log(coef), t_lp + _log(1 - coef))
        return _xdiff(s_lp, s_lp, lm).sum(-1)
    raise ValueError(f"unknown divergence kind {kind!r}; expected one of {', '.join(KINDS)}")


def _logit_grad(kind: str, coef: float, s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
    """Closed-form gradient of the per-token divergence with respect to the student logits ``(n, V)``.

    With g = ∂D/∂s (the derivative in probability space), the softmax chain rule gives
    ∂D/∂z = s ⊙ (g − Σ_v s_v g_v).
    """
    s = s_lp.exp()
    if kind == "forward_kl":
        t = t_lp.exp()
        return s * t.sum(-1, keepdim=True) - t  # g = −t/s
    if kind == "reverse_kl":
        g = s_lp - t_lp  # (+1, which the softmax projection removes)
    elif kind == "jsd":
        g = (1 - coef) * (s_lp - torch.logaddexp(s_lp + _log(1 - coef), t_lp + _log(coef)))
    elif kind == "tv":
        g = 0.5 * torch.sign(s - t_lp.exp())
    elif kind == "skew_forward_kl":
        lm = torch.logaddexp(t_lp + _log(coef), s_lp + _log(1 - coef))
        g = -(1 - coef) * (t_lp - lm).exp()  # −(1 − α)·t/m
    elif kind == "skew_reverse_kl":
        log_s_over_m = s_lp - torch.logaddexp(s_lp + _log(coef), t_lp + _log(1 - coef))
        g = log_s_over_m - coef * log_s_over_m.exp()  # log(s/m) + 1 − α·s/m (constant dropped)
    else:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {', '.join(KINDS)}")
    sg = _zero_nan(s * g)
    return sg - s * sg.sum(-1, keepdim=True)


class ChunkedDivergence(torch.autograd.Function):
    """Per-token divergence over ``(N, V)`` rows, ``chunk`` rows at a time; backward recomputes each chunk.

    Saves only the inputs. Gradients flow to the student logits only: teacher log-probs are constants.
    """

    @staticmethod
    def forward(ctx, s_logits: torch.Tensor, t_logps: torch.Tensor, kind: str, coef: float, chunk: int):
        ctx.save_for_backward(s_logits, t_logps)
        ctx.kind, ctx.coef, ctx.chunk = kind, coef, chunk
        out = torch.empty(s_logits.shape[0], dtype=torch.float32, device=s_logits.device)
        for i in range(0, s_logits.shape[0], chunk):
            s_lp = torch.log_softmax(s_logits[i:i + chunk].float(), -1)
            out[i:i + chunk] = divergence_from_logps(kind, coef, s_lp, t_logps[i:i + chunk].float())
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        s_logits, t_logps = ctx.saved_tensors
        grad = torch.empty_like(s_logits)
        for i in range(0, s_logits.shape[0], ctx.chunk):
            s_lp = torch.log_softmax(s_logits[i:i + ctx.chunk].float(), -1)
            g = _logit_grad(ctx.kind, ctx.coef, s_lp, t_logps[i:i + ctx.chunk].float())
            grad[i:i + ctx.chunk] = g.mul_(grad_out[i:i + ctx.chunk].unsqueeze(-1))
        return grad, None, None, None, None


def full_vocab_divergence(student_logits: torch.Tensor, teacher_logps: torch.Tensor, kind: str, coef: float = 0.0,
                          chunk_size: int = 256) -> torch.Tensor:
    """Per-token divergence ``(...)`` between ``softmax(student_logits)`` and ``exp(teacher_logps)``, both ``(..., V)``.

    ``student_logits`` are used as given: divide by the sampling temperature before calling (the trainer does).
    ``chunk_size`` tokens per chunk; 0 computes everything at once with plain autograd. The result is float32.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {', '.join(KINDS)}")
    if student_logits.shape != teacher_logps.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher log-probs "
                         f"{tuple(teacher_logps.shape)} must have the same shape (..., V)")
    if teacher_logps.requires_grad:
        raise ValueError("teacher log-probs must not require grad: the teacher is a constant of the divergence")
    if chunk_size <= 0:
        s_lp = torch.log_softmax(student_logits.float(), -1)
        return divergence_from_logps(kind, coef, s_lp, teacher_logps.float())
    lead, V = student_logits.shape[:-1], student_logits.shape[-1]
    flat = ChunkedDivergence.apply(student_logits.reshape(-1, V), teacher_logps.reshape(-1, V), kind, coef, chunk_size)
    return flat.view(lead)


# ---------------------------------------------------------------------------------------------------------------
# Sampled-token rewards. D = Σ_x s(x)·f(r(x)), r = t/s; from x ~ s:
#   score:    reward −(f(r) − r·f'(r) + f'(1)); E_s[reward·∇log s] = −∇D exactly (REINFORCE with this per-token
#             reward follows the divergence's gradient), and the reward is 0 where t = s.
#   estimate: reward −(f(r) − f'(1)·(r − 1)); E_s[−reward] = D exactly and −reward ≥ 0 pointwise (f convex), but
#             its score-function gradient drops E_s[∇f(r)] and is biased (except for reverse KL, where score's
#             log-ratio is the classic choice).
# ---------------------------------------------------------------------------------------------------------------


def sampled_reward(kind: str, coef: float, log_r: torch.Tensor, form: str = "score") -> torch.Tensor:
    """Per-token reward from ``log_r = log t(x) − log s(x)`` at the sampled token ``x ~ s`` (see above)."""
    r = log_r.exp()
    if kind == "reverse_kl":  # f = −log r
        return log_r if form == "score" else -(r - 1 - log_r)
    if kind == "forward_kl":  # f = r log r
        return r - 1 if form == "score" else -(r * log_r - (r - 1))
    if kind == "jsd":  # f = β r log(r/u) − (1 − β) log u, u = 1 − β + β r; f'(1) = 0
        log_u = torch.log1p(coef * (r - 1))
        return (1 - coef) * log_u if form == "score" else -(coef * r * (log_r - log_u) - (1 - coef) * log_u)
    if kind == "tv":  # f = ½|r − 1| (subgradient 0 at r = 1)
        return 0.5 * torch.sign(r - 1) if form == "score" else -0.5 * (r - 1).abs()
    if kind == "skew_forward_kl":  # f = r log(r/u), u = α r + 1 − α; f'(1) = 1 − α
        u = coef * r + (1 - coef)
        if form == "score":
            return (1 - coef) * (r / u - 1)
        return -(r * (log_r - u.log()) - (1 - coef) * (r - 1))
    if kind == "skew_reverse_kl":  # f = −log w, w = α + (1 − α) r; f'(1) = −(1 − α)
        w = coef + (1 - coef) * r
        if form == "score":
            return w.log() - (1 - coef) * (r / w - 1)
        return -(-w.log() + (1 - coef) * (r - 1))
    raise ValueError(f"unknown divergence kind {kind!r}; expected one of {', '.join(KINDS)}")


# ---------------------------------------------------------------------------------------------------------------
# Shared shape of the full-vocabulary components (forward_kl, jsd, tv, skew_kl)
# ---------------------------------------------------------------------------------------------------------------


class FullVocabParams(ComponentParams):
    """Params every full-vocabulary divergence has."""

    chunk_size: int = Field(256, ge=0, description="Tokens per chunk of the full-vocabulary computation; 0 = all at "
                                                     "once (holds several (B, T, V) tensors).")
    reward: Literal["score", "estimate"] = Field(
        "score", description="Per-token reward at the sampled token: 'score' (its policy gradient is exactly −∇D in "
                             "expectation) or 'estimate' (an unbiased, non-negative estimate of −D).")


class FullVocabDivergence(Divergence):
    """A divergence computed exactly over the vocabulary from student logits and teacher log-probs.

    Subclasses say which divergence through :meth:`kind_and_coef`. The loss is the exact per-token divergence
    (differentiated directly, chunked over tokens); the value is the same, detached; the reward is the sampled-token
    form chosen by ``reward`` (see :func:`sampled_reward`).
    """

    Params = FullVocabParams

    def kind_and_coef(self) -> tuple[str, float]:
        raise NotImplementedError

    def requires(self) -> Capability:
        return "full"

    def per_token(self, student: StudentOutputs, teacher: TeacherScores) -> DivergenceTerms:
        if student.logits is None or teacher.logps is None:
            missing = "student logits" if student.logits is None else "teacher full-vocabulary log-probs"
            raise ValueError(f"divergence {self.name!r} needs {missing} (requires() == 'full')")
        kind, coef = self.kind_and_coef()
        mask = student.mask * teacher.mask
        value = full_vocab_divergence(student.logits, teacher.logps, kind, coef, self.params.chunk_size) * mask
        return DivergenceTerms(loss=value, value=value.detach())

    def reward(self, student: StudentOutputs, teacher: TeacherScores) -> torch.Tensor:
        kind, coef = self.kind_and_coef()
        mask = student.mask * teacher.mask
        log_r = (teacher.token_logps - student.token_logps).detach().float()
        log_r = torch.where(mask > 0, log_r, torch.zeros_like(log_r))  # padding may hold anything: reward 0 there
        return (sampled_reward(kind, coef, log_r, self.params.reward) * mask).detach()
