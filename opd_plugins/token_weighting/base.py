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
    Weightings that read ``rewards`` set ``needs_rewards`` (a recipe without a task is then refused).
    """

    kind: ClassVar[str] = "token_weighting"
    needs_rewards: ClassVar[bool] = False

    def weights(self, inputs: dict[str, Any], student: StudentOutputs, teacher: TeacherScores | None) -> torch.Tensor:
        raise NotImplementedError
