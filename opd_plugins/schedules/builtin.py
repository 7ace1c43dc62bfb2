"""Built-in coefficient schedules: constant, linear, cosine, warmup-then-decay."""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field

from opd_plugins.components import ComponentParams
from opd_plugins.schedules.base import Schedule, progress


class Constant(Schedule):
    """The same weight at every step."""

    name: ClassVar[str] = "constant"

    class Params(ComponentParams):
        value: float = Field(1.0, description="The weight.")

    def value(self, step: int, max_steps: int) -> float:
        return self.params.value


class Linear(Schedule):
    """Linear interpolation from ``start`` to ``end`` over training."""

    name: ClassVar[str] = "linear"

    class Params(ComponentParams):
        start: float = Field(1.0, description="Weight at step 0.")
        end: float = Field(0.0, description="Weight at the last step.")

    def value(self, step: int, max_steps: int) -> float:
        p = progress(step, max_steps)
        return self.params.start + (self.params.end - self.params.start) * p


class Cosine(Schedule):
    """Half-cosine from ``start`` to ``end`` over training."""

    name: ClassVar[str] = "cosine"

    class Params(ComponentParams):
        start: float = Field(1.0, description="Weight at step 0.")
        end: float = Field(0.0, description="Weight at the last step.")

    def value(self, step: int, max_steps: int) -> float:
        p = progress(step, max_steps)
        return self.params.end + (self.params.start - self.params.end) * 0.5 * (1 + math.cos(math.pi * p))


class WarmupDecay(Schedule):
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then linear or cosine decay to ``end``."""

    name: ClassVar[str] = "warmup_decay"

    class Params(ComponentParams):
        peak: float = Field(1.0, description="Weight at the end of warm-up.")
        warmup_steps: int = Field(10, ge=0, description="Steps of linear warm-up.")
        end: float = Field(0.0, description="Weight at the last step.")
        decay: str = Field("cosine", pattern="^(linear|cosine|none)$", description="linear, cosine or none.")

    def value(self, step: int, max_steps: int) -> float:
        p = self.params
        if step < p.warmup_steps:
            return p.peak * step / p.warmup_steps
        if p.decay == "none":
            return p.peak
        q = progress(step - p.warmup_steps, max_steps - p.warmup_steps)
        if p.decay == "linear":
            return p.peak + (p.end - p.peak) * q
        return p.end + (p.peak - p.end) * 0.5 * (1 + math.cos(math.pi * q))
