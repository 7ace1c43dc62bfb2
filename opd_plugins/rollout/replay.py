"""``replay``: completions read back from a teacher cache instead of sampled (offline OPD)."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

from pydantic import Field

from opd_plugins.components import ComponentParams
from opd_plugins.context import Rollouts, Sampling, SetupContext
from opd_plugins.errors import DataError
from opd_plugins.rollout.base import RolloutBackend


class ReplayRollout(RolloutBackend):
    """Returns the cached completions of each prompt instead of sampling (offline OPD, Lightning OPD).

    ``path`` is a cache written by ``opd-plugins precompute-teacher``; with teacher ``offline_cache`` on the same
    cache, training runs with no teacher model and no generation. Each prompt's cached completions are handed
    out round-robin in cache order: a group of ``num_generations`` copies of a prompt gets distinct completions
    while there are enough, and wraps around (repeating them) when the cache holds fewer; the next visit of the
    prompt continues where the last one stopped, so epochs cycle through every cached completion. The cursors
    are component state (they survive a checkpoint restart). A prompt with no cached completion is an error.
    Paper: Lightning OPD, https://github.com/jet-ai-projects/Lightning-OPD
    """

    name: ClassVar[str] = "replay"
    precision: ClassVar[str] = "cached"

    class Params(ComponentParams):
        path: str = Field(..., description="Cache directory written by `opd-plugins precompute-teacher`.")

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.cache: Any = None
        self._cursor: dict[str, int] = {}
        self._tokenizer: Any = None
        self._rank = 0

    @classmethod
    def example_params(cls) -> Params:
        return cls.Params(path="teacher_cache")

    def setup(self, ctx: SetupContext) -> None:
        from opd_plugins.teachers.cache.format import TeacherCache

        self.cache = TeacherCache(self.params.path)
        self.cache.prompt_index()
        self._tokenizer = ctx.tokenizer
        self._rank = ctx.process_index
        cached_max = self.cache.manifest.get("data", {}).get("max_completion_tokens")
        limit = ctx.max_completion_length
        if cached_max is not None and limit is not None and cached_max > limit:
            warnings.warn(f"rollout replay: the cache holds completions of up to {cached_max} tokens, more than "
                          f"max_completion_length={limit}; they are replayed whole", stacklevel=2)

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> Rollouts:
        from opd_plugins.teachers.cache.format import prompt_key

        if self.cache is None:
            raise RuntimeError("replay rollout used before setup()")
        index = self.cache.prompt_index()
        rank, num_generations = self._rank, sampling.num_generations
        completions = []
        for j, ids in enumerate(prompt_ids):
            ids = [int(t) for t in ids]
            key = prompt_key(ids)
            rows = index.get(key)
            if not rows:
                text = f" ({self._tokenizer.decode(ids)[-60:]!r})" if self._tokenizer is not None else ""
                raise DataError(
                    f"rollout replay: prompt {j} of this batch{text} has no cached completions in "
                    f"{self.params.path!r}. Train on the prompts of the rollout set the cache was made from "
                    "(e.g. data.dataset.path = the rollouts file), with the same model tokenizer and chat template"
                )
            if key not in self._cursor:  # a group split across ranks starts each rank at its copies' positions
                self._cursor[key] = (rank * len(prompt_ids) + j) % max(int(num_generations or 1), 1)
            n = self._cursor[key]
            self._cursor[key] = n + 1
            completions.append(self.cache.completion_ids(*rows[n % len(rows)]))
        return Rollouts(completions, None, sampling.step)

    def state_dict(self) -> dict[str, Any]:
        return {"cursors": dict(self._cursor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"cursors"}
        if unknown:
            raise ValueError(f"ReplayRollout state has unknown keys {sorted(unknown)}")
        self._cursor = {str(k): int(v) for k, v in state.get("cursors", {}).items()}
