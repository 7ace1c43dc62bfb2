"""``prefix_rl``: PrefixRL, rollouts on hard prompts start from a prefix of a stored successful trace."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from opd_plugins.reveal import reveal_prefix, word_count
from opd_plugins.samplers._common import HistorySampler, PrefixLimit, PrefixParams, unit_draw
from opd_plugins.samplers.base import Guidance, SamplerFeedback, SamplerOutput, prompt_key


class PrefixRL(HistorySampler):
    """Starts rollouts of hard prompts from a random-length prefix of a successful trace; the policy continues it.

    PrefixRL ("Reuse your FLOPs", arXiv:2601.18795): condition on a prefix of a successful off-policy trace and run
    on-policy RL on the continuation only; the prefix tokens get no gradient (``prefix_loss: masked``, the default),
    which sidesteps off-policy instability, and the prefix length sets the difficulty. Training on prefixed problems
    improves unprefixed ones ("back-generalisation"). ``prefix_loss: supervised`` trains the prefix tokens too,
    LUFFY-style, with f(π) = π / (π + ``gamma``) times the advantage.

    The traces come from a bounded store of the policy's own successful completions (reward ≥ ``threshold``;
    at most ``traces_per_prompt`` per prompt, the most recent kept, and ``max_prompts`` prompts, the least
    recently updated evicted) and, when ``trace_column`` is set, from that dataset column (traces given up front,
    e.g. from rejection sampling with a stronger model). A visit of a hard prompt (``hard_after`` consecutive
    unguided all-fail groups) that has a trace is guided with probability ``mix``: each rollout of the group starts
    from its own draw of a trace and of a prefix length, a fraction uniform in [``min_fraction``, ``max_fraction``]
    of the trace's words. The store is checkpointed.
    """

    name: ClassVar[str] = "prefix_rl"
    roles: ClassVar[frozenset[str]] = frozenset({"prefix"})
    state_fields: ClassVar[tuple[str, ...]] = ("store",)

    class Params(PrefixParams):
        trace_column: str | None = Field(None, description="Dataset column of given successful traces (optional).")
        traces_per_prompt: int = Field(4, ge=1, description="Own successful traces kept per prompt.")
        max_prompts: int = Field(10000, ge=1, description="Prompts whose traces are kept.")
        min_fraction: float = Field(0.2, gt=0, le=1, description="Shortest prefix, as a fraction of the trace's words.")
        max_fraction: float = Field(0.8, gt=0, le=1, description="Longest prefix, as a fraction of the trace's words.")
        mix: float = Field(1.0, ge=0, le=1, description="Probability that a visit of a hard prompt is guided.")
        prefix_loss: Literal["masked", "supervised"] = Field("masked", description="Prefix tokens out of the loss, "
                                                                                  "or trained (LUFFY).")
        gamma: float = Field(0.1, gt=0, description="prefix_loss=supervised: γ of f(π) = π / (π + γ).")

        @model_validator(mode="after")
        def _range(self) -> "PrefixRL.Params":
            if self.min_fraction > self.max_fraction:
                raise ValueError(f"min_fraction ({self.min_fraction}) is above max_fraction ({self.max_fraction})")
            return self

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.prefix_limit = PrefixLimit(self.name, self.params.max_prefix_tokens)
        self.store: dict[str, list[str]] = {}  # key -> traces, oldest first; dict order = least recently updated

    def setup(self, ctx: Any) -> None:
        self.prefix_limit.setup(ctx)

    def required_columns(self) -> tuple[str, ...]:
        return (self.params.trace_column,) if self.params.trace_column else ()

    def traces(self, key: str, row: dict[str, Any]) -> list[str]:
        given = row.get(self.params.trace_column) if self.params.trace_column else None
        return ([str(given)] if given else []) + self.store.get(key, [])

    def prepare(self, prompts: list[Any], rows: list[dict[str, Any]], step: int) -> SamplerOutput:
        p = self.params
        out, lengths = [], []
        copies: dict[str, int] = {}
        for row in rows:
            key = prompt_key(row)
            i = copies[key] = copies.get(key, -1) + 1  # which rollout of the group
            visits = self.history.get(key).visits
            traces = self.traces(key, row)
            if not traces or not self.history.is_hard(key, p.hard_after) or unit_draw(p.seed, "mix", key, visits) >= p.mix:
                out.append(Guidance())
                continue
            trace = traces[int(unit_draw(p.seed, "trace", key, visits, i) * len(traces))]
            fraction = p.min_fraction + (p.max_fraction - p.min_fraction) * unit_draw(p.seed, "len", key, visits, i)
            prefix = self.prefix_limit.cut(reveal_prefix(trace, fraction) or trace.split()[0])
            out.append(Guidance("prefix", prefix=prefix, prefix_loss=p.prefix_loss, note=f"trace prefix {fraction:.2f}"))
            lengths.append(word_count(prefix) / max(word_count(trace), 1))
        self.last_stats = {"guided_fraction": len(lengths) / max(len(out), 1),
                           "mean_fraction": sum(lengths) / len(lengths) if lengths else 0.0,
                           "stored_prompts": float(len(self.store))}
        return SamplerOutput(out)

    def observe(self, feedback: SamplerFeedback) -> None:
        p = self.params
        self.history.update(feedback, p.threshold)
        for row, reward, completion in zip(feedback.rows, feedback.rewards.tolist(), feedback.completions, strict=True):
            if reward == reward and reward >= p.threshold and completion.strip():  # not NaN, a success
                key = prompt_key(row)
                traces = [t for t in self.store.pop(key, []) if t != completion] + [completion]
                self.store[key] = traces[-p.traces_per_prompt:]  # re-inserted: now the most recently updated
        while len(self.store) > p.max_prompts:
            self.store.pop(next(iter(self.store)))

    def supervised_weights(self, token_probs):
        return token_probs / (token_probs + self.params.gamma)
