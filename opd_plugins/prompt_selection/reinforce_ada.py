"""``reinforce_ada``: re-draw a prompt whose group was degenerate, a few times, before moving on."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from opd_plugins.advantages.base import degenerate_groups
from opd_plugins.prompt_selection.base import PromptSelection
from opd_plugins.prompt_selection.uniform import EpochOrder


class ReinforceAdaSelection(PromptSelection):
    """Keep re-drawing a prompt whose last group was degenerate (all rewards equal) until it gives a signal.

    When :meth:`observe` sees a degenerate group (every scored reward equal, or none scored) of a prompt that has
    been re-drawn fewer than ``max_retries`` times in its current streak, the prompt is queued; the next chunks
    start with the queued prompts (oldest first, at most ``k``) and fill their remaining slots in ``uniform``'s
    order (a prompt already in the chunk is passed over). A retry whose group is not degenerate ends the streak;
    a prompt degenerate again after ``max_retries`` retries is left (it comes back with the epoch order). With
    ``max_retries: 0`` this is ``uniform``.

    Reinforce-Ada (https://arxiv.org/abs/2510.04996) keeps sampling a prompt within one step until its group has
    both outcomes; this is the same idea at the level of the data order: a degenerate prompt is tried again
    in the next chunks, with the policy a few updates further on, instead of more rollouts now.
    """

    name: ClassVar[str] = "reinforce_ada"

    class Params(PromptSelection.Params):
        max_retries: int = Field(2, ge=0, description="Re-draws of a prompt in a row after degenerate groups.")

    def __init__(self, params: Any = None, nested: dict[str, Any] | None = None) -> None:
        super().__init__(params, nested)
        self.order = EpochOrder()
        self.queue: list[int] = []  # prompts to re-draw, oldest first
        self.retries: dict[int, int] = {}  # prompt -> re-draws in its current streak

    def choose(self, k: int, n_prompts: int, step: int, generator: torch.Generator) -> list[int]:
        retried = [i for i in self.queue if i < n_prompts][:k]
        taken = set(retried)
        self.queue = [i for i in self.queue if i not in taken]
        for i in retried:
            self.retries[i] = self.retries.get(i, 0) + 1
        fill = self.order.take(k - len(retried), n_prompts, self.seed, self.data_shuffle, exclude=taken)
        self.last_stats = {"retried_share": len(retried) / k, "queued": float(len(self.queue))}
        return retried + fill

    def update(self, indices: list[int], rewards: torch.Tensor, step: int) -> None:
        degenerate = set(degenerate_groups(rewards.reshape(-1), rewards.shape[1])) if rewards.shape[1] else set()
        for row, i in enumerate(indices):
            if row not in degenerate:
                self.retries.pop(i, None)
                if i in self.queue:
                    self.queue.remove(i)
            elif self.retries.get(i, 0) < self.params.max_retries:
                self.retries.setdefault(i, 0)
                if i not in self.queue:
                    self.queue.append(i)
            else:
                self.retries.pop(i, None)  # moved on

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self.order.state_dict("order."), "queue": list(self.queue),
                "retries": [[i, n] for i, n in sorted(self.retries.items())]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.order.load_state_dict(state, "order.")
        self.queue = [int(i) for i in state.pop("queue")]
        self.retries = {int(i): int(n) for i, n in state.pop("retries")}
        super().load_state_dict(state)
