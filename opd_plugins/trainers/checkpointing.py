"""Crash-safe checkpoints for any ``transformers.Trainer`` subclass: stage, mark complete, publish atomically."""

from __future__ import annotations

import os
import shutil

from opd_plugins.trainers.state import mark_complete

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
        if self.args.should_save:
            self._before_publish(staged)
            mark_complete(staged)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(staged, final)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()
