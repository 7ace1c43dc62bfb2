"""``example_tv``: total-variation distance between the student's and the teacher's next-token distributions."""

from __future__ import annotations

from typing import ClassVar

import torch

from opd_plugins.components import ComponentParams
from opd_plugins.divergences.base import Divergence, DivergenceTerms, StudentOutputs
from opd_plugins.teachers.base import Capability, TeacherScores

MAX_LOG_RATIO = 20.0
"""The reward clamps log π_t(x) − log π_s(x) here, so that a token the student found very unlikely cannot
produce an overflowing reward (the ratio stays below e^20 ≈ 5e8)."""


class TotalVariation(Divergence):
    """Total variation, TV(π_student, π_teacher) = ½ Σ_v |π_s(v) − π_t(v)|, per completion token.

    Symmetric and bounded in [0, 1]; it needs the teacher's full-vocabulary log-probs. The loss is the same
    quantity, differentiated through the student's softmax.
    As a reward (for OPD as RL) it is the single-sample estimate at the sampled token x ~ π_s,
    ``−½ |1 − π_t(x) / π_s(x)|``, whose expectation over x is exactly ``−TV``: a reward must depend on the
    sampled token to carry a policy gradient, which the exact per-position TV does not.
    Paper: Wen et al., "f-Divergence Minimization for Sequence-Level Knowledge Distillation" (ACL 2023),
    https://arxiv.org/abs/2307.15190 — TV is one of the f-divergences it distils with.
    """

    name: ClassVar[str] = "example_tv"

    class Params(ComponentParams):
        """``example_tv`` takes no parameters (the student logits already carry the sampling temperature)."""

    def requires(self) -> Capability:
        return "full"

    def per_token(self, student: StudentOutputs, teacher: TeacherScores) -> DivergenceTerms:
        if student.logits is None or teacher.logps is None:
            raise ValueError("example_tv needs the student's logits and the teacher's full-vocabulary log-probs")
        mask = student.mask * teacher.mask
        s_logps = torch.log_softmax(student.logits.float(), dim=-1)
        tv = 0.5 * (s_logps.exp() - teacher.logps.float().exp()).abs().sum(-1) * mask
        return DivergenceTerms(loss=tv, value=tv.detach())

    def reward(self, student: StudentOutputs, teacher: TeacherScores) -> torch.Tensor:
        mask = student.mask * teacher.mask
        log_ratio = (teacher.token_logps.float() - student.token_logps.float()).detach().clamp(max=MAX_LOG_RATIO)
        return -0.5 * (1.0 - log_ratio.exp()).abs() * mask

    @classmethod
    def example_params(cls) -> Params:
        return cls.Params()
