"""Pieces the built-in samplers share (not a component module): per-prompt outcome history, deterministic draws,
adding text to a prompt."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from pydantic import Field, field_validator

from opd_plugins.components import ComponentParams
from opd_plugins.samplers.base import Sampler, SamplerFeedback, prompt_key, success_rate


def _check_template(value: str) -> str:
    if "{text}" not in value:
        raise ValueError("template must contain {text} (what is added to the prompt)")
    return value


def template_validator() -> Any:
    """A pydantic validator for a ``template`` param: it must place ``{text}``."""
    return field_validator("template")(classmethod(lambda cls, v: _check_template(v)))


class PrefixLimit:
    """Cuts forced completion prefixes to ``max_prefix_tokens`` tokens (default: half of the run's
    ``max_completion_length``), so the policy always has room to continue; set up from the run's context."""

    def __init__(self, name: str, max_prefix_tokens: int | None) -> None:
        self.name, self.requested, self.limit, self.tokenizer = name, max_prefix_tokens, None, None

    def setup(self, ctx: Any) -> None:
        from opd_plugins.errors import OPDError

        total = int(getattr(ctx, "max_completion_length", 0) or 0)
        self.tokenizer = ctx.tokenizer
        self.limit = self.requested or max(1, total // 2)
        if total and self.limit >= total:
            raise OPDError(f"sampler {self.name!r}: max_prefix_tokens={self.limit} leaves no room in "
                           f"max_completion_length={total} for the policy to continue; lower it below {total}")

    def cut(self, text: str) -> str:
        if self.tokenizer is None or self.limit is None:
            return text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        limit = self.limit
        while len(ids) > self.limit and limit > 0:  # decode → encode may not give the same count
            text = self.tokenizer.decode(ids[:limit], skip_special_tokens=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            limit -= 1
        return text


class HardPromptParams(ComponentParams):
    """When a prompt counts as hard: its last ``hard_after`` unguided groups had no success (reward ≥
    ``threshold``)."""

    threshold: float = Field(1.0, description="A rollout succeeds when its reward is at least this.")
    hard_after: int = Field(1, ge=1, description="Consecutive unguided all-fail groups before a prompt is hard.")
    seed: int = Field(0, description="Seed of the sampler's draws (which visits are guided, prefix lengths).")


class PrefixParams(HardPromptParams):
    """Params of a sampler that forces completion prefixes."""

    max_prefix_tokens: int | None = Field(
        None, ge=1, description="Forced prefixes are cut to this many tokens (default: half of max_completion_length).")


@dataclass
class PromptRecord:
    """One prompt's history: visits, the unguided all-fail streak, the last success rates."""

    visits: int = 0
    fail_streak: int = 0
    last_unguided: float | None = None
    last_guided: float | None = None
    last_step: int = -1


class PromptHistory:
    """Per-prompt outcomes, keyed by :func:`~opd_plugins.samplers.base.prompt_key`; JSON-serialisable state."""

    def __init__(self) -> None:
        self.records: dict[str, PromptRecord] = {}

    def get(self, key: str) -> PromptRecord:
        return self.records.get(key) or PromptRecord()

    def update(self, feedback: SamplerFeedback, threshold: float) -> list[tuple[str, dict[str, Any], float | None,
                                                                              Any, list[str]]]:
        """Record a generation batch; returns ``(key, row, success rate, guidance of the group, completions)`` per
        group. A group counts as guided when any of its rollouts was."""
        out = []
        for row, rewards, guidance, completions in feedback.groups():
            key = prompt_key(row)
            record = self.records.setdefault(key, PromptRecord())
            rate = success_rate(rewards, threshold)
            guided = any(g.role != "none" for g in guidance)
            record.visits += 1
            record.last_step = feedback.step
            if guided:
                record.last_guided = rate
            elif rate is not None:
                record.last_unguided = rate
                record.fail_streak = record.fail_streak + 1 if rate == 0 else 0
            out.append((key, row, rate, guidance, completions))
        return out

    def is_hard(self, key: str, hard_after: int) -> bool:
        return self.get(key).fail_streak >= hard_after

    def state_dict(self) -> dict[str, Any]:
        return {"records": {k: asdict(v) for k, v in self.records.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = {k: PromptRecord(**v) for k, v in state.get("records", {}).items()}


class HistorySampler(Sampler):
    """A sampler with a :class:`PromptHistory` (``self.history``) and per-prompt state in the attributes named by
    ``state_fields`` (JSON values), all saved in checkpoints."""

    state_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Any = None, nested: Any = None) -> None:
        super().__init__(params, nested)
        self.history = PromptHistory()
        self.last_stats: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        own = {name: getattr(self, name) for name in self.state_fields}
        return {**self.history.state_dict(), **own, **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        for name in self.state_fields:
            setattr(self, name, state.pop(name, type(getattr(self, name))()))
        self.history.load_state_dict({"records": state.pop("records", {})})
        super().load_state_dict(state)


def unit_draw(seed: int, *parts: Any) -> float:
    """A deterministic number in [0, 1) from ``seed`` and ``parts`` (a prompt key, a visit count): the same on
    every rank and after a resume, independent of any global RNG."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def with_text(prompt: Any, text: str, template: str) -> Any:
    """``prompt`` (messages or plain text) with ``template`` applied to its last user message (or the text):
    ``template`` has ``{prompt}`` (the message) and ``{text}`` (what is added)."""
    if isinstance(prompt, str):
        return template.format(prompt=prompt, text=text)
    messages = copy.deepcopy(list(prompt))
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content blocks: add a text block after them
                message["content"] = [*content, {"type": "text", "text": template.format(prompt="", text=text)}]
            else:
                message["content"] = template.format(prompt=content or "", text=text)
            return messages
    return [*messages, {"role": "user", "content": template.format(prompt="", text=text)}]


def prompt_text(prompt: Any) -> str:
    """The text of a prompt's last user message (or the prompt itself when it is text)."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(list(prompt or [])):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
            return str(content or "")
    return ""


__all__ = ["HardPromptParams", "HistorySampler", "PrefixLimit", "PrefixParams", "template_validator", "PromptHistory", "PromptRecord", "prompt_text", "unit_draw", "with_text"]
