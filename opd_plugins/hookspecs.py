"""Every hook of opd_plugins, grouped by phase. The docstrings are the reference documentation.

Hook names start with ``opd_``; functions without the prefix are ignored by the manager. Hooks may gain
arguments over time but never lose them: an implementation takes only the arguments it needs.

Return semantics follow the name:
``opd_register_*`` results are concatenated; ``opd_<object>_<event>`` hooks are notifications whose return
value is ignored (they may edit the mutable objects they receive, as documented); hooks that return
contributions (``opd_loss_terms``, ``opd_step_metrics``) have every non-None result merged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

from opd_plugins.markers import PROJECT

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from opd_plugins.components import Component

hookspec = pluggy.HookspecMarker(PROJECT)


# ---------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------


@hookspec
def opd_register_components() -> list[type[Component]]:
    """Register component classes (teachers, divergences, advantages, samplers, rollouts, ...).

    Return the classes themselves, never instances; the kind of each is read from its base class.
    A name registered twice (by any two plugins) is a :class:`~opd_plugins.errors.PluginLoadError`.

    :returns: a list of :class:`~opd_plugins.components.Component` subclasses.

    Called: once per plugin manager, when the registry is first built (before recipe validation), in
    every process.
    """


# ---------------------------------------------------------------------------------------------------------------
# Trainer lifecycle
# ---------------------------------------------------------------------------------------------------------------


@hookspec
def opd_trainer_init(trainer: Any) -> None:
    """The trainer has been built: components resolved, models and teacher ready.

    :param trainer: the :class:`~opd_plugins.trainers.OPDTrainer` (its ``components`` and ``recipe`` are set).
    :returns: nothing (notification).

    Called: once, at the end of ``OPDTrainer.__init__``, on all ranks.
    """


# ---------------------------------------------------------------------------------------------------------------
# One training step, in order
# ---------------------------------------------------------------------------------------------------------------


@hookspec
def opd_prompts_prepared(trainer: Any, prompts: list[Any], rows: list[dict[str, Any]]) -> None:
    """The sampler has prepared this batch's prompts; the rollout is next.

    :param trainer: the trainer.
    :param prompts: the prepared prompts (conversational message lists or strings), one per completion to
        generate. The list may be edited in place (for example to add a system message).
    :param rows: the dataset rows the prompts come from (same order), read-only.
    :returns: nothing (notification).

    Called: once per generation batch (every ``steps_per_generation`` optimizer steps), on all ranks, with
    that rank's prompts.
    """


@hookspec
def opd_rollout_end(trainer: Any, rollout: dict[str, Any]) -> None:
    """Completions have been generated.

    :param trainer: the trainer.
    :param rollout: ``prompt_ids``, ``completion_ids`` (lists of token-id lists), ``completions`` (decoded),
        ``logprobs`` (behaviour log-probs per token, or None when the backend gives none) and
        ``policy_version`` (the optimizer step the weights come from). Read-only.
    :returns: nothing (notification).

    Called: once per generation batch, on all ranks, after the rollout backend returns.
    """


@hookspec
def opd_rewards_scored(trainer: Any, rewards_per_func: torch.Tensor, reward_names: list[str]) -> None:
    """Reward functions have scored the completions of the whole (global) generation batch.

    :param trainer: the trainer.
    :param rewards_per_func: ``(N_global, n_funcs)`` float tensor (NaN where a function returned None).
    :param reward_names: the reward functions' names, one per column.
    :returns: nothing (notification).

    Called: once per generation batch, on all ranks (the tensor is gathered across ranks).
    """


@hookspec
def opd_teacher_scored(trainer: Any, batch: dict[str, Any], scores: Any) -> None:
    """The teacher has scored this rank's completions.

    :param trainer: the trainer.
    :param batch: the generation batch (``prompt_ids``, ``completion_ids``, masks, ...).
    :param scores: the :class:`~opd_plugins.teachers.base.TeacherScores` (token log-probs, optional top-k,
        reliability statistics). Read-only.
    :returns: nothing (notification).

    Called: once per generation batch, on all ranks, only when the recipe has a teacher.
    """


@hookspec
def opd_degenerate_groups(trainer: Any, groups: list[int], rewards: torch.Tensor) -> None:
    """Some groups of completions of the same prompt all got the same reward (they carry no signal).

    :param trainer: the trainer.
    :param groups: indices of the degenerate groups in the global generation batch.
    :param rewards: ``(N_global,)`` total rewards of the global generation batch.
    :returns: nothing (notification). Samplers use it to add hints or prefixes next time.

    Called: once per generation batch in which at least one group is degenerate, on all ranks.
    """


@hookspec
def opd_advantages_computed(trainer: Any, batch: dict[str, Any], advantages: torch.Tensor) -> None:
    """Advantages are computed for this rank's completions.

    :param trainer: the trainer.
    :param batch: the generation batch.
    :param advantages: ``(B,)`` or ``(B, T)`` tensor; may be edited in place.
    :returns: nothing (notification).

    Called: once per generation batch, on all ranks.
    """


@hookspec
def opd_loss_terms(trainer: Any, inputs: dict[str, Any], terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Contribute extra loss terms.

    :param trainer: the trainer.
    :param inputs: this micro-batch (``prompt_ids``, ``completion_ids``, masks, ``advantages``, teacher scores).
    :param terms: the terms computed so far, already weighted (``policy_gradient``, ``divergence``). Read-only.
    :returns: a mapping ``name -> scalar tensor`` of extra terms (already weighted and normalised for
        gradient accumulation) that are added to the loss, or None. Every non-None result is used; a name
        that is already taken is an error.

    Called: once per micro-batch in ``compute_loss``, on all ranks, in training and evaluation.
    """


@hookspec
def opd_step_metrics(trainer: Any, inputs: dict[str, Any], mode: str) -> dict[str, float] | None:
    """Contribute metrics for this micro-batch; they are averaged and logged with the trainer's own.

    :param trainer: the trainer.
    :param inputs: this micro-batch.
    :param mode: ``"train"`` or ``"eval"``.
    :returns: ``{metric_name: value}`` or None. Every non-None result is logged.

    Called: once per micro-batch after the loss is computed, on all ranks.
    """


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------


@hookspec
def opd_checkpoint_save(trainer: Any, checkpoint_dir: str) -> None:
    """A checkpoint is being written: save plugin state that must survive a restart into ``checkpoint_dir``.

    Component state (``state_dict()``) is saved by the trainer itself; this hook is for other plugin state.

    :param trainer: the trainer.
    :param checkpoint_dir: the (not yet published) checkpoint directory.
    :returns: nothing (notification).

    Called: at every checkpoint, on the main process only, before the checkpoint is marked complete.
    """


@hookspec
def opd_checkpoint_load(trainer: Any, checkpoint_dir: str) -> None:
    """Training resumes from ``checkpoint_dir``: restore what ``opd_checkpoint_save`` wrote.

    :param trainer: the trainer.
    :param checkpoint_dir: the complete checkpoint directory being resumed from.
    :returns: nothing (notification).

    Called: once, when training resumes from a checkpoint, on all ranks.
    """


REGISTRATION_HOOKS: tuple[str, ...] = ("opd_register_components",)
LIFECYCLE_HOOKS: tuple[str, ...] = tuple(
    name for name, fn in list(globals().items())
    if name.startswith("opd_") and callable(fn) and hasattr(fn, f"{PROJECT}_spec") and name not in REGISTRATION_HOOKS
)
"""Hooks a trainer calls while it runs (every hook but the registration ones), in definition order."""
