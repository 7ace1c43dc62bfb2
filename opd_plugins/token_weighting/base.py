"""The token-weighting contract: per-token weights or masks that multiply the divergence loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from opd_plugins import collective
from opd_plugins.components import Component
from opd_plugins.divergences.base import StudentOutputs
from opd_plugins.teachers.base import TeacherScores


@dataclass
class GenerationBatch:
    """What :meth:`TokenWeighting.prepare` sees: this rank's rows of a whole generation batch, in generation order
    (prompt groups of ``num_generations`` consecutive rows, not yet shuffled and split into micro-batches).

    * ``rewards`` ``(B,)`` this rank's total rewards (NaN unscored); ``global_rewards`` ``(N,)`` every rank's.
    * ``local``: this rank's rows of the global batch; ``num_generations``: the group size.
    * ``mask`` ``(B, T)``: the loss mask; ``teacher``: this rank's teacher scores (None without a teacher).
    * ``student_logps()``: ``(B, T)`` the policy's log-probs of the sampled tokens (no gradient; computed once,
      when first asked for).
    * ``gather(values)``: ``(B,)`` per-row values of this rank → ``(N,)`` of the whole batch (all ranks).
    """

    rewards: torch.Tensor
    global_rewards: torch.Tensor
    num_generations: int
    local: slice
    mask: torch.Tensor
    teacher: TeacherScores | None = None
    _student_logps: Callable[[], torch.Tensor] | None = field(default=None, repr=False)

    def student_logps(self) -> torch.Tensor:
        if self._student_logps is None:
            raise ValueError("this generation batch carries no way to compute the student's log-probs")
        return self._student_logps()

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        return collective.gather_rows(values, self.global_rewards.shape[0], self.local)

    def group_ids(self) -> torch.Tensor:
        """``(B,)`` the global prompt-group index of each of this rank's rows."""
        return torch.arange(self.local.start, self.local.stop, device=self.mask.device) // self.num_generations


class TokenWeighting(Component):
    """Base class of token weightings. A recipe lists any number; their weights multiply.

    :meth:`weights` receives the micro-batch — ``completion_ids``, ``completion_mask`` (injected hint/prefix
    tokens already excluded), ``advantages``, ``rewards`` (``(B,)`` total task reward of each completion, NaN
    when unscored) — the detached student outputs (log-probs; logits when the divergence uses the full
    vocabulary) and the teacher scores (log-probs, entropy, top-k), and returns ``(B, T)`` non-negative weights.
    Weightings that read ``rewards`` set ``needs_rewards`` (or override :meth:`requires_rewards` when it depends on
    their params); a recipe without a task is then refused. A weighting may put floats in ``last_stats`` after each
    call; the trainer logs them as ``token_weighting/<name>/<key>``.

    A weighting whose statistics need whole prompt groups (or the whole batch) computes them in :meth:`prepare`,
    once per generation batch, before TRL shuffles the batch and splits it into micro-batches (a group's rows are
    then scattered): the tensors it returns ride in the batch and reach :meth:`weights` as ``inputs["prepared"]``.
    """

    kind: ClassVar[str] = "token_weighting"
    needs_rewards: ClassVar[bool] = False

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.last_stats: dict[str, float] = {}

    def requires_rewards(self) -> bool:
        """Whether :meth:`weights` reads ``inputs["rewards"]`` with these params (default: ``needs_rewards``)."""
        return self.needs_rewards

    def needs_entropy(self) -> bool:
        """Whether :meth:`weights` reads the student's exact entropies (``student.entropy``); the trainer then asks
        the student's forward for them when no logits are present (default: False)."""
        return False

    def prepare(self, batch: GenerationBatch) -> dict[str, torch.Tensor] | None:
        """Per-row or per-token statistics of a whole generation batch (``(B, ...)`` tensors for this rank's rows),
        handed back to :meth:`weights` as ``inputs["prepared"]`` in every micro-batch; None (default) for none."""
        return None

    def weights(self, inputs: dict[str, Any], student: StudentOutputs, teacher: TeacherScores | None) -> torch.Tensor:
        raise NotImplementedError
