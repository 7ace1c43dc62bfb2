"""The generation batches that come next, for a rollout backend that generates ahead (``rollout: async``).

TRL's training dataloader yields each generation batch ``num_iterations × steps_per_generation`` times in a row.
A second iterator over the same dataloader object walks the same data order; :class:`DataLookahead` keeps its
distinct generation batches and, given the batch being generated now, returns the ones after it. It aligns by
content (the rows' prompts), so a resume (the trainer's dataloader skips ahead) or any divergence costs only
misses: the backend then generates the batch when it is asked for it.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any


def batch_key(rows: list[dict[str, Any]]) -> str:
    """A generation batch's identity: its rows' prompts, in order."""
    return json.dumps([r.get("prompt") for r in rows], sort_keys=True, default=str)


class DataLookahead:
    """Upcoming distinct generation batches of a dataloader (lists of rows), aligned with the current one."""

    def __init__(self, make_loader: Callable[[], Iterable[Any]], repeats: int, max_search: int) -> None:
        self.make_loader, self.repeats, self.max_search = make_loader, max(int(repeats), 1), max(int(max_search), 1)
        self.loader: Iterable[Any] | None = None
        self.iterator: Any = None
        self.buffer: deque[list[dict[str, Any]]] = deque()
        self.misaligned = 0

    def _pull(self) -> list[dict[str, Any]] | None:
        """The next distinct generation batch (the first of each run of ``repeats`` identical dataloader batches)."""
        if self.loader is None:
            self.loader = self.make_loader()
        batch = None
        for _ in range(self.repeats):
            for attempt in range(2):
                if self.iterator is None:
                    self.iterator = iter(self.loader)
                try:
                    item = next(self.iterator)
                    break
                except StopIteration:  # next epoch, on the same dataloader object (its sampler moves on)
                    self.iterator = None
                    if attempt:
                        return None
            batch = batch if batch is not None else list(item)
        return batch

    def after(self, rows: list[dict[str, Any]], n: int) -> list[list[dict[str, Any]]]:
        """The ``n`` generation batches after ``rows`` (empty when ``rows`` cannot be found in the data order)."""
        key = batch_key(rows)
        while self.buffer and batch_key(self.buffer[0]) != key:
            self.buffer.popleft()
        if not self.buffer:
            for _ in range(self.max_search):
                batch = self._pull()
                if batch is None:
                    break
                if batch_key(batch) == key:
                    self.buffer.append(batch)
                    break
            else:
                self.misaligned += 1
                return []
            if not self.buffer:
                self.misaligned += 1
                return []
        while len(self.buffer) < n + 1:
            batch = self._pull()
            if batch is None:
                break
            self.buffer.append(batch)
        return list(self.buffer)[1:n + 1]


__all__ = ["DataLookahead", "batch_key"]
