"""The shared full-vocabulary kernels: a per-position divergence over ``(N, V)`` rows, computed in chunks.

They serve every full-vocabulary divergence, built-in or plugin, through its
:class:`~opd_plugins.divergences.full_vocab.FullVocabFormula` (``value`` and, when it has one, a closed-form
``logit_grad``; without one the backward pass differentiates ``value`` chunk by chunk with autograd):

* :class:`ChunkedDivergence` takes student logits ``(N, V)`` (already divided by the temperature) and teacher
  log-probs ``(N, V)``; it saves only its two inputs and recomputes each chunk in the backward pass, so besides them
  and the gradient of the logits nothing larger than ``(chunk, V)`` is alive.
* :class:`FusedLinearDivergence` (``fused_lm_head``) takes the final hidden states ``(N, H)`` and the output layer
  ``(V, H)`` and computes the student logits chunk by chunk as well, so neither the ``(N, V)`` logits nor their
  gradient ever exist; it returns the student's log-prob of given target tokens too, and its backward gives the
  gradients of the hidden states, the weight and the bias through both outputs.
"""

from __future__ import annotations

from typing import Any

import torch

from opd_plugins.lm_head import chunk_logits


def _logit_grad(formula: Any, s_lp: torch.Tensor, t_lp: torch.Tensor, z: torch.Tensor,
                grad_out: torch.Tensor) -> torch.Tensor:
    """``∂(Σ grad_out · D) / ∂z`` for a chunk: the formula's closed form when it has one, else autograd through
    ``value`` (``z`` are the chunk's student logits divided by the temperature, ``s_lp = log_softmax(z)``)."""
    g = formula.logit_grad(s_lp, t_lp)
    if g is not None:
        return g.mul_(grad_out.float().unsqueeze(-1))
    with torch.enable_grad():
        zz = z.detach().float().requires_grad_(True)
        value = formula.value(torch.log_softmax(zz, -1), t_lp)
        (g,) = torch.autograd.grad((value * grad_out.float()).sum(), zz)
    return g


class ChunkedDivergence(torch.autograd.Function):
    """Per-token divergence over ``(N, V)`` rows, ``chunk`` rows at a time; backward recomputes each chunk.

    Saves only the inputs. Gradients flow to the student logits only: teacher log-probs are constants.
    """

    @staticmethod
    def forward(ctx, s_logits: torch.Tensor, t_logps: torch.Tensor, formula: Any, chunk: int):
        ctx.save_for_backward(s_logits, t_logps)
        ctx.formula, ctx.chunk = formula, chunk
        out = torch.empty(s_logits.shape[0], dtype=torch.float32, device=s_logits.device)
        for i in range(0, s_logits.shape[0], chunk):
            s_lp = torch.log_softmax(s_logits[i:i + chunk].float(), -1)
            out[i:i + chunk] = formula.value(s_lp, t_logps[i:i + chunk].float())
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        s_logits, t_logps = ctx.saved_tensors
        grad = torch.empty_like(s_logits)
        for i in range(0, s_logits.shape[0], ctx.chunk):
            z = s_logits[i:i + ctx.chunk].float()
            s_lp = torch.log_softmax(z, -1)
            grad[i:i + ctx.chunk] = _logit_grad(ctx.formula, s_lp, t_logps[i:i + ctx.chunk].float(), z,
                                                grad_out[i:i + ctx.chunk])
        return grad, None, None, None


