"""The trainer's side of the ``diag/*`` metrics (maths in :mod:`opd_plugins.diagnostics`; docs/components.md).

``OPDTrainer`` holds one :class:`StepDiagnostics`. Per micro-batch with teacher scores it hands over what the loss
already computed (:meth:`StepDiagnostics.record`, under no_grad); per generation batch with task rewards it marks
the rows so that each completion's guidance can be put back in its prompt's group
(:meth:`StepDiagnostics.start_generation_batch`); every ``diagnostics.every`` optimizer steps it takes the
gradient cosine of the two loss terms (:meth:`StepDiagnostics.grad_cosine`), which leaves ``.grad`` untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from opd_plugins.diagnostics import (GRAD_METRICS, ORDER_METRIC, TOKEN_METRICS, DiagnosticsSpec, GroupGuidance,
                                     grad_cosine, hybrid_problem, sequence_guidance, token_stats)
from opd_plugins.errors import OPDError

ROW_KEY = "diag_row_index"
"""The batch field holding each completion's row in its generation batch (shuffled and split with the batch)."""


class StepDiagnostics:
    """Computes and logs the ``diag/*`` metrics. ``reduce`` sums a tensor over ranks (``accelerator.reduce``);
    ``log(name, value)`` records a metric for the current mode. Every rank calls :meth:`record` and
    :meth:`grad_cosine` at the same micro-batches, so their single reduction each is collective-safe."""

    def __init__(self, spec: DiagnosticsSpec, reduce: Callable[[torch.Tensor], torch.Tensor],
                 log: Callable[[str, float], None]) -> None:
        self.spec = spec
        self._reduce, self._log = reduce, log
        self._groups: dict[str, GroupGuidance] = {}
        self._grad_step: int | None = None

    @staticmethod
    def check(spec: DiagnosticsSpec, components: Any, sharding: str, args: Any) -> None:
        """Refuse a gradient cosine this run cannot take (an ``OPDError`` naming the setting)."""
        if spec.every == 0:
            return
        problem = None if components.divergence is not None else (
            "the gradient cosine compares the divergence term's gradient with the policy-gradient term's, but there "
            "is no divergence; set diagnostics.every: 0")
        problem = problem or hybrid_problem(components.pg_weight, components.div_weight)
        if problem is None and sharding in ("fsdp", "deepspeed_zero3"):
            problem = (f"the gradient cosine takes torch.autograd.grad of each term w.r.t. whole parameters, which "
                       f"the {sharding} engine shards; set diagnostics.every: 0 for sharded training")
        kwargs = getattr(args, "gradient_checkpointing_kwargs", None) or {}
        if problem is None and getattr(args, "gradient_checkpointing", False) and kwargs.get("use_reentrant"):
            problem = ("the gradient cosine takes torch.autograd.grad, which reentrant gradient checkpointing does "
                       "not support; set gradient_checkpointing_kwargs: {use_reentrant: false}, or "
                       "diagnostics.every: 0")
        if problem:
            raise OPDError(f"diagnostics.every={spec.every}: {problem}")

    def start_generation_batch(self, mode: str, out: dict[str, Any], rewards: torch.Tensor, local: slice,
                               group_size: int) -> None:
        """Track this generation batch's completion order (``diag/order_discordant_frac``): mark its rows in
        ``out[ROW_KEY]``; ``rewards`` are every rank's ``(N,)`` total task rewards, ``local`` this rank's rows."""
        device = out["completion_ids"].device
        out[ROW_KEY] = torch.arange(out["completion_ids"].shape[0], device=device)
        self._groups[mode] = GroupGuidance(rewards.to(device), group_size, local)

    @torch.no_grad()
    def record(self, mode: str, inputs: dict[str, Any], teacher: Any, student_logps: torch.Tensor | None,
               mask: torch.Tensor, student_logits: torch.Tensor | None = None) -> None:
        """Log the per-token statistics of one micro-batch (``teacher``: its ``TeacherScores``; ``student_logits``
        None when the loss has none) and, once every row of the generation batch was seen, its order statistic
        (which needs the student's token log-probs ``student_logps``)."""
        stats = token_stats(mask, teacher, student_logits, k=self.spec.topk)
        zero = torch.zeros(2, device=mask.device)
        rows = [stats[name] if stats[name] is not None else zero for name in TOKEN_METRICS]
        group = self._groups.get(mode)
        order = zero
        if group is not None and ROW_KEY in inputs and student_logps is not None:
            group.add(inputs[ROW_KEY], sequence_guidance(teacher.token_logps, student_logps.detach(), mask))
            if group.complete:
                order = group.counts().to(mask.device)
                del self._groups[mode]  # logged once per generation batch (later iterations reuse the rows)
        rows.append(order)
        totals = self._reduce(torch.stack([r.to(mask.device, torch.float32) for r in rows]))
        for name, (total, count) in zip((*TOKEN_METRICS, ORDER_METRIC), totals.tolist(), strict=True):
            if count > 0:
                self._log(name, total / count)

    def grad_cosine_due(self, mode: str, step: int, terms: dict[str, torch.Tensor]) -> bool:
        """Whether this micro-batch takes the gradient cosine: training, every ``every`` optimizer steps, the first
        micro-batch of the step, both terms in the loss."""
        every = self.spec.every
        return (every > 0 and mode == "train" and step % every == 0 and step != self._grad_step
                and "policy_gradient" in terms and "divergence" in terms and torch.is_grad_enabled())

    def grad_cosine(self, model: Any, terms: dict[str, torch.Tensor], step: int) -> None:
        """Log ``diag/grad_cosine`` between the gradients of ``terms["divergence"]`` and
        ``terms["policy_gradient"]`` w.r.t. the trainable parameters, and its cost ``diag/grad_cosine_s``.
        ``torch.autograd.grad`` with ``retain_graph``: no ``.grad`` is written and the graph stays for the
        training backward."""
        self._grad_step = step
        start = time.perf_counter()
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [torch.autograd.grad(terms[name], params, retain_graph=True, allow_unused=True)
                 for name in ("divergence", "policy_gradient")]
        cosine = grad_cosine(*grads)
        del grads
        seconds = time.perf_counter() - start
        device = terms["divergence"].device
        ok = float(cosine == cosine)  # NaN (a zero gradient) is not counted
        totals = self._reduce(torch.tensor([[cosine if ok else 0.0, ok], [seconds, 1.0]], device=device))
        for name, (total, count) in zip(GRAD_METRICS, totals.tolist(), strict=True):
            if count > 0:
                self._log(name, total / count)


__all__ = ["ROW_KEY", "StepDiagnostics"]
