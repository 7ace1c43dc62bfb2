"""``SelectionSampler``: TRL's ``RepeatSampler`` structure, with each chunk's prompts chosen by a prompt selection.

``GRPOTrainer`` iterates a ``RepeatSampler``: chunks of ``batch_size`` prompt indices (one generation batch's
prompts), each chunk repeated ``repeat_count`` times (``num_iterations × steps_per_generation``: the micro-batches
that reuse one generation), each index ``mini_repeat_count`` times in a row (``num_generations``: one group).
``SelectionSampler`` yields the same structure and length, but asks the selection for each chunk *when the
iteration reaches it*, so the chunk reflects every :meth:`~opd_plugins.prompt_selection.base.PromptSelection.observe`
call made before.

**The lag.** The data loader reads ahead: transformers' ``Trainer`` fetches the ``gradient_accumulation_steps``
micro-batches of an optimizer step before running them, accelerate's ``DataLoaderShard`` reads one batch more, and
with ``dataloader_num_workers > 0`` torch reads ``prefetch_factor × num_workers`` batches ahead. So chunk ``c+1`` is
drawn when the loader reads its first batch, before the trainer reaches it. With TRL's defaults
(``steps_per_generation = gradient_accumulation_steps``, ``num_iterations = 1``) that happens before chunk ``c`` is
generated: chunk ``c+1`` is chosen from the rewards of chunks ``≤ c−1`` (a one-chunk lag). With
``num_iterations ≥ 2`` (and no loader workers) chunk ``c`` is observed before chunk ``c+1`` is drawn.

**Resuming.** The chunks drawn in the current pass over the data are part of the selection's state. A resumed run
re-reads its epoch from the start and skips the batches it trained (``skip_first_batches``): the first iteration of
a new sampler whose selection was restored mid-pass replays those chunks, and the chunks drawn ahead before the
checkpoint, unchanged, then draws new ones; the run continues exactly as the uninterrupted one would (with
``dataloader_num_workers: 0``, TRL's default: loader workers may finish a pass's draws before its last batches
are trained).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from torch.utils.data import Sampler

from opd_plugins.prompt_selection.base import PromptSelection


class SelectionSampler(Sampler[int]):
    """``RepeatSampler(data_source, mini_repeat_count, batch_size, repeat_count, shuffle, seed)``'s structure and
    length, with the chunks from ``selection`` (keyword-only, with ``step_fn``: the trainer's global step, passed
    to :meth:`~opd_plugins.prompt_selection.base.PromptSelection.select`; None: step 0).

    ``seed`` and ``shuffle`` are handed to the selection (:meth:`~PromptSelection.bind_data_order`): ``seed`` seeds
    it when its own ``seed`` param is null, and ``uniform`` then walks exactly ``RepeatSampler``'s order.
    """

    def __init__(self, data_source: Sized, mini_repeat_count: int, batch_size: int = 1, repeat_count: int = 1,
                 shuffle: bool = True, seed: int | None = None, *, selection: PromptSelection,
                 step_fn: Callable[[], int] | None = None) -> None:
        if not isinstance(selection, PromptSelection):
            raise TypeError(f"selection must be a PromptSelection component, not {type(selection).__name__}")
        self.data_source = data_source
        self.mini_repeat_count = mini_repeat_count
        self.batch_size = batch_size
        self.repeat_count = repeat_count
        self.num_samples = len(data_source)
        self.shuffle = shuffle
        self.seed = seed
        self.selection = selection
        self.step_fn = step_fn
        self._iterated = False
        selection.bind_data_order(seed, shuffle)

    def __iter__(self) -> Iterator[int]:
        self.selection.begin_pass(resume=not self._iterated)
        self._iterated = True
        for j in range(self.num_samples // self.batch_size):
            step = int(self.step_fn()) if self.step_fn is not None else 0
            chunk = self.selection.chunk(j, self.batch_size, self.num_samples, step)
            for _ in range(self.repeat_count):
                for index in chunk:
                    for _ in range(self.mini_repeat_count):
                        yield index
        self.selection.end_pass()

    def __len__(self) -> int:
        return (self.num_samples // self.batch_size) * self.batch_size * self.mini_repeat_count * self.repeat_count


def build_selection_sampler(selection: PromptSelection, dataset: Sized, *, num_generations: int,
                            generation_batch_size: int, num_iterations: int, steps_per_generation: int,
                            seed: int | None, step_fn: Callable[[], int] | None, shuffle: bool = True) -> SelectionSampler:
    """The :class:`SelectionSampler` ``GRPOTrainer._get_train_sampler`` would build as a ``RepeatSampler``::

        return build_selection_sampler(self.components.prompt_selection, dataset, num_generations=self.num_generations,
                                       generation_batch_size=self.args.generation_batch_size,
                                       num_iterations=self.num_iterations,
                                       steps_per_generation=self.args.steps_per_generation, seed=self.args.seed,
                                       shuffle=self.shuffle_dataset, step_fn=lambda: self.state.global_step)
    """
    if generation_batch_size % num_generations:
        raise ValueError(f"generation_batch_size ({generation_batch_size}) must be a multiple of num_generations "
                         f"({num_generations})")
    return SelectionSampler(dataset, mini_repeat_count=num_generations,
                            batch_size=generation_batch_size // num_generations,
                            repeat_count=num_iterations * steps_per_generation, shuffle=shuffle, seed=seed,
                            selection=selection, step_fn=step_fn)


__all__ = ["SelectionSampler", "build_selection_sampler"]
