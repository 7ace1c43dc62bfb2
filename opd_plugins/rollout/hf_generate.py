"""``hf_generate``: sample with transformers' ``generate`` on the training weights (CPU or GPU)."""

from __future__ import annotations

from typing import ClassVar

from opd_plugins.context import Rollouts, Sampling, SetupContext
from opd_plugins.errors import OPDError
from opd_plugins.rollout.base import RolloutBackend


class HFGenerate(RolloutBackend):
    """Rollouts from ``model.generate`` on the live training weights, through TRL's own generation path.

    Works everywhere (no vLLM needed), so it is the default and the CPU backend. It reads the policy directly,
    so no weight sync is needed; sampling settings (``temperature``, ``top_p``, ``top_k``,
    ``max_completion_length``) come from the trainer arguments. The behaviour log-probs are what TRL's path returns
    (None for transformers generation).
    """

    name: ClassVar[str] = "hf_generate"
    samples_policy: ClassVar[bool] = True

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self._generate = None

    def setup(self, ctx: SetupContext) -> None:
        if ctx.trl_generate is None:
            raise OPDError("rollout 'hf_generate' runs TRL's own generation, which this context does not provide "
                           "(it is set by OPDTrainer)")
        self._generate = ctx.trl_generate

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> Rollouts:
        if self._generate is None:
            raise RuntimeError("hf_generate rollout used before setup()")
        completion_ids, logprobs = self._generate(prompt_ids, sampling.images, sampling.multimodal_fields,
                                                  sampling.num_generations, sampling.has_tool_images)
        return Rollouts(completion_ids, logprobs, sampling.step)
