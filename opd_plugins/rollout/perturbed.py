"""``perturbed_hf``: sample from a deliberately perturbed copy of the policy and report its log-probs.

It exists to test and demonstrate mismatch correction (:mod:`opd_plugins.correction`) on any machine: the
behaviour policy μ differs from the training policy π by a known, tunable amount, and the backend returns
log μ of every sampled token, exactly as an FP8, asynchronous or served engine would. A real low-precision
backend declares its precision and behaves the same way; only the source of the mismatch differs.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from pydantic import Field

from opd_plugins.components import ComponentParams
from opd_plugins.context import Rollouts, Sampling, SetupContext
from opd_plugins.errors import OPDError
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
    the trainer's own (up to top-k/top-p truncation, which is a real mismatch too). Costs a second copy of the
    model and keeps the scores of every step (B × L × V floats): a test and demonstration tool for small
    models, single process or DDP (not DeepSpeed ZeRO-3 or FSDP, which shard the weights it copies).
    Text-only.
    """

    name: ClassVar[str] = "perturbed_hf"
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

    # ------------------------------------------------------------------------------------------------------
    def setup(self, ctx: SetupContext) -> None:
        if ctx.sharded:
            raise OPDError(f"rollout 'perturbed_hf' copies the whole model, so it does not support {ctx.sharding}, "
                           "whose weights are sharded; use it on one process or with DDP")
        self._ctx = ctx
        self.sync_weights(ctx.model, ctx.step)

    def sync_weights(self, model: Any, version: int) -> None:
        """Copy ``model``'s weights into the behaviour model and perturb them with fresh noise (seeded by
        ``seed`` and ``version``, so it is the same on every rank and after a resume)."""
        self.version = int(version)
        if self.behaviour_model is None:
            self.behaviour_model = copy.deepcopy(model)
            # Instance-level forward patches do not survive a deep copy: TRL's fused LM head (``add_fused_lm_head``)
            # closes over the *original* model's forward, so the copy would silently run the policy. Restore the
            # class forward everywhere.
            for module in self.behaviour_model.modules():
                if "forward" in vars(module):
                    del module.forward
            self.behaviour_model.eval()
            self.behaviour_model.requires_grad_(False)
            # The copy inherits the trainer's gradient checkpointing, under which transformers drops the KV cache
            # while generate still feeds one token per step: every token after the first would be scored
            # without its context. Generation needs the cache.
            if getattr(self.behaviour_model, "is_gradient_checkpointing", False):
                self.behaviour_model.gradient_checkpointing_disable()
            if getattr(self.behaviour_model, "config", None) is not None:
                self.behaviour_model.config.use_cache = True
        else:
            self.behaviour_model.load_state_dict(model.state_dict())
        std = self.params.noise_std
        if std > 0:
            gen = torch.Generator().manual_seed(self.params.seed * 1_000_003 + self.version)
            with torch.no_grad():
                for p in self.behaviour_model.parameters():
                    if p.is_floating_point():
                        p.add_((torch.randn(p.shape, generator=gen) * std).to(p.device, p.dtype))

    # ------------------------------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> Rollouts:
        from trl.trainer.utils import pad

        ctx = self._ctx
        if ctx is None:
            raise RuntimeError("perturbed_hf rollout used before setup()")
        if sampling.multimodal_fields or sampling.has_tool_images or any(i is not None for i in (sampling.images or [])):
            raise OPDError("rollout 'perturbed_hf' is text-only; use 'hf_generate' for vision-language models")
        if sampling.step != self.version:
            self.sync_weights(ctx.model, sampling.step)
        tok = ctx.tokenizer
        tok = getattr(tok, "tokenizer", tok)
        prompts = [torch.tensor(ids) for ids in prompt_ids]
        input_ids = pad(prompts, padding_value=tok.pad_token_id, padding_side="left",
                        pad_to_multiple_of=ctx.pad_to_multiple_of)
        attention_mask = pad([torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left",
                             pad_to_multiple_of=ctx.pad_to_multiple_of)
        device = next(self.behaviour_model.parameters()).device
        config = self._generation_config(ctx, tok)
        with torch.no_grad():
            out = self.behaviour_model.generate(input_ids=input_ids.to(device),
                                                attention_mask=attention_mask.to(device), generation_config=config)
        completions = out.sequences[:, input_ids.shape[1]:]
        logps = torch.stack([torch.log_softmax(s.float(), dim=-1).gather(-1, completions[:, t:t + 1]).squeeze(-1)
                             for t, s in enumerate(out.scores)], dim=1) if out.scores else completions.float()
        # Keep everything up to and including the first EOS, as TRL's own generation path does.
        eos = torch.tensor(_eos_ids(ctx, tok), device=completions.device)
        is_eos = torch.isin(completions, eos)
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], completions.shape[1],
                                                                                  dtype=torch.long))
        keep = torch.arange(completions.shape[1], device=completions.device).unsqueeze(0) <= first.unsqueeze(1)
        completion_ids = [c[k].tolist() for c, k in zip(completions.cpu(), keep.cpu(), strict=True)]
        logprobs = [lp[k].tolist() for lp, k in zip(logps.cpu(), keep.cpu(), strict=True)]
        return Rollouts(completion_ids, logprobs, self.version)

    def _generation_config(self, ctx: SetupContext, tok: Any) -> Any:
        from transformers import GenerationConfig

        if ctx.generation_config is not None:
            config = copy.deepcopy(ctx.generation_config)
        else:
            config = GenerationConfig(max_new_tokens=ctx.max_completion_length or 256, do_sample=True, top_k=0,
                                      top_p=1.0, pad_token_id=tok.pad_token_id, eos_token_id=_eos_ids(ctx, tok))
        temperature = float(ctx.temperature) + self.params.temperature_shift
        if temperature <= 0:
            raise OPDError(f"rollout 'perturbed_hf': temperature {ctx.temperature} + temperature_shift "
                           f"{self.params.temperature_shift} is not positive")
        config.temperature = temperature
        config.do_sample = True
        config.output_scores = True
        config.return_dict_in_generate = True
        return config


def _eos_ids(ctx: SetupContext, tok: Any) -> list[int]:
    ids = ctx.eos_token_ids if ctx.eos_token_ids is not None else [tok.eos_token_id]
    return list(ids) if isinstance(ids, (list, tuple)) else [ids]


__all__ = ["PerturbedHFGenerate"]
