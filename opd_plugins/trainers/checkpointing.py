"""Crash-safe checkpoints for any ``transformers.Trainer`` subclass (stage, mark complete, publish atomically), and
the checkpoint and end-of-training hooks every trainer variant calls."""

from __future__ import annotations

import os
import shutil
from typing import Any

from opd_plugins.trainers.guards import FiniteGradientGuard
from opd_plugins.trainers.state import load_component_states, mark_complete, save_component_states

STAGING_DIR = ".staging"


class AtomicCheckpointMixin:
    """Put before the Trainer class in the bases. Each ``checkpoint-N`` is written into ``output_dir/.staging``,
    completed by :meth:`_before_publish` (extra state), marked complete, and published with one atomic rename;
    a run killed mid-save leaves the previous checkpoints untouched and resumable."""

    _staging = False

    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._staging else run_dir

    def _before_publish(self, staged: str) -> None:
        """Write extra state into the staged checkpoint (main process only). Nothing by default."""

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = os.path.join(run_dir, STAGING_DIR, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.exists(staged):
            shutil.rmtree(staged)  # a checkpoint a killed run never published
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        # every rank writes into the staged directory (its own rng_state_<rank>.pth, sharded optimizer state): publish
        # only once all have, or a late rank recreates the staging directory after the rename and its files are lost
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self._before_publish(staged)
            mark_complete(staged)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(staged, final)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()


class HookedTrainerMixin(AtomicCheckpointMixin):
    """Put before the TRL trainer class in the bases, with ``self.pm`` (the plugin manager) set: atomic checkpoints
    that carry the components' state (:meth:`checkpoint_components`), ``opd_checkpoint_save`` /
    ``opd_checkpoint_load`` around them, ``opd_train_end`` when ``train()`` returns, and the
    :class:`~opd_plugins.trainers.guards.FiniteGradientGuard`. Shared by every trainer variant, so their hooks
    fire alike."""

    pm: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(FiniteGradientGuard())  # no optimizer step, hence no checkpoint, on non-finite gradients

    def checkpoint_components(self) -> dict[str, Any]:
        """``{key: component}`` whose ``state_dict()`` goes into every checkpoint."""
        return {}

    def train(self, *args: Any, **kwargs: Any) -> Any:
        out = super().train(*args, **kwargs)
        self.pm.call("opd_train_end", trainer=self)
        return out

    def _before_publish(self, staged: str) -> None:
        save_component_states(staged, self.checkpoint_components())
        self.pm.call("opd_checkpoint_save", trainer=self, checkpoint_dir=staged)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            load_component_states(checkpoint, self.checkpoint_components())
            self.pm.call("opd_checkpoint_load", trainer=self, checkpoint_dir=checkpoint)
