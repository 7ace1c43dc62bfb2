"""``perturbed_hf``: sample from a deliberately perturbed copy of the policy and report its log-probs.

It exists to test and demonstrate mismatch correction (:mod:`opd_plugins.correction`) on any machine: the
behaviour policy μ differs from the training policy π by a known, tunable amount, and the backend returns
log μ of every sampled token, exactly as an FP8, asynchronous or served engine would. A real low-precision
backend declares its precision and behaves the same way; only the source of the mismatch differs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from opd_plugins.components import ComponentParams
from opd_plugins.context import Rollouts, Sampling, SetupContext
from opd_plugins.errors import OPDError
from opd_plugins.rollout._fp8 import requantize_from_state
from opd_plugins.rollout._private_copy import check_text_only, effective_state, generate_with_logprobs, private_copy
from opd_plugins.rollout.base import RolloutBackend


class PerturbedHFGenerate(RolloutBackend):
    """Rollouts from a noisy copy of the policy, with the behaviour log-probs of the sampled tokens.

    At setup and after every optimizer step (on the first ``generate`` of a new ``global_step``) the backend
    copies the training weights into a private model and adds Gaussian noise N(0, ``noise_std``²) to every
    floating-point parameter (redrawn at each sync from ``seed`` and the step, so it is the same on every rank
    and after a resume). It samples with transformers' ``generate`` at the trainer's temperature plus
    ``temperature_shift``, with the trainer's ``top_k``/``top_p``/``max_completion_length`` and other generation
    settings, and returns for each completion the log-prob of every sampled token under the distribution it
    was actually drawn from (the processed scores: after temperature, top-k and top-p, as vLLM's
    ``processed_logprobs``). TRL stores these as ``sampling_per_token_logps``.

    With ``noise_std=0`` and ``temperature_shift=0`` it samples from π itself, and the returned log-probs equal
    the trainer's own (up to top-k/top-p truncation, which is a real mismatch too). With LoRA the copy is the
    merged model (the noise goes on the merged weights). Costs a second copy of the model: a test and
    demonstration tool, single process or DDP (not DeepSpeed ZeRO-3 or FSDP, which shard the weights it copies).
    Text-only. The copy and the log-prob bookkeeping are shared with ``fp8`` (:mod:`._private_copy`).
    """

    name: ClassVar[str] = "perturbed_hf"
    reports_behaviour_logps: ClassVar[bool] = True
    precision: ClassVar[str] = "model+noise"

    class Params(ComponentParams):
        noise_std: float = Field(0.0, ge=0, description="Std of the Gaussian noise added to every weight.")
        temperature_shift: float = Field(0.0, description="Added to the trainer's sampling temperature.")
        seed: int = Field(0, description="Seed of the weight noise (combined with the trainer step).")

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.behaviour_model: Any = None
        self.version = 0  # the trainer step the behaviour weights were copied at; seeds the noise
        self._ctx: SetupContext | None = None

    @classmethod
    def example_params(cls) -> Params:
        return cls.Params(noise_std=0.02, temperature_shift=0.1)

    def engine_problems(self, sharding: str, *, lora: bool) -> list[tuple[str, str]]:
        if sharding in ("fsdp", "deepspeed_zero3"):
            return [("", f"rollout 'perturbed_hf' copies the whole model, so it does not support {sharding}, whose "
                         "weights are sharded; use it on one process or with DDP (recipes/accelerate/ddp.yaml)")]
        return []

    # ------------------------------------------------------------------------------------------------------
    def setup(self, ctx: SetupContext) -> None:
        for _, message in self.engine_problems(ctx.sharding, lora=False):
            raise OPDError(message)
        self._ctx = ctx
        self.sync_weights(ctx.model, ctx.step)

    def sync_weights(self, model: Any, version: int) -> None:
        """Copy ``model``'s weights into the behaviour model and perturb them with fresh noise (seeded by
        ``seed`` and ``version``, so it is the same on every rank and after a resume)."""
        self.version = int(version)
        if self.behaviour_model is None:
            self.behaviour_model = private_copy(model, "rollout 'perturbed_hf'")
        else:
            requantize_from_state(self.behaviour_model, effective_state(model))  # no FP8 layer here: a plain copy
        std = self.params.noise_std
        if std > 0:
            gen = torch.Generator().manual_seed(self.params.seed * 1_000_003 + self.version)
            with torch.no_grad():
                for p in self.behaviour_model.parameters():
                    if p.is_floating_point():
                        p.add_((torch.randn(p.shape, generator=gen) * std).to(p.device, p.dtype))

    # ------------------------------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> Rollouts:
        ctx = self._ctx
        if ctx is None:
            raise RuntimeError("perturbed_hf rollout used before setup()")
        check_text_only(sampling, self.name)
        if sampling.step != self.version:
            self.sync_weights(ctx.model, sampling.step)
        temperature = float(ctx.temperature) + self.params.temperature_shift
        if temperature <= 0:
            raise OPDError(f"rollout 'perturbed_hf': temperature {ctx.temperature} + temperature_shift "
                           f"{self.params.temperature_shift} is not positive")
        completion_ids, logprobs = generate_with_logprobs(self.behaviour_model, ctx, prompt_ids,
                                                          temperature=temperature, who=self.name)
        return Rollouts(completion_ids, logprobs, self.version)


__all__ = ["PerturbedHFGenerate"]
