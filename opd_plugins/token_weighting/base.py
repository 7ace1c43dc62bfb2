"""The token-weighting contract: per-token weights or masks that multiply the divergence loss."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from opd_plugins.components import Component
from opd_plugins.divergences.base import StudentOutputs
from opd_plugins.teachers.base import TeacherScores


class TokenWeighting(Component):
    """Base class of token weightings. A recipe lists any number; their weights multiply.

    :meth:`weights` receives the micro-batch — ``completion_ids``, ``completion_mask`` (injected hint/prefix
    tokens already excluded), ``advantages``, ``rewards`` (``(B,)`` total task reward of each completion, NaN
    when unscored) — the detached student outputs (log-probs; logits when the divergence uses the full
    vocabulary) and the teacher scores (log-probs, entropy, top-k), and returns ``(B, T)`` non-negative weights.
    Weightings that read ``rewards`` set ``needs_rewards`` (or override :meth:`requires_rewards` when it depends on
    their params); a recipe without a task is then refused. A weighting may put floats in ``last_stats`` after each
    call; the trainer logs them as ``token_weighting/<name>/<key>``.
    """

    kind: ClassVar[str] = "token_weighting"
    needs_rewards: ClassVar[bool] = False

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.last_stats: dict[str, float] = {}

    def requires_rewards(self) -> bool:
        """Whether :meth:`weights` reads ``inputs["rewards"]`` with these params (default: ``needs_rewards``)."""
        return self.needs_rewards

    def weights(self, inputs: dict[str, Any], student: StudentOutputs, teacher: TeacherScores | None) -> torch.Tensor:
        raise NotImplementedError
