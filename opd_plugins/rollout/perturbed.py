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
        self._synced = False

    @classmethod
    def example_params(cls) -> Params:
        return cls.Params(noise_std=0.02, temperature_shift=0.1)

    # ------------------------------------------------------------------------------------------------------
    def setup(self, trainer: Any) -> None:
        if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
            raise OPDError("rollout 'perturbed_hf' copies the whole model, so it does not support DeepSpeed or FSDP, "
                           "because their weights are sharded; use it on one process or with DDP")
        self._sync(trainer)

    def _sync(self, trainer: Any) -> None:
        self.version = _step(trainer)
        self.sync_weights(_unwrap(trainer))
        self._synced = True

    def sync_weights(self, model: Any) -> None:
        """Copy ``model``'s weights into the behaviour model and perturb them with fresh noise."""
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
    def generate(self, trainer: Any, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        from trl.trainer.utils import pad

        if multimodal_fields or has_tool_images or any(i is not None for i in (images or [])):
            raise OPDError("rollout 'perturbed_hf' is text-only; use 'hf_generate' for vision-language models")
        if not self._synced or _step(trainer) != self.version:
            self._sync(trainer)
        tok = trainer.processing_class
        tok = getattr(tok, "tokenizer", tok)
        multiple = getattr(trainer, "pad_to_multiple_of", None)
        prompts = [torch.tensor(ids) for ids in prompt_ids]
        input_ids = pad(prompts, padding_value=tok.pad_token_id, padding_side="left", pad_to_multiple_of=multiple)
        attention_mask = pad([torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left",
                             pad_to_multiple_of=multiple)
        device = next(self.behaviour_model.parameters()).device
        config = self._generation_config(trainer, tok)
        with torch.no_grad():
            out = self.behaviour_model.generate(input_ids=input_ids.to(device),
                                                attention_mask=attention_mask.to(device), generation_config=config)
        completions = out.sequences[:, input_ids.shape[1]:]
        logps = torch.stack([torch.log_softmax(s.float(), dim=-1).gather(-1, completions[:, t:t + 1]).squeeze(-1)
                             for t, s in enumerate(out.scores)], dim=1) if out.scores else completions.float()
        # Keep everything up to and including the first EOS, as TRL's own generation path does.
        eos = torch.tensor(_eos_ids(trainer, tok), device=completions.device)
        is_eos = torch.isin(completions, eos)
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], completions.shape[1],
                                                                                  dtype=torch.long))
        keep = torch.arange(completions.shape[1], device=completions.device).unsqueeze(0) <= first.unsqueeze(1)
        completion_ids = [c[k].tolist() for c, k in zip(completions.cpu(), keep.cpu(), strict=True)]
        logprobs = [lp[k].tolist() for lp, k in zip(logps.cpu(), keep.cpu(), strict=True)]
        return completion_ids, logprobs

    def _generation_config(self, trainer: Any, tok: Any) -> Any:
        from transformers import GenerationConfig

        base = getattr(trainer, "generation_config", None)
        if base is not None:
            config = copy.deepcopy(base)
        else:
            args = trainer.args
            config = GenerationConfig(max_new_tokens=trainer.max_completion_length, do_sample=True,
                                      pad_token_id=tok.pad_token_id, eos_token_id=_eos_ids(trainer, tok),
                                      top_k=getattr(args, "top_k", None) or 0,
                                      top_p=getattr(args, "top_p", None) or 1.0)
        temperature = float(trainer.temperature) + self.params.temperature_shift
        if temperature <= 0:
            raise OPDError(f"rollout 'perturbed_hf': temperature {trainer.temperature} + temperature_shift "
                           f"{self.params.temperature_shift} is not positive")
        config.temperature = temperature
        config.do_sample = True
        config.output_scores = True
        config.return_dict_in_generate = True
        return config


def _unwrap(trainer: Any) -> Any:
    return trainer.accelerator.unwrap_model(trainer.model)


def _step(trainer: Any) -> int:
    state = getattr(trainer, "state", None)
    return getattr(state, "global_step", 0)


def _eos_ids(trainer: Any, tok: Any) -> list[int]:
    ids = getattr(trainer, "eos_token_ids", None)
    if ids is None:
        ids = [tok.eos_token_id]
    return list(ids) if isinstance(ids, (list, tuple)) else [ids]


__all__ = ["PerturbedHFGenerate"]
