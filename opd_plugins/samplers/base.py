"""The hint/prefix-sampler contract."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from opd_plugins.components import Component


@dataclass
class SamplerOutput:
    """Prepared prompts (same length and order as the input) and, per prompt, the text that was injected
    (None when nothing was), so those tokens can be masked out of the loss and their ratios corrected."""

    prompts: list[Any]
    injected: list[str | None] = field(default_factory=list)


class Sampler(Component):
    """Base class of hint/prefix samplers: edit prompts before the rollout.

    :meth:`prepare` must be deterministic given ``step`` and the sampler's state. :meth:`on_degenerate_groups`
    is told which prompts gave all-equal rewards, so an adaptive sampler can react next time.
    """

    kind: ClassVar[str] = "sampler"

    def prepare(self, prompts: list[Any], rows: list[dict[str, Any]], step: int) -> SamplerOutput:
        raise NotImplementedError

    def on_degenerate_groups(self, rows: list[dict[str, Any]], step: int) -> None:
        """Rows (one per degenerate group) whose completions all got the same reward."""