class FusedLinearDivergence(torch.autograd.Function):
    """Per-token divergence and target-token log-prob from hidden states ``(N, H)`` and an output layer
    ``(V, H)``, ``chunk`` rows at a time; backward recomputes each chunk's logits.

    Returns ``(divergence (N,), token_logps (N,), entropy (N,))`` in float32 (zeros for one not asked for:
    ``t_logps`` or ``target`` None, ``entropy`` False; the entropy has no gradient). Saves only the inputs, so besides them, the gradients of ``hidden``/``weight``/``bias`` and a
    float32 copy of ``weight`` (the backward's, when it is not already float32) nothing larger than ``(chunk, V)``
    is alive. Gradients flow to ``hidden``, ``weight`` and ``bias`` through both outputs.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, t_logps, target, formula, temperature, chunk, entropy=False,
                t_head=None):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, t_logps, target)
        ctx.formula, ctx.temperature, ctx.chunk, ctx.t_head = formula, temperature, chunk, t_head
        ctx.has_teacher = t_logps is not None or t_head is not None
        n = hidden.shape[0]
        div = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        tok = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        ent = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        for i in range(0, n, chunk):
            s_lp = torch.log_softmax(chunk_logits(hidden[i:i + chunk], weight, bias, temperature), -1)
            if ctx.has_teacher:
                div[i:i + chunk] = formula.value(s_lp, _teacher_chunk(t_logps, t_head, i, chunk, s_lp.device))
            if target is not None:
                tok[i:i + chunk] = s_lp.gather(-1, target[i:i + chunk].unsqueeze(-1)).squeeze(-1)
            if entropy:
                ent[i:i + chunk] = -(s_lp.exp() * s_lp).sum(-1)
        ctx.mark_non_differentiable(ent)
        return div, tok, ent

    @staticmethod
    def backward(ctx, grad_div, grad_tok, grad_ent=None):
        hidden, weight, bias, t_logps, target = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_div = grad_div if ctx.has_teacher else None
        grad_tok = grad_tok if target is not None else None
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        if grad_div is None and grad_tok is None:
            return (_cast(grad_h, hidden), _cast(grad_w, weight), _cast(grad_b, bias),
                    None, None, None, None, None, None, None)
        w32 = weight.float() if need_h else None  # no copy when weight is float32
        for i in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[i:i + ctx.chunk]
            z = chunk_logits(h, weight, bias, ctx.temperature)
            s_lp = torch.log_softmax(z, -1)
            gz = None  # ∂loss/∂(logits / τ) for this chunk, (n, V) float32
            if grad_div is not None:
                t_lp = _teacher_chunk(t_logps, ctx.t_head, i, ctx.chunk, s_lp.device)
                gz = _logit_grad(ctx.formula, s_lp, t_lp, z, grad_div[i:i + ctx.chunk])
                del t_lp
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
        return (_cast(grad_h, hidden), _cast(grad_w, weight), _cast(grad_b, bias),
                None, None, None, None, None, None, None)


def _teacher_chunk(t_logps: torch.Tensor | None, t_head: Any, i: int, chunk: int,
                   device: torch.device) -> torch.Tensor:
    """The teacher's float32 log-probs ``(n, V)`` of rows ``i:i + chunk``: sliced from ``t_logps``, or computed now
    from the teacher's hidden states and head ``t_head = (hidden (N, H_t), LMHead)``."""
    if t_logps is not None:
        return t_logps[i:i + chunk].float()
    hidden, head = t_head
    return torch.log_softmax(head.logits(hidden[i:i + chunk]), -1).to(device)


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None else grad.to(like.dtype)


def check_fused(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk_size: int,
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


def chunked_divergence(student_logits: torch.Tensor, teacher_logps: torch.Tensor, formula: Any,
                       chunk_size: int = 256) -> torch.Tensor:
    """Per-token divergence ``(...)`` between ``softmax(student_logits)`` and ``exp(teacher_logps)``, both
    ``(..., V)``, by ``formula``. ``student_logits`` are used as given (divide by the sampling temperature first);
    ``chunk_size`` tokens per chunk, 0 = everything at once with plain autograd. Float32."""
    if student_logits.shape != teacher_logps.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher log-probs "
                         f"{tuple(teacher_logps.shape)} must have the same shape (..., V)")
    if teacher_logps.requires_grad:
        raise ValueError("teacher log-probs must not require grad: the teacher is a constant of the divergence")
    if chunk_size <= 0:
        return formula.value(torch.log_softmax(student_logits.float(), -1), teacher_logps.float())
    lead, V = student_logits.shape[:-1], student_logits.shape[-1]
    flat = ChunkedDivergence.apply(student_logits.reshape(-1, V), teacher_logps.reshape(-1, V), formula, chunk_size)
    return flat.view(lead)


