"""``none``: leave prompts as they are."""

from __future__ import annotations

from typing import Any, ClassVar

from opd_plugins.samplers.base import Sampler, SamplerOutput


class NoSampler(Sampler):
    """The identity sampler: every rollout is the task itself."""

    name: ClassVar[str] = "none"

    def prepare(self, prompts: list[Any], rows: list[dict[str, Any]], step: int) -> SamplerOutput:
        return SamplerOutput.unguided(len(prompts))
