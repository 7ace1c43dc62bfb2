"""Why a distillation run is healthy: the maths of the ``diag/*`` metrics (docs/components.md#diagnostics).

Pure functions of tensors; the trainer calls them under ``torch.no_grad()`` on what its loss already computed (the
student's logits or token log-probs of the micro-batch, the teacher's scores of it), so nothing ``(B, T, V)`` is
made here besides what the caller holds. Per-token statistics return ``[sum, count]`` (a 2-element tensor) over the
valid tokens, so the trainer can add them over ranks before dividing (:func:`mean` gives the value); ``None`` means
the data for that statistic does not exist (a teacher giving only sampled-token log-probs has no distribution).

* **Teacher reliability**, on the student's own completions: the teacher's entropy, the probability mass of its
  top-k, and how often its preferred tokens are the student's (top-1 agreement, top-k overlap).
* **Order consistency** (Uni-OPD, Hou et al. 2026, https://arxiv.org/abs/2605.03677: teacher guidance is reliable
  when its trajectory-level aggregate ranks a prompt's completions as their outcome rewards do): per group of
  completions of one prompt, the share of pairs with different rewards that :func:`sequence_guidance` orders the
  other way.
* **Gradient alignment**: the cosine between two gradients (the divergence term's and the policy gradient's).

:class:`DiagnosticsSpec` is the recipe's ``diagnostics:`` section.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

TOKEN_METRICS: tuple[str, ...] = ("diag/teacher_entropy", "diag/teacher_topk_mass", "diag/top1_agreement",
                                  "diag/topk_overlap")
"""The per-token statistics, in the order :func:`token_stats` returns them."""
ORDER_METRIC = "diag/order_discordant_frac"
GRAD_METRICS: tuple[str, ...] = ("diag/grad_cosine", "diag/grad_cosine_s")


class DiagnosticsSpec(BaseModel):
    """The recipe's ``diagnostics:`` section. The per-step metrics are always on (they cost a few reductions over
    tensors the loss already holds); the gradient cosine, which costs two extra backward passes, is opt-in."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    every: int = Field(0, ge=0, description=(
        "Log diag/grad_cosine (cosine between the divergence term's and the policy-gradient term's gradients on "
        "the first micro-batch of the step) every this many optimizer steps; 0 = never. Needs both "
        "objective.policy_gradient and objective.divergence non-zero."))
    topk: int = Field(8, gt=0, description=(
        "k of diag/topk_overlap for a full-vocabulary teacher (a top-k teacher's own K is used otherwise)."))


