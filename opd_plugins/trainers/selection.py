"""The trainer's side of ``prompt_selection`` (docs/prompt_selection.md): the dataset index the selection is told
about, the train sampler built around it, and the generation batch's outcome handed to it.

* :func:`index_dataset` gives the training dataset an ``opd_dataset_index`` column (its row number), so every
  generation batch's rows say which dataset prompts they are.
* ``OPDTrainer._get_train_sampler`` returns :func:`~opd_plugins.prompt_selection.build_selection_sampler` around
  the recipe's selection in place of TRL's ``RepeatSampler`` (``uniform``: the same order, index for index).
* :func:`observe_batch`, once per training generation batch on every rank: the prompts of the whole batch (every
  rank's rows, gathered) and their rollouts' total rewards, ``(prompts, G)``, go to
  :meth:`~opd_plugins.prompt_selection.base.PromptSelection.observe`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from opd_plugins.errors import OPDError
from opd_plugins.prompt_selection.base import PromptSelection

DATASET_INDEX = "opd_dataset_index"
"""The training dataset's column holding each row's index (added by :func:`index_dataset`)."""

DEFAULT = "uniform"
"""The selection that needs no index: TRL's own data order, which an iterable dataset also gets."""


def _iterable(dataset: Any) -> bool:
    import datasets

    return isinstance(dataset, (datasets.IterableDataset, torch.utils.data.IterableDataset))


def index_dataset(dataset: Any, selection: PromptSelection) -> Any:
    """``dataset`` with an ``opd_dataset_index`` column (0 … n−1, replacing one it has), or unchanged when it cannot
    be indexed; a selection other than ``uniform`` needs the index (and a sampler), so it is refused then."""
    import datasets

    if dataset is None:
        return dataset
    if isinstance(dataset, datasets.Dataset):
        if DATASET_INDEX in dataset.column_names:
            dataset = dataset.remove_columns(DATASET_INDEX)
        return dataset.add_column(DATASET_INDEX, list(range(len(dataset))))
    if selection.name != DEFAULT:
        what = ("an iterable dataset, which TRL streams in its own order without a sampler and whose rows have no "
                "index" if _iterable(dataset) else f"a {type(dataset).__name__}, whose rows cannot be indexed")
        raise OPDError(f"prompt_selection.name: {selection.name!r} chooses the prompts of each generation batch by "
                       f"their dataset index, but the training dataset is {what}; give a map-style datasets.Dataset "
                       f"(e.g. Dataset.from_list, or load without streaming), or set prompt_selection.name: {DEFAULT}")
    return dataset


def observe_batch(selection: PromptSelection, rows: list[dict[str, Any]], rewards: torch.Tensor,
                  num_generations: int, step: int,
                  gather: Callable[[list[Any]], list[Any]] | None = None) -> dict[str, float]:
    """Hand one training generation batch to ``selection``; returns the metrics to log (``prompt_selection/<key>``
    for the selection's ``last_stats``).

    ``rows``: this rank's dataset rows of the batch, in generation order; ``rewards``: the total reward of every
    completion of the whole batch ``(N,)`` (all ranks, NaN: unscored), the scalar the advantages use; ``gather``:
    every rank's lists concatenated in rank order (None: one process). Call it on every rank in the same step: each
    then observes the same indices and rewards. Rows without an index (an iterable dataset, allowed with
    ``uniform`` only) are not observed.
    """
    local = [row.get(DATASET_INDEX) for row in rows]
    indices = list(gather(local)) if gather is not None else local
    if not indices or any(i is None for i in indices):
        if selection.name == DEFAULT:
            return {}
        raise OPDError(f"prompt_selection.name: {selection.name!r} needs every training row's {DATASET_INDEX!r} "
                       f"column, but this generation batch has rows without it (trainer.args.remove_unused_columns "
                       "drops it, as may a custom data collator); keep the column")
    G = int(num_generations)
    rewards = rewards.detach().reshape(-1)
    if rewards.numel() != len(indices) or len(indices) % G:
        raise OPDError(f"prompt_selection {selection.name!r}: {len(indices)} rows and {rewards.numel()} rewards in "
                       f"this generation batch, not groups of num_generations={G}")
    groups = [indices[g:g + G] for g in range(0, len(indices), G)]
    mixed = [sorted({int(i) for i in group}) for group in groups if len(set(group)) != 1]
    if mixed:
        raise OPDError(f"prompt_selection {selection.name!r}: a group of {G} rollouts mixes dataset prompts "
                       f"{mixed[0]}: the generation batch is not in the train sampler's order (a custom "
                       "_get_train_sampler or _prepare_inputs?)")
    selection.observe([int(group[0]) for group in groups], rewards.float().cpu().view(-1, G), step)
    return {f"prompt_selection/{key}": float(value) for key, value in (selection.last_stats or {}).items()}


def detached(selection: PromptSelection) -> PromptSelection:
    """A copy of ``selection`` for a second reader of the data order (the ``async`` rollout's look-ahead): it walks
    the same chunks as the run from the same state without drawing from, or observing into, the run's selection.
    A selection that learns from rewards is then followed only as far as it has observed (misses are regenerated
    when due)."""
    return copy.deepcopy(selection)


__all__ = ["DATASET_INDEX", "index_dataset", "observe_batch", "detached"]
