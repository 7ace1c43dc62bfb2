"""``oracle_prefix``: POPE, a prefix of the reference solution for prompts the policy cannot solve."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from opd_plugins.reveal import reveal_prefix
from opd_plugins.samplers._common import (
    HistorySampler, PrefixLimit, PrefixParams, template_validator, unit_draw, with_text,
)
from opd_plugins.samplers.base import Guidance, SamplerFeedback, SamplerOutput, prompt_key


class OraclePrefix(HistorySampler):
    """Guides hard prompts with the shortest prefix of the reference solution under which the policy succeeds.

    POPE (Privileged On-Policy Exploration, arXiv:2601.18779): for a prompt with no correct rollout, show a prefix
    of an oracle solution, so guided rollouts earn reward; the oracle serves exploration, not as a training target,
    and the behaviour transfers to unguided prompts. A prompt is hard after ``hard_after`` consecutive unguided
    all-fail groups. For each hard prompt the sampler searches ``fractions`` (of the solution's words, ascending)
    across its visits, a bisection: a guided group with at least one success makes that fraction the new upper
    bound, one without makes the next fraction the lower bound, so it settles on the shortest fraction found to
    work. A visit of a hard prompt is guided with probability ``mix`` (POPE mixes guided and unguided hard problems
    1:1), the whole group alike, so guided and unguided groups are trained separately. Once an unguided group of
    the prompt succeeds it is no longer hard and its search starts over if it becomes hard again.

    ``role: context`` (default) puts the prefix in the prompt with ``template`` (POPE's instruction to continue
    from it); ``role: prefix`` forces it as the start of the completion, its tokens out of every loss term
    (``masked``). The reference is the dataset column ``column`` (default ``solution``, which the built-in
    arithmetic task writes). ``last_stats``: ``hard_prompts``, ``guided_fraction`` (of this batch's rollouts),
    ``mean_fraction`` (of the guided ones).
    """

    name: ClassVar[str] = "oracle_prefix"
    roles: ClassVar[frozenset[str]] = frozenset({"context", "prefix"})
    state_fields: ClassVar[tuple[str, ...]] = ("search",)

    class Params(PrefixParams):
        column: str = Field("solution", description="Dataset column holding the reference solution.")
        fractions: list[float] = Field(
            default_factory=lambda: [0.25, 0.5, 0.75, 1.0], min_length=1,
            description="Prefix lengths searched, as fractions of the solution's words (ascending, in (0, 1]).")
        mix: float = Field(0.5, ge=0, le=1, description="Probability that a visit of a hard prompt is guided.")
        role: Literal["context", "prefix"] = Field("context", description="Prefix in the prompt, or forced "
                                                                         "completion start (masked).")
        template: str = Field(
            "{prompt}\n\nHere is the beginning of a solution. Continue it and give the final answer:\n{text}",
            description="context role: the prompt with the prefix ({prompt}, {text}).")

        @field_validator("fractions")
        @classmethod
        def _ascending(cls, v: list[float]) -> list[float]:
            if any(not 0 < f <= 1 for f in v) or sorted(set(v)) != v:
                raise ValueError(f"fractions must be distinct, ascending and in (0, 1]: {v}")
            return v

        _template = template_validator()

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.prefix_limit = PrefixLimit(self.name, self.params.max_prefix_tokens)
        self.search: dict[str, list[int]] = {}  # key -> [lo, hi] indices into fractions

    def setup(self, ctx: Any) -> None:
        self.prefix_limit.setup(ctx)

    def required_columns(self) -> tuple[str, ...]:
        return (self.params.column,)

    def level(self, key: str) -> int:
        lo, hi = self.search.get(key, [0, len(self.params.fractions) - 1])
        return (lo + hi) // 2

    def prepare(self, prompts: list[Any], rows: list[dict[str, Any]], step: int) -> SamplerOutput:
        p = self.params
        out, fractions = [], []
        for prompt, row in zip(prompts, rows, strict=True):
            key = prompt_key(row)
            solution = str(row.get(p.column) or "")
            record = self.history.get(key)
            guided = (solution and self.history.is_hard(key, p.hard_after)
                      and unit_draw(p.seed, "mix", key, record.visits) < p.mix)
            if not guided:
                out.append(Guidance())
                continue
            fraction = p.fractions[self.level(key)]
            text = reveal_prefix(solution, fraction) or solution.split()[0]
            note = f"oracle prefix {fraction:g}"
            if p.role == "context":
                out.append(Guidance("context", prompt=with_text(prompt, text, p.template), note=note))
            else:
                out.append(Guidance("prefix", prefix=self.prefix_limit.cut(text), note=note))
            fractions.append(fraction)
        self.last_stats = {"hard_prompts": float(sum(r.fail_streak >= p.hard_after for r in self.history.records.values())),
                           "guided_fraction": len(fractions) / max(len(out), 1),
                           "mean_fraction": sum(fractions) / len(fractions) if fractions else 0.0}
        return SamplerOutput(out)

    def observe(self, feedback: SamplerFeedback) -> None:
        last = len(self.params.fractions) - 1
        for key, _row, rate, guidance, _ in self.history.update(feedback, self.params.threshold):
            guided = [g for g in guidance if g.role != "none"]
            if not guided:
                if self.history.get(key).fail_streak == 0:
                    self.search.pop(key, None)  # solved unguided: not hard any more
                continue
            lo, hi = self.search.get(key, [0, last])
            tried = (lo + hi) // 2
            if rate:  # at least one success under this prefix: look for a shorter one
                hi = tried
            elif lo == hi:  # the settled prefix failed: one longer
                lo = hi = min(hi + 1, last)
            else:
                lo = min(tried + 1, hi)
            self.search[key] = [lo, hi]
