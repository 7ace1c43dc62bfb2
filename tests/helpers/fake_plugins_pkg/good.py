"""A well-formed plugin: one divergence (a sampled-only teacher too) and a couple of lifecycle hooks."""

from typing import ClassVar

import torch
from pydantic import Field

from opd_plugins import hookimpl
from opd_plugins.components import ComponentParams
from opd_plugins.divergences.base import Divergence, DivergenceTerms
from opd_plugins.teachers.base import Teacher, TeacherScores


class SquaredLogRatio(Divergence):
    """k2 estimator 0.5·(log p_s − log p_t)² (test plugin)."""

    name: ClassVar[str] = "sq_log_ratio"

    class Params(ComponentParams):
        scale: float = Field(1.0, gt=0)

    def per_token(self, student, teacher):
        d = (student.token_logps - teacher.token_logps) * student.mask
        v = 0.5 * self.params.scale * d**2
        return DivergenceTerms(loss=v, value=v.detach())


class SampledOnlyTeacher(Teacher):
    """Returns zeros as sampled-token log-probs (test plugin: a teacher with only 'sampled' capability)."""

    name: ClassVar[str] = "sampled_only"

    def score(self, batch, want="sampled"):
        return TeacherScores(token_logps=torch.zeros(batch.completion_ids.shape), mask=batch.completion_mask.float())


@hookimpl
def opd_register_components():
    return [SquaredLogRatio, SampledOnlyTeacher]


def not_a_hook():  # no opd_ prefix and no marker: ignored
    return 1
