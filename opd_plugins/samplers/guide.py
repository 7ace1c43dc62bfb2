"""``guide``: Adaptive Guidance (Guide-GRPO), hints for failing prompts with a context-swap ratio."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from opd_plugins.samplers._common import HardPromptParams, HistorySampler, template_validator, unit_draw, with_text
from opd_plugins.samplers.base import Guidance, SamplerFeedback, SamplerOutput, prompt_key, shaped_ratio


class Guide(HistorySampler):
    """Hints the prompts the policy fails on, and trains the hint-free policy on the hinted rollouts.

    Adaptive Guidance (Nath et al. 2025, "Adaptive Guidance Accelerates Reinforcement Learning of Reasoning
    Models", arXiv:2506.13923; code vaskar-open-source-research/guide_rl): for a prompt whose rollouts all fail,
    add a natural-language hint h to the context and sample with it; the update targets the policy *without* the
    hint through the ratio r_t = π_θ(y_t | x, y_<t) / π_old(y_t | x, h, y_<t), shaped r / (r + γ) with γ the
    ``quantile`` of the hinted tokens' ratios (``gamma: quantile``, Guide's ``percentile`` strategy with 0.9) or a
    constant (``gamma: constant``, ``gamma_value``), unclipped; unhinted rows keep PPO clipping. That is
    ``role: swap`` (the trainer zeroes these rows in TRL's loss and adds the shaped term, and keeps them out of
    ``correction:``, whose ratio near 1 would silently give them almost no weight). ``role: context`` trains on the
    hinted prompt instead (plain on-policy under the hint, no ratio).

    Guide re-rolls a failing group with the hint within the same step; here a prompt is hinted from its next
    visit on, once its last ``hard_after`` unguided groups all failed (the state is per prompt and checkpointed),
    and until an unguided group of it succeeds (``mixin``: the share of a hard prompt's visits left unhinted, to
    see whether it still fails; default 0.25). The hint is the dataset column ``column`` (default ``hint``),
    inserted with ``template``.
    """

    name: ClassVar[str] = "guide"
    roles: ClassVar[frozenset[str]] = frozenset({"swap", "context"})

    class Params(HardPromptParams):
        column: str = Field("hint", description="Dataset column holding the hint.")
        template: str = Field("{prompt}\n\n{text}", description="The hinted prompt ({prompt}, {text} = the hint).")
        role: Literal["swap", "context"] = Field("swap", description="Train on the original prompt with the shaped "
                                                                     "ratio (swap), or on the hinted one.")
        gamma: Literal["quantile", "constant"] = Field("quantile", description="γ of r / (r + γ).")
        quantile: float = Field(0.9, gt=0, lt=1, description="gamma=quantile: which quantile of the ratios.")
        gamma_value: float = Field(1.0, gt=0, description="gamma=constant: γ.")
        mixin: float = Field(0.25, ge=0, lt=1, description="Share of a hard prompt's visits left unhinted.")

        _template = template_validator()

    def required_columns(self) -> tuple[str, ...]:
        return (self.params.column,)

    def prepare(self, prompts: list[Any], rows: list[dict[str, Any]], step: int) -> SamplerOutput:
        p = self.params
        out = []
        for prompt, row in zip(prompts, rows, strict=True):
            key, hint = prompt_key(row), str(row.get(p.column) or "")
            visits = self.history.get(key).visits
            if hint and self.history.is_hard(key, p.hard_after) and unit_draw(p.seed, "mixin", key, visits) >= p.mixin:
                out.append(Guidance(p.role, prompt=with_text(prompt, hint, p.template), note="hint"))
            else:
                out.append(Guidance())
        hinted = sum(g.role != "none" for g in out)
        self.last_stats = {"hinted_fraction": hinted / max(len(out), 1)}
        return SamplerOutput(out)

    def observe(self, feedback: SamplerFeedback) -> None:
        groups = self.history.update(feedback, self.params.threshold)
        rates = [rate for _, _, rate, guidance, _ in groups if rate is not None and guidance[0].role != "none"]
        if rates:
            self.last_stats["hinted_success"] = sum(rates) / len(rates)

    def swap_weights(self, ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        p = self.params
        gamma = p.gamma_value if p.gamma == "constant" else None
        return shaped_ratio(ratio, mask, gamma=gamma, quantile=p.quantile)
