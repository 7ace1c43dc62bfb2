"""Per-token and per-row statistics shared by the built-in token weightings (not a component)."""

from __future__ import annotations

from typing import Any

import torch

from opd_plugins.divergences.base import StudentOutputs
from opd_plugins.errors import OPDError
from opd_plugins.teachers.base import TeacherScores


def valid_tokens(student: StudentOutputs, teacher: TeacherScores | None) -> torch.Tensor:
    """``(B, T)`` bool: positions where both the student and the teacher have data (the loss mask)."""
    mask = student.mask.bool()
    return mask & teacher.mask.bool() if teacher is not None else mask


def row_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B,)`` mean of ``x`` over each row's valid positions (0 for a row with none)."""
    valid = valid.to(x.dtype)
    return (x * valid).sum(1) / valid.sum(1).clamp(min=1)


def has_full_vocab(student: StudentOutputs, teacher: TeacherScores | None) -> bool:
    """True when the student logits and the teacher's full-vocabulary log-probs are both present."""
    return student.logits is not None and teacher is not None and teacher.logps is not None


def token_divergence(student: StudentOutputs, teacher: TeacherScores, *, full: bool) -> torch.Tensor:
    """``(B, T)`` per-token KL(student ‖ teacher): exact over the vocabulary when ``full`` (one row at a time, so
    no more than one ``(T, V)`` temporary is held), else the sampled-token estimate ``log π_s(x_t) − log π_t(x_t)``
    (unbiased, but negative at some positions)."""
    if not full:
        return student.token_logps.float() - teacher.token_logps.float()
    rows = []
    for logits, t_logps in zip(student.logits, teacher.logps):
        s_logps = torch.log_softmax(logits.float(), dim=-1)
        rows.append((s_logps.exp() * (s_logps - t_logps.float())).sum(-1))
    return torch.stack(rows)


def student_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` entropy of the student's next-token distributions, one row at a time."""
    rows = []
    for row in logits:
        logps = torch.log_softmax(row.float(), dim=-1)
        rows.append(-(logps.exp() * logps).sum(-1))
    return torch.stack(rows)


def require_teacher(teacher: TeacherScores | None, name: str, why: str) -> TeacherScores:
    if teacher is None:
        raise OPDError(f"token weighting {name!r} needs teacher scores ({why}), but none were given")
    return teacher


def require_rewards(inputs: dict[str, Any], name: str, batch_size: int) -> torch.Tensor:
    """The ``(B,)`` total task rewards of the micro-batch (NaN = unscored), as float."""
    rewards = inputs.get("rewards")
    if rewards is None:
        raise OPDError(f"token weighting {name!r} gates on task rewards, but the batch has no 'rewards' entry "
                       "(OPDTrainer stores them; a custom trainer must too)")
    rewards = torch.as_tensor(rewards).float().reshape(-1)
    if rewards.shape[0] != batch_size:
        raise OPDError(f"token weighting {name!r} got {rewards.shape[0]} rewards for {batch_size} completions")
    return rewards


def split_by_reward(rewards: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(correct, incorrect, unscored)`` row masks: correct means ``reward >= threshold``; NaN is unscored."""
    unscored = torch.isnan(rewards)
    correct = ~unscored & (rewards >= threshold)
    return correct, ~unscored & ~correct, unscored


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> float | None:
    """Mean of ``x`` over ``valid`` positions as a float, or None when there are none."""
    n = int(valid.sum())
    return float((x * valid.to(x.dtype)).sum() / n) if n else None
