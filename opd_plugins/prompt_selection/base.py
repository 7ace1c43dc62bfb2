"""The prompt-selection contract: which prompts of the training dataset the next generation batch is drawn from."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from opd_plugins.components import Component, ComponentParams


class PromptSelection(Component):
    """Base class of prompt selections (adaptive prompt selection, curricula): which dataset prompts the next
    chunk of a run is made of, from what the prompts trained so far scored.

    The trainer's sampler (:class:`~opd_plugins.prompt_selection.sampler.SelectionSampler`) calls :meth:`select`
    for each chunk of ``k`` prompts when its iteration reaches that chunk, and the trainer calls :meth:`observe`
    with every generation batch's rewards, on every rank with the same globally gathered values, so the state is
    the same on every rank. Subclasses implement :meth:`choose` (and :meth:`update` when they learn from rewards);
    :meth:`select` and :meth:`observe` check the arguments and results around them and count the chunks drawn.

    Determinism: :meth:`choose` gets a ``torch.Generator`` seeded from ``(seed, chunks drawn so far)``; a
    selection that draws only from it, never from the global RNG, gives the same chunks for the same state, seed
    and step, on every rank and after a resume (its :meth:`state_dict` must then hold everything else it uses).
    """

    kind: ClassVar[str] = "prompt_selection"

    class Params(ComponentParams):
        seed: int | None = Field(None, description=(
            "Seed of the selection's draws; null: the trainer's seed (trainer.args.seed, handed over by the "
            "sampler), else 0."))

    def __init__(self, params: ComponentParams | None = None, nested: dict[str, Any] | None = None) -> None:
        super().__init__(params, nested)
        self.draws = 0  # chunks drawn so far (seeds the next chunk's generator)
        self.last_stats: dict[str, float] = {}
        self.data_seed: int | None = None
        self.data_shuffle = True
        self._pass: list[list[int]] = []  # the sampler's current pass over the data: the chunks drawn in it
        self._pass_done = False

    # -- what a selection implements -------------------------------------------------------------------------
    def choose(self, k: int, n_prompts: int, step: int, generator: torch.Generator) -> list[int]:
        """``k`` distinct dataset indices in ``[0, n_prompts)`` for the next chunk; may update the state (a cursor)
        and set :attr:`last_stats`."""
        raise NotImplementedError

    def update(self, indices: list[int], rewards: torch.Tensor, step: int) -> None:
        """Learn from the prompts just trained on (see :meth:`observe`). Default: nothing."""

    # -- what the trainer and the sampler call ---------------------------------------------------------------
    @property
    def seed(self) -> int:
        """The ``seed`` param, else the trainer's seed (:meth:`bind_data_order`), else 0."""
        if self.params.seed is not None:
            return self.params.seed
        return self.data_seed if self.data_seed is not None else 0

    def bind_data_order(self, seed: int | None, shuffle: bool = True) -> None:
        """The trainer's data-order settings (``args.seed``, ``shuffle_dataset``), handed over by the sampler:
        ``seed`` is used when the ``seed`` param is null; ``shuffle`` is for selections that walk the dataset in
        order (``uniform``)."""
        self.data_seed, self.data_shuffle = seed, bool(shuffle)

    def generator(self) -> torch.Generator:
        """A ``torch.Generator`` seeded from ``(seed, chunks drawn so far)``."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.draws) % (2**63))

    def select(self, k: int, n_prompts: int, step: int) -> list[int]:
        """``k`` distinct dataset indices in ``[0, n_prompts)`` for the next chunk of prompts (deterministic given
        the state, the seed and ``step``)."""
        if not 0 < k <= n_prompts:
            raise ValueError(f"prompt_selection {self.name!r}: cannot select {k} distinct prompts from a dataset of "
                             f"{n_prompts}; give a dataset of at least {max(k, 1)} prompts")
        chosen = [int(i) for i in self.choose(k, n_prompts, step, self.generator())]
        if len(chosen) != k or len(set(chosen)) != k or not all(0 <= i < n_prompts for i in chosen):
            raise ValueError(f"prompt_selection {self.name!r} chose {chosen} where {k} distinct indices in "
                             f"[0, {n_prompts}) were due")
        self.draws += 1
        return chosen

    def observe(self, indices: list[int], rewards: torch.Tensor, step: int) -> None:
        """The outcome of the prompts just trained on: ``indices`` (n,) their dataset indices, ``rewards`` (n, G)
        each prompt's G rollout rewards (NaN: unscored). Called on every rank with the same gathered values."""
        indices = [int(i) for i in indices]
        rewards = torch.as_tensor(rewards).detach().to("cpu", torch.float64)
        if rewards.dim() != 2 or rewards.shape[0] != len(indices):
            raise ValueError(f"prompt_selection {self.name!r}: rewards must be (n, G) with one row per index; got "
                             f"{tuple(rewards.shape)} for {len(indices)} indices")
        if any(i < 0 for i in indices):
            raise ValueError(f"prompt_selection {self.name!r}: negative dataset index in {indices}")
        self.update(indices, rewards, step)

    # -- the sampler's passes over the data (so a resumed run re-reads the chunks it drew before) ------------
    def begin_pass(self, resume: bool) -> None:
        """A sampler starts iterating. ``resume``: its first iteration in this process, which continues an
        unfinished pass restored from a checkpoint (a resumed run re-reads it from the start, skipping the
        batches it trained); otherwise a new pass begins."""
        if not (resume and not self._pass_done):
            self._pass, self._pass_done = [], False

    def chunk(self, j: int, k: int, n_prompts: int, step: int) -> list[int]:
        """Chunk ``j`` of the current pass: drawn by :meth:`select` the first time, the same indices after."""
        if j < len(self._pass):
            if len(self._pass[j]) != k:
                raise ValueError(f"prompt_selection {self.name!r}: chunk {j} of the restored pass has "
                                 f"{len(self._pass[j])} prompts, {k} asked: the batch size changed since the checkpoint")
            return list(self._pass[j])
        if j != len(self._pass):
            raise ValueError(f"prompt_selection {self.name!r}: chunk {j} asked before chunk {len(self._pass)}")
        indices = self.select(k, n_prompts, step)
        self._pass.append(indices)
        return indices

    def end_pass(self) -> None:
        """The sampler's iteration went through the whole pass."""
        self._pass_done = True

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base state (chunks drawn, the sampler's current pass); subclasses add theirs to it."""
        width = len(self._pass[0]) if self._pass else 0
        return {**super().state_dict(), "draws": self.draws, "pass_done": self._pass_done,
                "pass_chunks": torch.tensor(self._pass, dtype=torch.int64).reshape(len(self._pass), width)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the base state; subclasses take their keys out of ``state`` first and pass the rest here."""
        state = dict(state)
        self.draws = int(state.pop("draws", 0))
        self._pass_done = bool(state.pop("pass_done", False))
        self._pass = torch.as_tensor(state.pop("pass_chunks", torch.zeros(0, 0))).long().tolist()
        super().load_state_dict(state)


def pop_tensor(state: dict[str, Any], key: str, dtype: torch.dtype) -> torch.Tensor:
    """``state[key]`` (a tensor or a list, as a checkpoint gives it back) as a CPU tensor of ``dtype``, removed
    from ``state``."""
    return torch.as_tensor(state.pop(key)).to("cpu", dtype).clone()