def hybrid_problem(pg_weight: Any, div_weight: Any, total: int = 100) -> str | None:
    """Why ``diagnostics.every > 0`` cannot work with these objective schedules, or None: the gradient cosine needs
    both terms non-zero at some point of training (checked at 21 points of a ``total``-step run)."""
    steps = range(0, total + 1, max(total // 20, 1))
    if any(pg_weight.value(s, total) != 0 and div_weight.value(s, total) != 0 for s in steps):
        return None
    return ("the gradient cosine compares the divergence term's gradient with the policy-gradient term's, so it "
            "needs a hybrid objective, but objective.policy_gradient and objective.divergence are never both "
            "non-zero; set both (e.g. policy_gradient: 1.0, divergence: 1.0), or set diagnostics.every: 0")


def mean(stat: torch.Tensor | None) -> float | None:
    """``sum / count`` of a ``[sum, count]`` statistic (None when absent or counted over nothing)."""
    if stat is None or float(stat[1]) <= 0:
        return None
    return float(stat[0] / stat[1])


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(torch.float32)
    return torch.stack([(values.to(torch.float32) * m).sum(), m.sum()])


def teacher_entropy(mask: torch.Tensor, *, entropy: torch.Tensor | None = None,
                    logps: torch.Tensor | None = None) -> torch.Tensor | None:
    """Mean teacher entropy per valid token: the teacher's own ``(B, T)`` entropies, else computed from its
    ``(B, T, V)`` log-probs a row at a time (``(T, V)`` temporaries only); None without either."""
    if entropy is None and logps is not None:
        entropy = torch.stack([torch.special.entr(row.float().exp()).sum(-1) for row in logps])
    return None if entropy is None else _masked(entropy, mask)


def teacher_topk_mass(mask: torch.Tensor, *, topk_mass: torch.Tensor | None = None,
                      topk_logps: torch.Tensor | None = None) -> torch.Tensor | None:
    """Mean probability mass of the teacher's top-k per valid token (its ``topk_mass``, else the sum of its top-k
    probabilities); None for a teacher without top-k."""
    if topk_mass is None and topk_logps is not None and topk_logps.shape[-1] > 0:
        topk_mass = topk_logps.float().exp().sum(-1)
    return None if topk_mass is None else _masked(topk_mass, mask)


def _teacher_ranking(k: int, logps: torch.Tensor | None, topk_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The teacher's ``k`` best token ids per position ``(B, T, k)``, best first: its full log-probs when given, else
    its top-k ids (truncated to ``k``)."""
    if logps is not None:
        return logps.topk(k, dim=-1).indices
    if topk_ids is not None and topk_ids.shape[-1] >= k:
        return topk_ids[..., :k]
    return None


def top1_agreement(student_logits: torch.Tensor | None, mask: torch.Tensor, *,
                   teacher_logps: torch.Tensor | None = None,
                   teacher_topk_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """Share of valid tokens where the student's most likely token is the teacher's; None without student logits or
    a teacher distribution (full log-probs or top-k)."""
    if student_logits is None:
        return None
    teacher = _teacher_ranking(1, teacher_logps, teacher_topk_ids)
    if teacher is None:
        return None
    same = student_logits.argmax(-1) == teacher[..., 0].to(student_logits.device)
    return _masked(same, mask)


def topk_overlap(student_logits: torch.Tensor | None, mask: torch.Tensor, *, teacher_logps: torch.Tensor | None = None,
                 teacher_topk_ids: torch.Tensor | None = None, k: int = 8) -> torch.Tensor | None:
    """Mean ``|top-k student ∩ top-k teacher| / k`` per valid token, with ``k`` the teacher's K when it gives top-k
    (``teacher_topk_ids`` ``(B, T, K)``), else ``k`` (a full-vocabulary teacher); capped at the vocabulary size.
    None without student logits or a teacher distribution."""
    if student_logits is None or (teacher_logps is None and teacher_topk_ids is None):
        return None
    if teacher_topk_ids is not None and teacher_logps is None:
        k = teacher_topk_ids.shape[-1]
    k = min(k, student_logits.shape[-1])
    if k <= 0:
        return None
    teacher = _teacher_ranking(k, teacher_logps, teacher_topk_ids).to(student_logits.device)
    student = student_logits.topk(k, dim=-1).indices
    shared = (student.unsqueeze(-1) == teacher.unsqueeze(-2)).any(-1).sum(-1)  # (B, T): ids are distinct per side
    return _masked(shared.float() / k, mask)


def token_stats(mask: torch.Tensor, teacher: Any, student_logits: torch.Tensor | None = None,
                k: int = 8) -> dict[str, torch.Tensor | None]:
    """Every per-token statistic of :data:`TOKEN_METRICS` from a ``TeacherScores``-like ``teacher`` (fields
    ``entropy``, ``logps``, ``topk_ids``, ``topk_logps``, ``topk_mass``, each optional) and the student's logits
    (None: no distribution comparison, e.g. a sampled-token or ``fused_lm_head`` divergence)."""
    full, ids = teacher.logps, teacher.topk_ids
    return {
        "diag/teacher_entropy": teacher_entropy(mask, entropy=teacher.entropy, logps=full),
        "diag/teacher_topk_mass": teacher_topk_mass(mask, topk_mass=teacher.topk_mass, topk_logps=teacher.topk_logps),
        "diag/top1_agreement": top1_agreement(student_logits, mask, teacher_logps=full, teacher_topk_ids=ids),
        "diag/topk_overlap": topk_overlap(student_logits, mask, teacher_logps=full, teacher_topk_ids=ids, k=k),
    }


def sequence_guidance(teacher_token_logps: torch.Tensor, student_token_logps: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` the teacher's aggregated guidance of each completion: the mean over its valid tokens of
    ``log π_T(y_t) − log π_S(y_t)`` (the sampled-token reverse-KL reward; Uni-OPD's aggregate ``s_i``, as
    ``uni_opd_margin`` computes it), so completions of different lengths compare per token. Higher: the teacher
    prefers the completion more than the student does. NaN for a completion without valid tokens."""
    m = mask.to(torch.float32)
    diff = teacher_token_logps.float() - student_token_logps.float()
    total = torch.where(m.bool(), diff, torch.zeros_like(diff)).sum(-1)
    count = m.sum(-1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


def order_discordance(guidance: torch.Tensor, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[discordant, comparable]`` pairs: within each group of ``group_size`` consecutive completions (one
    prompt's), the pairs ``i < j`` with different rewards are comparable, and discordant when the guidance orders
    them the other way (a tie in guidance counts half). Completions with a NaN guidance or reward are left out; a
    trailing partial group is ignored."""
    n = (guidance.shape[0] // group_size) * group_size
    g = guidance[:n].double().view(-1, group_size)
    r = rewards[:n].to(g.device).double().view(-1, group_size)
    upper = torch.ones(group_size, group_size, dtype=torch.bool, device=g.device).triu(1)
    dg = g.unsqueeze(2) - g.unsqueeze(1)  # (groups, i, j)
    dr = r.unsqueeze(2) - r.unsqueeze(1)
    comparable = upper & (dr != 0) & torch.isfinite(dg) & torch.isfinite(dr)
    discordant = torch.where(dg * dr < 0, 1.0, torch.where(dg == 0, 0.5, 0.0))
    return torch.stack([(discordant * comparable).sum(), comparable.sum().double()]).float()


class GroupGuidance:
    """The guidance of one generation batch's completions, filled a micro-batch at a time (TRL shuffles the rows
    and splits them into micro-batches, so a prompt's group is seen whole only once every row has been).

    ``rewards`` are the whole generation batch's ``(N,)`` (every rank's, in generation order), ``local`` this rank's
    rows of them; pairs with a row of another rank are left out."""

    def __init__(self, rewards: torch.Tensor, group_size: int, local: slice) -> None:
        self.rewards, self.group_size, self.local = rewards.detach(), group_size, local
        rows = local.stop - local.start
        self.guidance = torch.full((rows,), float("nan"), dtype=torch.float32, device=rewards.device)
        self.seen = torch.zeros(rows, dtype=torch.bool, device=rewards.device)

    def add(self, rows: torch.Tensor, guidance: torch.Tensor) -> None:
        """Record the guidance of this rank's rows ``rows`` (indices into its part of the batch)."""
        rows = rows.to(self.seen.device).long()
        self.guidance[rows] = guidance.detach().to(self.guidance)
        self.seen[rows] = True

    @property
    def complete(self) -> bool:
        return bool(self.seen.all())

    def counts(self) -> torch.Tensor:
        """:func:`order_discordance` of the whole batch (rows of other ranks NaN)."""
        full = torch.full(self.rewards.shape, float("nan"), dtype=torch.float32, device=self.guidance.device)
        full[self.local] = self.guidance
        return order_discordance(full, self.rewards, self.group_size)


def grad_cosine(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> float:
    """Cosine between two gradients given per parameter (None: zero for that parameter); NaN when either is zero."""
    dot = norm_a = norm_b = 0.0
    for x, y in zip(a, b, strict=True):
        if x is not None:
            norm_a += float(x.double().square().sum())
        if y is not None:
            norm_b += float(y.double().square().sum())
        if x is not None and y is not None:
            dot += float((x.double() * y.double()).sum())
    if norm_a == 0 or norm_b == 0:
        return float("nan")
    return dot / math.sqrt(norm_a * norm_b)


__all__ = ["GRAD_METRICS", "ORDER_METRIC", "TOKEN_METRICS", "DiagnosticsSpec", "GroupGuidance", "grad_cosine",
           "hybrid_problem", "mean", "order_discordance", "sequence_guidance", "teacher_entropy", "teacher_topk_mass",
           "token_stats", "top1_agreement", "topk_overlap"]
