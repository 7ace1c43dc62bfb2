"""The token-weighting contract: per-token weights or masks that multiply the divergence loss."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from opd_plugins.components import Component
from opd_plugins.divergences.base import StudentOutputs
from opd_plugins.teachers.base import TeacherScores


class TokenWeighting(Component):
    """Base class of token weightings. A recipe lists any number; their weights multiply.

    :meth:`weights` receives the micro-batch (``completion_mask`` already excludes injected hint/prefix
    tokens), the detached student outputs and the teacher scores, and returns ``(B, T)`` non-negative weights.
    """

    kind: ClassVar[str] = "token_weighting"

    def weights(self, inputs: dict[str, Any], student: StudentOutputs, teacher: TeacherScores | None) -> torch.Tensor:
        raise NotImplementedError
