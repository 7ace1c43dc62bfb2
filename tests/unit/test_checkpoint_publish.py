"""AtomicCheckpointMixin publishes a checkpoint only when every process has written its part of it: with several
processes, each rank saves its own files (``rng_state_<rank>.pth``) into the staged directory, so the main process
must wait for them before the rename, or a rank writes into a staging directory that was already published."""

import os
from pathlib import Path
from types import SimpleNamespace

from opd_plugins.trainers.checkpointing import STAGING_DIR, AtomicCheckpointMixin


class _OtherRank:
    """The accelerator of the main process, with a second rank that is slower: it writes its files into the
    checkpoint directory it was given only when the main process next waits for it (a barrier)."""

    def __init__(self) -> None:
        self.pending: list[str] = []
        self.barriers = 0

    def wait_for_everyone(self) -> None:
        self.barriers += 1
        for d in self.pending:
            os.makedirs(d, exist_ok=True)
            Path(d, "rng_state_1.pth").write_bytes(b"rank 1")
        self.pending.clear()


class _Trainer:
    """What ``transformers.Trainer._save_checkpoint`` does, reduced to its files: the main process writes the model
    and its RNG state, rank 1 its RNG state (later, see _OtherRank)."""

    def __init__(self, out: Path) -> None:
        self.args = SimpleNamespace(should_save=True, save_total_limit=None, output_dir=str(out))
        self.state = SimpleNamespace(global_step=4, best_model_checkpoint=None)
        self.accelerator = _OtherRank()

    def _get_output_dir(self, trial):
        return self.args.output_dir

    def _save_checkpoint(self, model, trial):
        d = os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}")
        os.makedirs(d, exist_ok=True)
        Path(d, "model.safetensors").write_bytes(b"weights")
        Path(d, "rng_state_0.pth").write_bytes(b"rank 0")
        self.accelerator.pending.append(d)


class _Atomic(AtomicCheckpointMixin, _Trainer):
    pass


def test_checkpoint_is_published_with_every_ranks_files_and_nothing_left_staged(tmp_path):
    trainer = _Atomic(tmp_path)
    trainer._save_checkpoint(model=None, trial=None)
    final = tmp_path / "checkpoint-4"
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors", "opd_checkpoint_complete",
                                                       "rng_state_0.pth", "rng_state_1.pth"]
    assert not list((tmp_path / STAGING_DIR).glob("checkpoint-*"))
