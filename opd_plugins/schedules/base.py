"""The coefficient-schedule contract: a loss term's weight as a function of training progress."""

from __future__ import annotations

from typing import ClassVar

from opd_plugins.components import Component


class Schedule(Component):
    """Base class of coefficient schedules. :meth:`value` maps (step, total steps) to a weight."""

    kind: ClassVar[str] = "schedule"

    def value(self, step: int, max_steps: int) -> float:
        raise NotImplementedError


def progress(step: int, max_steps: int) -> float:
    return min(max(step / max_steps, 0.0), 1.0) if max_steps > 0 else 0.0