def fused_divergence(hidden: torch.Tensor, weight: torch.Tensor, teacher_logps: torch.Tensor | None, formula: Any,
                     temperature: float = 1.0, chunk_size: int = 256, target_ids: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, teacher_head: tuple[torch.Tensor, Any] | None = None):
    """Per-token divergence ``(...)`` between ``softmax((hidden @ weight.T + bias) / temperature)`` and
    ``exp(teacher_logps)``, ``chunk_size`` tokens at a time from the final hidden states ``(..., H)`` and the output
    layer ``weight (V, H)`` (``bias (V,)``): neither the ``(..., V)`` student logits nor their gradient is held
    (what Liger-Kernel's fused linear JSD does). Gradients flow to ``hidden``, ``weight`` and ``bias``.

    With ``target_ids (...)`` it returns ``(divergence, token_logps)``, the second the student's log-prob of each
    target token (differentiable too); otherwise the divergence alone. Both are float32. The head must be linear.

    ``teacher_head = (teacher_hidden (..., H_t), LMHead)`` replaces ``teacher_logps`` (None then): the teacher's
    log-probs are computed a chunk at a time from its own final hidden states and head as well (in the forward
    and again in the backward), so they never exist for all positions either.
    """
    check_fused(hidden, weight, bias, chunk_size, target_ids)
    lead, H, V = hidden.shape[:-1], hidden.shape[-1], weight.shape[0]
    t_head = None
    if teacher_head is not None:
        t_hidden, t_lm = teacher_head
        if teacher_logps is not None or tuple(t_hidden.shape[:-1]) != tuple(lead) or t_lm.weight.shape[0] != V:
            raise ValueError(f"teacher hidden states {tuple(t_hidden.shape)} with head {tuple(t_lm.weight.shape)} "
                             f"must be (..., H_t) and (V, H_t) for (...) = {tuple(lead)}, V = {V}, without "
                             "teacher log-probs")
        if t_hidden.requires_grad or t_lm.weight.requires_grad:
            raise ValueError("the teacher's hidden states and head must not require grad: the teacher is a "
                             "constant of the divergence")
        t_head = (t_hidden.reshape(-1, t_hidden.shape[-1]), t_lm)
    else:
        if teacher_logps.shape != (*hidden.shape[:-1], weight.shape[0]):
            raise ValueError(f"teacher log-probs {tuple(teacher_logps.shape)} must be (..., V) = "
                             f"{(*hidden.shape[:-1], weight.shape[0])}")
        if teacher_logps.requires_grad:
            raise ValueError("teacher log-probs must not require grad: the teacher is a constant of the divergence")
        teacher_logps = teacher_logps.reshape(-1, V)
    target = None if target_ids is None else target_ids.reshape(-1)
    div, tok, _ = FusedLinearDivergence.apply(hidden.reshape(-1, H), weight, bias, teacher_logps, target, formula,
                                              float(temperature), chunk_size, False, t_head)
    return div.view(lead) if target_ids is None else (div.view(lead), tok.view(lead))


def fused_token_logps(hidden: torch.Tensor, weight: torch.Tensor, target_ids: torch.Tensor, temperature: float = 1.0,
                      chunk_size: int = 256, bias: torch.Tensor | None = None, *, entropy: bool = False):
    """The student's log-prob ``(...)`` of each target token from the final hidden states ``(..., H)``, chunk by
    chunk as :func:`fused_divergence` (no ``(..., V)`` logits held); differentiable, float32. With ``entropy``,
    ``(token_logps, entropies)``: the exact entropy of each position's distribution from the same pass (detached)."""
    check_fused(hidden, weight, bias, chunk_size, target_ids)
    lead, H = hidden.shape[:-1], hidden.shape[-1]
    _, tok, ent = FusedLinearDivergence.apply(hidden.reshape(-1, H), weight, bias, None, target_ids.reshape(-1), None,
                                              float(temperature), chunk_size, entropy)
    return (tok.view(lead), ent.view(lead)) if entropy else tok.view(lead)


__all__ = ["ChunkedDivergence", "FusedLinearDivergence", "chunked_divergence", "fused_divergence", "fused_token_logps"]
