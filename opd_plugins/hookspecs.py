"""Every hook of opd_plugins, grouped by phase. The docstrings are the reference documentation.

Hook names start with ``opd_``; functions without the prefix are ignored by the manager. Hooks may gain
arguments over time but never lose them: an implementation takes only the arguments it needs.

Return semantics follow the name:
``opd_register_*`` results are concatenated; ``opd_<object>_<event>`` hooks are notifications whose return
value is ignored; ``opd_modify_*`` hooks may edit, in place, the objects they receive (pytest's ``…_modifyitems``);
hooks that return contributions (``opd_loss_terms``, ``opd_step_metrics``) have every non-None result merged.

The types below are imported for type checkers only: ``trainer`` is an
:class:`~opd_plugins.trainers.OPDTrainer` (or a trainer variant's own trainer, e.g. SODA's ``DPOTrainer``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

from opd_plugins.markers import PROJECT

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import Trainer

    from opd_plugins.components import Component
    from opd_plugins.teachers.base import TeacherScores
    from opd_plugins.trainers import OPDTrainer

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
def opd_trainer_init(trainer: Trainer) -> None:
    """The trainer has been built: components resolved, models and teacher ready.

    :param trainer: the :class:`~opd_plugins.trainers.OPDTrainer` (its ``components`` and ``recipe`` are set), or
        the trainer of another variant (SODA: a ``DPOTrainer``; its ``components`` is a ``{name: component}`` dict).
    :returns: nothing (notification).

    Called: once, at the end of the trainer's ``__init__``, on all ranks, by every trainer variant.
    """


@hookspec
def opd_train_end(trainer: Trainer) -> None:
    """Training has finished: every step is done and the last checkpoint written (``final/`` and the held-out
    evaluation come after).

    :param trainer: the trainer (as in :func:`opd_trainer_init`).
    :returns: nothing (notification).

    Called: once, at the end of ``trainer.train()`` when it returns normally, on all ranks, by every trainer
    variant.
    """


# ---------------------------------------------------------------------------------------------------------------
# One training step, in order
# ---------------------------------------------------------------------------------------------------------------


@hookspec
def opd_modify_prompts(trainer: OPDTrainer, prompts: list[Any], rows: list[dict[str, Any]]) -> None:
    """Edit this batch's prompts in place before the rollout (after the sampler has prepared them).

    :param trainer: the trainer.
    :param prompts: the prepared prompts (conversational message lists or strings), one per completion to
        generate; edit the list (or its messages) in place, e.g. to add a system message. Its length must not change.
    :param rows: the dataset rows the prompts come from (same order), read-only.
    :returns: nothing (edits in place).

    Called: once per generation batch (every ``steps_per_generation`` optimizer steps), on all ranks, with
    that rank's prompts, before :func:`opd_prompts_prepared`.
    """


@hookspec
def opd_prompts_prepared(trainer: OPDTrainer, prompts: list[Any], rows: list[dict[str, Any]]) -> None:
    """The prompts of this batch are final; the rollout is next.

    :param trainer: the trainer.
    :param prompts: the prompts (conversational message lists or strings), one per completion to generate.
        Read-only: edit them in :func:`opd_modify_prompts` (edits made here still take effect in this release,
        not in the next).
    :param rows: the dataset rows the prompts come from (same order), read-only.
    :returns: nothing (notification).

    Called: once per generation batch (every ``steps_per_generation`` optimizer steps), on all ranks, with
    that rank's prompts, after :func:`opd_modify_prompts`.
    """


@hookspec
def opd_rollout_end(trainer: OPDTrainer, rollout: dict[str, Any]) -> None:
    """Completions have been generated.

    :param trainer: the trainer.
    :param rollout: ``prompt_ids``, ``completion_ids`` (lists of token-id lists), ``completions`` (decoded),
        ``logprobs`` (behaviour log-probs per token, or None when the backend gives none) and
        ``policy_version`` (the optimizer step the weights come from). Read-only.
    :returns: nothing (notification).

    Called: once per generation batch, on all ranks, after the rollout backend returns.
    """


@hookspec
def opd_rewards_scored(trainer: OPDTrainer, rewards_per_func: torch.Tensor, reward_names: list[str]) -> None:
    """Reward functions have scored the completions of the whole (global) generation batch.

    :param trainer: the trainer.
    :param rewards_per_func: ``(N_global, n_funcs)`` float tensor (NaN where a function returned None).
    :param reward_names: the reward functions' names, one per column.
    :returns: nothing (notification).

    Called: once per generation batch, on all ranks (the tensor is gathered across ranks).
    """


@hookspec
def opd_teacher_scored(trainer: OPDTrainer, batch: dict[str, Any], scores: TeacherScores) -> None:
    """The teacher has scored this rank's completions.

    :param trainer: the trainer.
    :param batch: the generation batch (``prompt_ids``, ``completion_ids``, masks, ...).
    :param scores: the :class:`~opd_plugins.teachers.base.TeacherScores` (token log-probs, optional top-k,
        reliability statistics). Read-only.
    :returns: nothing (notification).

    Called: once per generation batch, on all ranks, only when the recipe has a teacher.
    """


@hookspec
def opd_degenerate_groups(trainer: OPDTrainer, groups: list[int], rewards: torch.Tensor) -> None:
    """Some groups of completions of the same prompt all got the same reward (they carry no signal).

    :param trainer: the trainer.
    :param groups: indices of the degenerate groups in the global generation batch.
    :param rewards: ``(N_global,)`` total rewards of the global generation batch.
    :returns: nothing (notification). (The recipe's sampler is told too, through its own
        ``on_degenerate_groups(rows, rewards, step)``, with one row and the ``(n, G)`` rewards of each degenerate
        group.)

    Called: once per generation batch in which at least one group is degenerate, on all ranks.
    """


@hookspec
def opd_modify_advantages(trainer: OPDTrainer, batch: dict[str, Any], advantages: torch.Tensor) -> None:
    """Edit this rank's advantages in place before they reach the loss.

    :param trainer: the trainer.
    :param batch: the generation batch (read-only).
    :param advantages: ``(B,)`` or ``(B, T)`` tensor; edit it in place (its shape must not change).
    :returns: nothing (edits in place).

    Called: once per generation batch, on all ranks, before :func:`opd_advantages_computed`.
    """


@hookspec
def opd_advantages_computed(trainer: OPDTrainer, batch: dict[str, Any], advantages: torch.Tensor) -> None:
    """Advantages are final for this rank's completions.

    :param trainer: the trainer.
    :param batch: the generation batch.
    :param advantages: ``(B,)`` or ``(B, T)`` tensor. Read-only: edit it in :func:`opd_modify_advantages` (edits
        made here still take effect in this release, not in the next).
    :returns: nothing (notification).

    Called: once per generation batch, on all ranks, after :func:`opd_modify_advantages`.
    """


@hookspec
def opd_loss_terms(trainer: OPDTrainer, inputs: dict[str, Any], terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
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
def opd_step_metrics(trainer: OPDTrainer, inputs: dict[str, Any], mode: str) -> dict[str, float] | None:
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
def opd_checkpoint_save(trainer: Trainer, checkpoint_dir: str) -> None:
    """A checkpoint is being written: save plugin state that must survive a restart into ``checkpoint_dir``.

    Component state (``state_dict()``) is saved by the trainer itself; this hook is for other plugin state.

    :param trainer: the trainer.
    :param checkpoint_dir: the (not yet published) checkpoint directory.
    :returns: nothing (notification).

    Called: at every checkpoint, on the main process only, before the checkpoint is marked complete.
    """


@hookspec
def opd_checkpoint_load(trainer: Trainer, checkpoint_dir: str) -> None:
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
