"""``uniform``: every prompt once per epoch, in a seeded random order (TRL's ``RepeatSampler`` order)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, ClassVar

import torch

from opd_plugins.prompt_selection.base import PromptSelection


class EpochOrder:
    """A cursor over the dataset in epochs: epoch ``e`` visits every index once, in the order of the ``(e+1)``-th
    ``torch.randperm(n)`` of a ``torch.Generator`` seeded once with ``seed`` (``range(n)`` when not shuffling) —
    the order TRL's ``RepeatSampler`` walks. An epoch's tail too short for the chunk asked is dropped and the next
    epoch begins, as ``RepeatSampler`` drops its last partial chunk. The state is ``(epoch, position, n)``; the
    permutation is rebuilt from the seed when needed (e.g. after a resume)."""

    def __init__(self) -> None:
        self.epoch, self.position, self.n = 0, 0, 0
        self._cache: tuple[Any, ...] | None = None  # (seed, n, epoch, generator, order)

    def order(self, seed: int, shuffle: bool) -> list[int]:
        """The current epoch's order."""
        if not shuffle:
            return list(range(self.n))
        cache = self._cache
        if cache is None or cache[:2] != (seed, self.n) or cache[2] > self.epoch:
            cache = (seed, self.n, -1, torch.Generator().manual_seed(seed), [])
        seed_, n, epoch, gen, order = cache
        while epoch < self.epoch:
            order, epoch = torch.randperm(n, generator=gen).tolist(), epoch + 1
        self._cache = (seed_, n, epoch, gen, order)
        return order

    def take(self, count: int, n: int, seed: int, shuffle: bool, exclude: Collection[int] = ()) -> list[int]:
        """The next ``count`` indices of the order that are not in ``exclude`` (passing over those)."""
        if n != self.n:  # the first call, or a dataset of another size: a new epoch over it
            self.epoch, self.position, self.n = (self.epoch + 1 if self.n else 0), 0, n
        if count <= 0:
            return []
        for attempt in range(2):
            order, taken, pos = self.order(seed, shuffle), [], self.position
            while pos < n and len(taken) < count:
                if order[pos] not in exclude:
                    taken.append(order[pos])
                pos += 1
            if len(taken) == count:
                self.position = pos
                return taken
            self.epoch, self.position = self.epoch + 1, 0
        raise ValueError(f"cannot take {count} indices from a dataset of {n} excluding {len(exclude)}")

    def state_dict(self, prefix: str = "") -> dict[str, Any]:
        return {f"{prefix}epoch": self.epoch, f"{prefix}position": self.position, f"{prefix}n_prompts": self.n}

    def load_state_dict(self, state: dict[str, Any], prefix: str = "") -> None:
        """Take this cursor's keys out of ``state``."""
        self.epoch = int(state.pop(f"{prefix}epoch"))
        self.position = int(state.pop(f"{prefix}position"))
        self.n = int(state.pop(f"{prefix}n_prompts"))


class UniformSelection(PromptSelection):
    """Every prompt once per epoch in a seeded random order; the default, and what TRL's GRPO trainer does.

    Epoch ``e`` walks the ``(e+1)``-th ``torch.randperm(n)`` of a generator seeded with ``seed`` in chunks of
    ``k``, dropping a last partial chunk: for the same seed and dataset this is exactly the order of TRL's
    ``RepeatSampler(shuffle=True, seed=seed)`` (``range(n)`` each epoch when the trainer does not shuffle,
    ``shuffle_dataset: false``), so a run with ``uniform`` trains on the prompts a plain TRL run would. Unlike
    ``RepeatSampler``, whose generator starts over when a run resumes, the cursor is checkpointed: a resumed run
    continues the epoch it was in. Ignores rewards. Reference: TRL ``trl.trainer.utils.RepeatSampler``.
    """

    name: ClassVar[str] = "uniform"

    def __init__(self, params: Any = None, nested: dict[str, Any] | None = None) -> None:
        super().__init__(params, nested)
        self.order = EpochOrder()

    def choose(self, k: int, n_prompts: int, step: int, generator: torch.Generator) -> list[int]:
        chosen = self.order.take(k, n_prompts, self.seed, self.data_shuffle)
        self.last_stats = {"epoch": float(self.order.epoch)}
        return chosen

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self.order.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.order.load_state_dict(state)
        super().load_state_dict(state)
