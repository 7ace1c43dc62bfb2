"""Test plugins for sharded runs: a rollout whose completions depend only on the prompt and the rollout's place in
its group (so a 2-process run samples exactly what a 1-process run samples), and a probe that records, at the end
of training, how the student's and the teacher's parameters are laid out on each rank."""

import hashlib
import json
import os
from typing import ClassVar

from opd_plugins import hookimpl
from opd_plugins.context import Rollouts
from opd_plugins.rollout.base import RolloutBackend
from opd_plugins.tasks.arithmetic import ArithmeticTask


class FixedRollout(RolloutBackend):
    """Completion tokens drawn from a hash of the prompt ids and the copy's index within its group."""

    name: ClassVar[str] = "test_fixed_rollout"
    samples_policy: ClassVar[bool] = False

    def setup(self, ctx):
        self.length = int(ctx.max_completion_length or 6)
        self.vocab = len(ctx.tokenizer)
        self.special = set(ctx.tokenizer.all_special_ids)

    def generate(self, prompt_ids, sampling):
        seen, out = {}, []
        for ids in prompt_ids:
            key = tuple(ids)
            copy = seen[key] = seen.get(key, -1) + 1
            digest = hashlib.sha256(repr((key, copy)).encode()).digest()
            tokens = [4 + b % (self.vocab - 4) for b in digest[: self.length]]
            out.append([t for t in tokens if t not in self.special] or [5])
        return Rollouts(out, None, sampling.step)


def _layout(module):
    from torch.distributed.tensor import DTensor

    params = list(module.parameters()) if module is not None else []
    return {"n": len(params), "dtensor": sum(isinstance(p, DTensor) for p in params)}


class VariedReward(ArithmeticTask):
    """Arithmetic prompts, rewarded by a fixed function of the completion text: a reward that varies within a group
    whatever the model, so the policy gradient is not zero."""

    name: ClassVar[str] = "test_varied_reward"

    def score(self, completion, answer, metadata=None):
        return (sum(map(ord, completion)) % 5) / 4


@hookimpl
def opd_register_components():
    return [FixedRollout, VariedReward]


@hookimpl
def opd_train_end(trainer):
    path = os.environ.get("OPD_TEST_PROBE")
    if not path:
        return
    teacher = getattr(trainer.components.teacher, "model", None)
    record = {"rank": trainer.accelerator.process_index, "sharding": trainer.sharding(),
              "student": _layout(trainer.model), "teacher": _layout(teacher),
              "placement": getattr(trainer.components.teacher, "placement", None)}
    with open(f"{path}.{record['rank']}", "w") as f:
        json.dump(record, f)


def _allow_fsdp_on_cpu():
    """accelerate enables FSDP only on accelerators (on CPU it silently falls back to DDP), so for these CPU tests
    its state is switched to FSDP when the launcher asked for it; everything else (the plugin, its settings,
    ``accelerator.prepare``) is accelerate's own, on gloo."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_opd_cpu_fsdp", False):
        return

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and plugin is not None
                and self.distributed_type == DistributedType.MULTI_CPU):
            self.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = plugin

    init._opd_cpu_fsdp = True
    AcceleratorState.__init__ = init


if os.environ.get("OPD_TEST_CPU_FSDP"):
    _allow_fsdp_on_cpu()
