"""A stateful sampler, and a hook that SIGKILLs the process in the middle of writing checkpoint N
(``OPD_TEST_KILL_AT_STEP``), to test atomic checkpoints and resume."""

import os
import signal
from typing import ClassVar

from opd_plugins import hookimpl
from opd_plugins.samplers.base import Sampler, SamplerOutput


class CountingSampler(Sampler):
    """Leaves prompts unchanged and counts its calls (state that must survive a restart)."""

    name: ClassVar[str] = "counting"

    def __init__(self, params=None):
        super().__init__(params)
        self.calls = 0

    def prepare(self, prompts, rows, step):
        self.calls += 1
        with open(os.environ["OPD_TEST_SAMPLER_LOG"], "a") as f:
            f.write(f"{step} {self.calls}\n")
        return SamplerOutput.unguided(len(prompts))

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


@hookimpl
def opd_register_components():
    return [CountingSampler]


@hookimpl
def opd_checkpoint_save(trainer, checkpoint_dir):
    if str(trainer.state.global_step) == os.environ.get("OPD_TEST_KILL_AT_STEP"):
        os.kill(os.getpid(), signal.SIGKILL)
