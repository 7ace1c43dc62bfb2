"""``self_hint``: SAGE, the policy writes its own hint from the reference solution."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from opd_plugins.context import SetupContext
from opd_plugins.samplers._common import (
    HardPromptParams, HistorySampler, prompt_text, template_validator, unit_draw, with_text,
)
from opd_plugins.samplers.base import Guidance, SamplerFeedback, SamplerOutput, prompt_key

DEFAULT_INSTRUCTION = (
    "You are a tutor. Here is a problem and its reference solution.\n\nProblem: {question}\n\n"
    "Reference solution: {solution}\n\nWrite one short hint (a sentence or two) that helps a student solve the "
    "problem without giving away the final answer. Reply with the hint only."
)


class SelfHint(HistorySampler):
    """For prompts the policy fails on, the policy itself writes a hint from the reference solution; the rollouts
    then see the hint in their prompt.

    SAGE (Liao et al. 2026, "Self-Hinting Language Models Enhance Reinforcement Learning", code BaohaoLiao/SAGE):
    the model, prompted as a tutor with the question and the reference solution (a privileged generation:
    ``instruction``, with ``{question}`` and any row column such as ``{solution}``), writes a compact hint h; the
    rollout is τ ~ π(·|x, h) and the reward is unchanged (``role: context``). Hints only raise within-group outcome
    diversity, which keeps advantages from collapsing; at evaluation there is no hint (samplers are never applied
    there). SAGE writes hints for groups with no success; here a prompt gets one from its next visit on, once its
    last ``hard_after`` unguided groups all failed, and until an unguided group succeeds (``mixin`` of its visits
    stay unhinted to check). The hint is written with the current policy, no gradient, greedy unless
    ``temperature`` > 0, at most ``max_new_tokens`` tokens, and kept for ``reuse`` visits before it is rewritten
    (SAGE writes a fresh one each time: ``reuse: 1``). Hints are part of the checkpointed state.
    """

    name: ClassVar[str] = "self_hint"
    roles: ClassVar[frozenset[str]] = frozenset({"context"})
    state_fields: ClassVar[tuple[str, ...]] = ("hints",)

    class Params(HardPromptParams):
        column: str = Field("solution", description="Dataset column of the reference solution.")
        instruction: str = Field(DEFAULT_INSTRUCTION, description="The tutor prompt ({question}, {<column>}).")
        template: str = Field("{prompt}\n\nHint: {text}", description="The hinted prompt ({prompt}, {text}).")
        max_new_tokens: int = Field(64, ge=1, le=1024, description="Length limit of a hint.")
        temperature: float = Field(0.0, ge=0, description="0: greedy hints.")
        reuse: int = Field(4, ge=1, description="Visits a written hint is reused for.")
        mixin: float = Field(0.25, ge=0, lt=1, description="Share of a hard prompt's visits left unhinted.")
        batch_size: int = Field(16, ge=1, description="Hints written per generate call.")

        _template = template_validator()

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.hints: dict[str, list[Any]] = {}  # key -> [hint, visits left]
        self.model: Any = None
        self.tokenizer: Any = None

    def setup(self, ctx: SetupContext) -> None:
        self.model, self.tokenizer = ctx.model, ctx.tokenizer

    def required_columns(self) -> tuple[str, ...]:
        return (self.params.column,)

    def write_hints(self, rows: list[dict[str, Any]]) -> list[str]:
        """The policy's hints for ``rows`` (one per row), written now."""
        if self.model is None:
            raise RuntimeError("self_hint sampler used before setup() (it writes hints with the policy)")
        from opd_plugins.generation import generate_text

        p = self.params
        prompts = [[{"role": "user", "content": p.instruction.format(
            **{**{k: "" if v is None else v for k, v in row.items()}, "question": prompt_text(row.get("prompt"))})}]
            for row in rows]
        return generate_text(self.model, self.tokenizer, prompts, max_new_tokens=p.max_new_tokens,
                             temperature=p.temperature, batch_size=p.batch_size, seed=p.seed)

    def prepare(self, prompts: list[Any], rows: list[dict[str, Any]], step: int) -> SamplerOutput:
        p = self.params
        wanted: dict[str, dict[str, Any]] = {}
        for row in rows:
            key = prompt_key(row)
            if (row.get(p.column) and self.history.is_hard(key, p.hard_after)
                    and unit_draw(p.seed, "mixin", key, self.history.get(key).visits) >= p.mixin):
                wanted[key] = row
        stale = [k for k in wanted if k not in self.hints or self.hints[k][1] <= 0]
        if stale:
            for key, hint in zip(stale, self.write_hints([wanted[k] for k in stale]), strict=True):
                self.hints[key] = [hint.strip(), p.reuse]
        for key in wanted:
            self.hints[key][1] -= 1
        out = [Guidance("context", prompt=with_text(prompt, self.hints[prompt_key(row)][0], p.template),
                        note="self hint") if prompt_key(row) in wanted and self.hints[prompt_key(row)][0]
               else Guidance() for prompt, row in zip(prompts, rows, strict=True)]
        self.last_stats = {"hinted_fraction": sum(g.role != "none" for g in out) / max(len(out), 1),
                           "hints_written": float(len(stale))}
        return SamplerOutput(out)

    def observe(self, feedback: SamplerFeedback) -> None:
        self.history.update(feedback, self.params.threshold)
        for key in [k for k in self.hints if not self.history.is_hard(k, self.params.hard_after)]:
            del self.hints[key]  # solved unguided: its hint is not needed any more
