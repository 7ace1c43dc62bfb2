"""Full-vocabulary per-token divergences computed in chunks of tokens, and their sampled-token rewards.

:func:`full_vocab_divergence` takes student logits ``(..., V)`` (already divided by the temperature) and teacher
log-probs ``(..., V)`` and returns the per-token divergence ``(...)``. With ``chunk_size > 0`` it runs through
:class:`ChunkedDivergence`, a ``torch.autograd.Function`` that computes the forward pass ``chunk_size`` tokens at a
time and, in the backward pass, recomputes each chunk and applies the closed-form gradient with respect to the
logits. It saves only its two inputs, so besides them and the gradient of the logits nothing larger than
``(chunk_size, V)`` is alive: no full ``(B, T, V)`` probability tensor, let alone a student/teacher pair of them.
``chunk_size = 0`` is the plain autograd computation (the reference the chunked path is tested against).

:func:`fused_full_vocab_divergence` goes one step further (``fused_lm_head``): it takes the final hidden states
``(..., H)`` and the output layer ``(V, H)`` and computes the student logits chunk by chunk as well, so neither the
``(..., V)`` logits nor their gradient ever exist; it returns the student's log-prob of given target tokens too,
and its backward gives the gradients of the hidden states, the weight and the bias through both outputs.

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
from pydantic import Field, model_validator

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
# Fused with the output layer: from the final hidden states, so the (N, V) student logits never exist
# ---------------------------------------------------------------------------------------------------------------


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 temperature: float) -> torch.Tensor:
    """Student log-probs ``(n, V)`` of a chunk of hidden states: ``log_softmax(F.linear(h, W, b) / τ)``, the
    matmul in the inputs' dtype (as the model's lm head computes it), the rest in float32."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, -1)


