"""``hint_ladder``: SAGE-light / Scaf-GRPO, a per-prompt hint level that climbs while a prompt fails."""

from __future__ import annotations

import string
from typing import Any, ClassVar

from pydantic import Field, model_validator

from opd_plugins.components import ComponentParams
from opd_plugins.reveal import reveal_prefix
from opd_plugins.samplers._common import HistorySampler, with_text
from opd_plugins.samplers.base import Guidance, SamplerFeedback, SamplerOutput, prompt_key, success_rate


class HintLadder(HistorySampler):
    """Keeps a hint level per prompt: up one after a visit at or below ``low`` accuracy, down one above ``high``.

    SAGE-light (Liao et al. 2026, "Self-Hinting Language Models", code BaohaoLiao/SAGE, ``sage-light``): a prompt's
    level ℓ moves across epochs, ℓ + 1 when its accuracy at the last visit was ≤ τ_lo, ℓ − 1 when it was > τ_hi
    (SAGE's run script uses 0.1 and 0.35, the defaults here); Scaf-GRPO (arXiv:2510.19807) escalates only after
    a warm-up (``warmup_steps``; it uses 50) and only from all-fail groups. Level 0 is the task itself; level
    ℓ ∈ 1..L adds a hint in the prompt (``role: context``): ``hints[ℓ−1]`` when ``hints`` (format strings over the
    row's columns, e.g. ``"The answer is {answer}."``) is given, else the first ℓ/L of the reference ``column``'s
    words (``levels`` = L, default 3). The level is the prompt's state, keyed by its prompt and checkpointed.
    ``last_stats``: ``mean_level`` of this batch's rollouts, ``hinted_fraction``.
    """

    name: ClassVar[str] = "hint_ladder"
    roles: ClassVar[frozenset[str]] = frozenset({"context"})
    state_fields: ClassVar[tuple[str, ...]] = ("levels",)

    class Params(ComponentParams):
        column: str = Field("solution", description="Reference column cut into levels (without `hints`).")
        hints: list[str] | None = Field(None, min_length=1, description="Hint templates, level 1 first.")
        levels: int = Field(3, ge=1, le=20, description="Levels cut from `column` (without `hints`).")
        low: float = Field(0.1, ge=0, le=1, description="Accuracy at or below which the level goes up.")
        high: float = Field(0.35, ge=0, le=1, description="Accuracy above which the level goes down.")
        threshold: float = Field(1.0, description="A rollout succeeds when its reward is at least this.")
        warmup_steps: int = Field(0, ge=0, description="Optimizer steps before any level changes.")
        template: str = Field("{prompt}\n\nHint: {text}", description="The hinted prompt ({prompt}, {text}).")

        @model_validator(mode="after")
        def _check(self) -> "HintLadder.Params":
            if self.low >= self.high:
                raise ValueError(f"low ({self.low}) must be below high ({self.high})")
            if "{text}" not in self.template:
                raise ValueError("template must contain {text} (the hint)")
            return self

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.levels: dict[str, int] = {}

    @property
    def top(self) -> int:
        return len(self.params.hints) if self.params.hints else self.params.levels

    def required_columns(self) -> tuple[str, ...]:
        if self.params.hints:
            return tuple(dict.fromkeys(f for h in self.params.hints for _, f, _, _ in string.Formatter().parse(h)
                                       if f))
        return (self.params.column,)

    def hint(self, row: dict[str, Any], level: int) -> str:
        p = self.params
        if p.hints:
            return p.hints[level - 1].format(**{k: "" if v is None else v for k, v in row.items()})
        return reveal_prefix(str(row.get(p.column) or ""), level / p.levels)

    def prepare(self, prompts: list[Any], rows: list[dict[str, Any]], step: int) -> SamplerOutput:
        out, levels = [], []
        for prompt, row in zip(prompts, rows, strict=True):
            level = self.levels.get(prompt_key(row), 0)
            text = self.hint(row, level) if level else ""
            levels.append(level if text else 0)
            out.append(Guidance("context", prompt=with_text(prompt, text, self.params.template),
                                note=f"hint level {level}") if text else Guidance())
        self.last_stats = {"mean_level": sum(levels) / max(len(levels), 1),
                           "hinted_fraction": sum(lv > 0 for lv in levels) / max(len(levels), 1)}
        return SamplerOutput(out)

    def observe(self, feedback: SamplerFeedback) -> None:
        p = self.params
        self.history.update(feedback, p.threshold)
        if feedback.step < p.warmup_steps:
            return
        for row, rewards, _guidance, _ in feedback.groups():
            rate = success_rate(rewards, p.threshold)
            if rate is None:
                continue
            key = prompt_key(row)
            level = self.levels.get(key, 0)
            if rate <= p.low:
                level = min(level + 1, self.top)
            elif rate > p.high:
                level = max(level - 1, 0)
            if level:
                self.levels[key] = level
            else:
                self.levels.pop(key, None)
