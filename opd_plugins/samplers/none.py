"""``none``: leave prompts as they are."""

from __future__ import annotations

from typing import Any, ClassVar

from opd_plugins.samplers.base import Sampler, SamplerOutput


class NoSampler(Sampler):
    """The identity sampler: prompts go to the rollout unchanged and nothing is injected."""

    name: ClassVar[str] = "none"

    def prepare(self, prompts: list[Any], rows: list[dict[str, Any]], step: int) -> SamplerOutput:
        return SamplerOutput(prompts=list(prompts), injected=[None] * len(prompts))
