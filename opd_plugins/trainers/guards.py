"""Guards that stop training before bad numbers reach the weights.

A NaN or infinite loss term or gradient would be applied by the optimizer, and the next checkpoint would publish
weights that are NaN everywhere. :class:`FiniteGradientGuard` (installed in every trainer by
:class:`~opd_plugins.trainers.checkpointing.HookedTrainerMixin`) checks the gradient norm after clipping and before
``optimizer.step()``; :func:`check_finite_terms` checks each loss term as the loss is assembled. Both raise
:class:`~opd_plugins.errors.TrainingError` naming the step, so no step is applied and no checkpoint is published on
non-finite data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from transformers import TrainerCallback

from opd_plugins.errors import TrainingError

_HINT = ("nothing was applied and no checkpoint was written. Check the teacher's scores and the loss terms (a "
         "learning rate that is too high also does this); resume from the last checkpoint once fixed")


def check_finite_terms(terms: dict[str, torch.Tensor], step: int) -> None:
    """Raise :class:`TrainingError` if any loss term (``{"policy_gradient": t, "divergence": t, <a plugin's
    term>: t}``) holds a NaN or infinite value; ``step`` is the optimizer step being computed (1-based)."""
    bad = []
    for name, value in terms.items():
        if value is None:
            continue
        t = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        if not bool(torch.isfinite(t).all()):
            bad.append(f"{name} = {_show(t)}")
    if bad:
        raise TrainingError(f"training stopped at step {step}: the loss term {', '.join(bad)} is not finite; "
                            f"{_HINT}")


def grad_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    """The L2 norm of the parameters' local gradients (0 when there are none)."""
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    if not norms:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms])))


class FiniteGradientGuard(TrainerCallback):
    """Stops training with :class:`TrainingError` before an optimizer step whose gradient norm is not finite
    (``on_pre_optimizer_step``: after clipping, before ``optimizer.step()``; every rank checks its own gradients)."""

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            return
        norm = grad_norm(model.parameters())
        if not math.isfinite(norm):
            names = [n for n, p in model.named_parameters() if p.grad is not None
                     and not bool(torch.isfinite(p.grad).all())]
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise TrainingError(f"training stopped at step {state.global_step + 1}: the gradient norm is {norm} "
                                f"(non-finite gradients in {shown or 'the parameters'}); {_HINT}")


def _show(t: torch.Tensor) -> str:
    if t.numel() == 1:
        return str(float(t))
    bad = ~torch.isfinite(t)
    return f"{int(bad.sum())} non-finite of {t.numel()} values"


__all__ = ["FiniteGradientGuard", "check_finite_terms", "grad_norm"]