class FusedLinearDivergence(torch.autograd.Function):
    """Per-token divergence and target-token log-prob from hidden states ``(N, H)`` and an output layer
    ``(V, H)``, ``chunk`` rows at a time; backward recomputes each chunk's logits.

    Returns ``(divergence (N,), token_logps (N,))`` in float32 (zeros for the one not asked for: ``t_logps`` or
    ``target`` None). Saves only the inputs, so besides them, the gradients of ``hidden``/``weight``/``bias`` and a
    float32 copy of ``weight`` (the backward's, when it is not already float32) nothing larger than ``(chunk, V)``
    is alive. Gradients flow to ``hidden``, ``weight`` and ``bias`` through both outputs.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, t_logps, target, kind, coef, temperature, chunk):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, t_logps, target)
        ctx.kind, ctx.coef, ctx.temperature, ctx.chunk = kind, coef, temperature, chunk
        n = hidden.shape[0]
        div = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        tok = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        for i in range(0, n, chunk):
            s_lp = _chunk_logps(hidden[i:i + chunk], weight, bias, temperature)
            if t_logps is not None:
                div[i:i + chunk] = divergence_from_logps(kind, coef, s_lp, t_logps[i:i + chunk].float())
            if target is not None:
                tok[i:i + chunk] = s_lp.gather(-1, target[i:i + chunk].unsqueeze(-1)).squeeze(-1)
        return div, tok

    @staticmethod
    def backward(ctx, grad_div, grad_tok):
        hidden, weight, bias, t_logps, target = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_div = grad_div if t_logps is not None else None
        grad_tok = grad_tok if target is not None else None
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        if grad_div is None and grad_tok is None:
            return _cast(grad_h, hidden), _cast(grad_w, weight), _cast(grad_b, bias), None, None, None, None, None, None
        w32 = weight.float() if need_h else None  # no copy when weight is float32
        for i in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[i:i + ctx.chunk]
            s_lp = _chunk_logps(h, weight, bias, ctx.temperature)
            gz = None  # ∂loss/∂(logits / τ) for this chunk, (n, V) float32
            if grad_div is not None:
                gz = _logit_grad(ctx.kind, ctx.coef, s_lp, t_logps[i:i + ctx.chunk].float())
                gz.mul_(grad_div[i:i + ctx.chunk].float().unsqueeze(-1))
            if grad_tok is not None:  # ∂ log s(y) / ∂z = onehot(y) − s
                g = grad_tok[i:i + ctx.chunk].float().unsqueeze(-1)
                g_tok = s_lp.exp().mul_(-g).scatter_add_(-1, target[i:i + ctx.chunk].unsqueeze(-1), g)
                gz = g_tok if gz is None else gz.add_(g_tok)
            if ctx.temperature != 1.0:
                gz.div_(ctx.temperature)
            if need_h:
                grad_h[i:i + ctx.chunk] = gz @ w32
            if need_w:
                grad_w.addmm_(gz.T, h.float())
            if need_b:
                grad_b += gz.sum(0)
        return _cast(grad_h, hidden), _cast(grad_w, weight), _cast(grad_b, bias), None, None, None, None, None, None


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None else grad.to(like.dtype)


def _check_fused(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk_size: int,
                 target_ids: torch.Tensor | None) -> None:
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and lm-head weight {tuple(weight.shape)} must be "
                         "(..., H) and (V, H)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"lm-head bias {tuple(bias.shape)} must be (V,) = ({weight.shape[0]},)")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0 for the fused lm-head path (got {chunk_size})")
    if target_ids is not None and target_ids.shape != hidden.shape[:-1]:
        raise ValueError(f"target ids {tuple(target_ids.shape)} must be the hidden states' leading shape "
                         f"{tuple(hidden.shape[:-1])}")


def fused_full_vocab_divergence(hidden: torch.Tensor, weight: torch.Tensor, teacher_logps: torch.Tensor, kind: str,
                                coef: float = 0.0, temperature: float = 1.0, chunk_size: int = 256,
                                target_ids: torch.Tensor | None = None, bias: torch.Tensor | None = None):
    """Per-token divergence ``(...)`` between ``softmax((hidden @ weight.T + bias) / temperature)`` and
    ``exp(teacher_logps)``, computed ``chunk_size`` tokens at a time from the final hidden states ``(..., H)`` and
    the output layer ``weight (V, H)`` (``bias (V,)``), so neither the ``(..., V)`` student logits nor their
    gradient is ever held (what Liger-Kernel's fused linear JSD does). Gradients flow to ``hidden``, ``weight``
    and ``bias``; the teacher is a constant.

    With ``target_ids (...)`` it returns ``(divergence, token_logps)``, the second the student's log-prob of each
    target token (differentiable too); otherwise the divergence alone. Both are float32. The head must be linear:
    a model that soft-caps or rescales its logits after the head is not this function's to compute.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {', '.join(KINDS)}")
    _check_fused(hidden, weight, bias, chunk_size, target_ids)
    if teacher_logps.shape != (*hidden.shape[:-1], weight.shape[0]):
        raise ValueError(f"teacher log-probs {tuple(teacher_logps.shape)} must be (..., V) = "
                         f"{(*hidden.shape[:-1], weight.shape[0])}")
    if teacher_logps.requires_grad:
        raise ValueError("teacher log-probs must not require grad: the teacher is a constant of the divergence")
    lead, H, V = hidden.shape[:-1], hidden.shape[-1], weight.shape[0]
    target = None if target_ids is None else target_ids.reshape(-1)
    div, tok = FusedLinearDivergence.apply(hidden.reshape(-1, H), weight, bias, teacher_logps.reshape(-1, V), target,
                                           kind, coef, float(temperature), chunk_size)
    return div.view(lead) if target_ids is None else (div.view(lead), tok.view(lead))


def fused_token_logps(hidden: torch.Tensor, weight: torch.Tensor, target_ids: torch.Tensor, temperature: float = 1.0,
                      chunk_size: int = 256, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The student's log-prob ``(...)`` of each target token from the final hidden states ``(..., H)``, chunk by
    chunk as :func:`fused_full_vocab_divergence` (no ``(..., V)`` logits held); differentiable, float32."""
    _check_fused(hidden, weight, bias, chunk_size, target_ids)
    lead, H = hidden.shape[:-1], hidden.shape[-1]
    _, tok = FusedLinearDivergence.apply(hidden.reshape(-1, H), weight, bias, None, target_ids.reshape(-1), None, 0.0,
                                         float(temperature), chunk_size)
    return tok.view(lead)


def check_fused_params(params: ComponentParams) -> None:
    """``fused_lm_head`` computes in chunks: refuse ``chunk_size: 0`` with it (a Params validator's body)."""
    if params.fused_lm_head and params.chunk_size == 0:
        raise ValueError("fused_lm_head computes the logits chunk by chunk, so chunk_size must be > 0; set "
                         "chunk_size (e.g. 256) or fused_lm_head: false")


def student_divergence(name: str, student: StudentOutputs, teacher: TeacherScores, kind: str, coef: float,
                       chunk_size: int) -> torch.Tensor:
    """Per-token divergence ``(B, T)`` (unmasked) of a full-vocabulary component, from the student's final hidden
    states and lm head when :class:`StudentOutputs` carries them (``fused_lm_head``), else from its logits."""
    if teacher.logps is None:
        raise ValueError(f"divergence {name!r} needs teacher full-vocabulary log-probs (requires() == 'full')")
    if student.hidden is not None and student.lm_head is not None:
        head = student.lm_head
        return fused_full_vocab_divergence(student.hidden, head.weight, teacher.logps, kind, coef, head.temperature,
                                           chunk_size, bias=head.bias)
    if student.logits is None:
        raise ValueError(f"divergence {name!r} needs student logits, or its final hidden states and lm head with "
                         "fused_lm_head (requires() == 'full')")
    return full_vocab_divergence(student.logits, teacher.logps, kind, coef, chunk_size)


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
    fused_lm_head: bool = Field(
        False, description="Compute the student logits chunk by chunk from the final hidden states and the lm head "
                           "(the (B, T, V) logits and their gradient never exist); token weightings then get no "
                           "student logits.")

    @model_validator(mode="after")
    def _fused_needs_chunks(self):
        check_fused_params(self)
        return self


class FullVocabDivergence(Divergence):
    """A divergence computed exactly over the vocabulary from student logits and teacher log-probs.

    Subclasses say which divergence through :meth:`kind_and_coef`. The loss is the exact per-token divergence
    (differentiated directly, chunked over tokens); the value is the same, detached; the reward is the sampled-token
    form chosen by ``reward`` (see :func:`sampled_reward`). With ``fused_lm_head`` the trainer passes the final
    hidden states and the lm head instead of the logits (:func:`fused_full_vocab_divergence`).
    """

    Params = FullVocabParams

    def kind_and_coef(self) -> tuple[str, float]:
        raise NotImplementedError

    def requires(self) -> Capability:
        return "full"

    def uses_hidden_states(self) -> bool:
        return self.params.fused_lm_head

    def per_token(self, student: StudentOutputs, teacher: TeacherScores) -> DivergenceTerms:
        kind, coef = self.kind_and_coef()
        mask = student.mask * teacher.mask
        value = student_divergence(self.name, student, teacher, kind, coef, self.params.chunk_size) * mask
        return DivergenceTerms(loss=value, value=value.detach())

    def reward(self, student: StudentOutputs, teacher: TeacherScores) -> torch.Tensor:
        kind, coef = self.kind_and_coef()
        mask = student.mask * teacher.mask
        log_r = (teacher.token_logps - student.token_logps).detach().float()
        log_r = torch.where(mask > 0, log_r, torch.zeros_like(log_r))  # padding may hold anything: reward 0 there
        return (sampled_reward(kind, coef, log_r, self.params.reward) * mask).detach()
