"""What rollout backends that sample from something other than the live policy share (helpers, not components).

* :func:`private_copy` / :func:`effective_state`: a private generation copy of the policy, and the tensors that
  keep it in sync — the *effective* policy as a plain transformers model, LoRA adapters merged into their layers
  (``perturbed_hf`` adds noise to it, ``fp8`` quantizes it);
* :func:`generate_with_logprobs`: sample with transformers' ``generate`` at the trainer's settings and return, for
  each completion, the log-prob of every sampled token under the distribution it was drawn from (after temperature,
  top-k, top-p and min-p, as vLLM's ``processed_logprobs``), without keeping the ``(B, L, V)`` scores: a logits
  processor placed after the sampling warpers keeps one ``(B, V)`` step at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from opd_plugins.context import Sampling, SetupContext
from opd_plugins.errors import OPDError

_ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                  "original_module")


def is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


# ---------------------------------------------------------------------------------------------------------------
# The private copy and its weight sync
# ---------------------------------------------------------------------------------------------------------------


def private_copy(model: nn.Module, who: str) -> nn.Module:
    """A frozen eval-mode copy of ``model`` for generation: with LoRA, the merged plain model; instance-level forward
    patches removed; gradient checkpointing off; the KV cache on."""
    if is_peft(model):
        _check_mergeable(model, who)
        out = copy.deepcopy(model).merge_and_unload()
    else:
        out = copy.deepcopy(model)
    # Instance-level forward patches do not survive a deep copy: TRL's fused LM head (``add_fused_lm_head``) closes
    # over the *original* model's forward, so the copy would silently run the policy. Restore the class forward.
    for module in out.modules():
        if "forward" in vars(module):
            del module.forward
    out.eval()
    out.requires_grad_(False)
    # The copy inherits the trainer's gradient checkpointing, under which transformers drops the KV cache while
    # generate still feeds one token per step: every token after the first would be scored without its context.
    if getattr(out, "is_gradient_checkpointing", False):
        out.gradient_checkpointing_disable()
    if getattr(out, "config", None) is not None:
        out.config.use_cache = True
    return out


def _check_mergeable(model: Any, who: str) -> None:
    for name, module in model.named_modules():
        dora = getattr(module, "use_dora", None)
        if isinstance(dora, dict) and any(dora.values()):
            raise OPDError(f"{who}: layer {name} is a DoRA adapter, whose merge is not a plain weight delta; "
                           "use plain LoRA (use_dora: false) with this rollout backend")


def adapter_free_name(name: str) -> str | None:
    """A PEFT model's module or tensor name as it is in the merged model (``...q_proj.base_layer.weight`` →
    ``...q_proj.weight``, ``lm_head.modules_to_save.default.weight`` → ``lm_head.weight``), or None for adapter
    tensors (``lora_A`` ...) and the frozen originals of ``modules_to_save`` layers."""
    parts = name.split(".")
    if any(p in _ADAPTER_PARTS for p in parts):
        return None
    out, i = [], 0
    while i < len(parts):
        if parts[i] == "base_layer":
            i += 1
        elif parts[i] == "modules_to_save":
            i += 2  # the adapter's name follows
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


@torch.no_grad()
def effective_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors of the policy ``model`` computes, named as in :func:`private_copy` (every parameter, tied ones
    under each name, and every buffer). With LoRA, each adapted layer's weight is ``W + ΔW`` of its active
    adapters (PEFT's ``get_delta_weight``: scaling and ``fan_in_fan_out`` included), as ``merge_and_unload`` would
    make it; the live model is not touched."""
    if not is_peft(model):
        return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    base = model.get_base_model()
    out: dict[str, Tensor] = {}
    for name, t in [*base.named_parameters(remove_duplicate=False), *base.named_buffers()]:
        clean = adapter_free_name(name)
        if clean is not None:
            out[clean] = t
    for name, module in base.named_modules():
        if not (hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")):
            continue
        if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
            continue  # the base weight already is the effective one
        weight = module.base_layer.weight
        adapters = [a for a in module.active_adapters if a in getattr(module, "lora_A", {})
                    or a in getattr(module, "lora_embedding_A", {})]
        if adapters:
            delta = sum(module.get_delta_weight(a) for a in adapters)
            out[f"{adapter_free_name(name)}.weight"] = weight + delta.to(weight.dtype)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Generation with the sampled tokens' log-probs
# ---------------------------------------------------------------------------------------------------------------


def check_text_only(sampling: Sampling, who: str) -> None:
    if sampling.multimodal_fields or sampling.has_tool_images or any(i is not None for i in (sampling.images or [])):
        raise OPDError(f"rollout {who!r} is text-only; use 'hf_generate' for vision-language models")


class _SampledTokenLogprobs:
    """A logits processor, last in the list: keeps the log-softmax of the previous step's processed scores and, once
    the next call shows which token was drawn from them, that token's log-prob."""

    def __init__(self, prompt_len: int) -> None:
        self.prompt_len = prompt_len
        self.previous: Tensor | None = None
        self.logps: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.previous is not None and input_ids.shape[1] > self.prompt_len:
            self.logps.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, completions: Tensor) -> Tensor:
        """``(B, L)`` log-probs of ``completions`` (the generated tokens)."""
        n = completions.shape[1]
        if len(self.logps) < n and self.previous is not None:  # the last token: drawn after the last call
            self.logps.append(self.previous.gather(-1, completions[:, len(self.logps):len(self.logps) + 1]).squeeze(-1))
        if len(self.logps) < n:
            raise RuntimeError(f"recorded {len(self.logps)} sampled-token log-probs for {n} generated tokens")
        return torch.stack(self.logps[:n], dim=1) if n else completions.float()


_NEUTRAL = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None, "typical_p": 1.0, "top_h": None,
            "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


def _setting(config: Any, model: nn.Module, name: str) -> Any:
    """A sampling setting as ``generate`` resolves it: the config's, else the model's generation config's, else
    transformers' global default."""
    for source in (config, getattr(model, "generation_config", None)):
        value = getattr(source, name, None)
        if value is not None:
            return value
    defaults = getattr(type(config), "_get_default_generation_params", None)
    return (defaults() if defaults is not None else {}).get(name)


def _sampling_processors(config: Any, model: nn.Module, temperature: float, who: str) -> list[Any]:
    """The sampling warpers ``generate`` would add for ``config``, as explicit processors (so a recorder can follow
    them); ``config`` is then neutralised so that ``generate`` adds none of its own."""
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    for name in ("top_h", "typical_p", "epsilon_cutoff", "eta_cutoff"):
        value = _setting(config, model, name)
        if value is not None and value not in (0.0, 1.0):
            raise OPDError(f"rollout {who!r} reproduces temperature, top_k, top_p and min_p sampling only; the "
                           f"generation settings set {name}={value} (remove it from generation_kwargs)")
    top_k, top_p, min_p = (_setting(config, model, n) for n in ("top_k", "top_p", "min_p"))
    processors: list[Any] = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    if top_k:
        processors.append(TopKLogitsWarper(top_k=int(top_k), min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=float(top_p), min_tokens_to_keep=1))
    if min_p is not None:
        processors.append(MinPLogitsWarper(min_p=float(min_p), min_tokens_to_keep=1))
    for name, value in _NEUTRAL.items():
        setattr(config, name, value)
    if getattr(getattr(model, "generation_config", None), "min_p", None) is not None:
        config.min_p = 0.0  # else generate fills the model's own min_p in after the recorder (0.0 keeps every token)
    return processors


def generation_config(ctx: SetupContext, tok: Any) -> Any:
    """The trainer's rollout ``GenerationConfig`` (a copy), or sampling defaults outside a trainer."""
    from transformers import GenerationConfig

    if ctx.generation_config is not None:
        return copy.deepcopy(ctx.generation_config)
    return GenerationConfig(max_new_tokens=ctx.max_completion_length or 256, do_sample=True, top_k=0, top_p=1.0,
                            pad_token_id=tok.pad_token_id, eos_token_id=eos_ids(ctx, tok))


def eos_ids(ctx: SetupContext, tok: Any) -> list[int]:
    ids = ctx.eos_token_ids if ctx.eos_token_ids is not None else [tok.eos_token_id]
    return list(ids) if isinstance(ids, (list, tuple)) else [ids]


def _left_pad(rows: Sequence[Sequence[int]], pad: int, multiple: int | None) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    if multiple:
        width = -(-width // multiple) * multiple
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def generate_with_logprobs(model: nn.Module, ctx: SetupContext, prompt_ids: Sequence[Sequence[int]], *,
                           temperature: float, who: str, config: Any = None) -> tuple[list[list[int]], list[list[float]]]:
    """Sample one completion per prompt from ``model`` (left-padded, at ``temperature`` and the trainer's other
    sampling settings, or ``config``'s) and return ``(completion_ids, logprobs)``, each completion cut after its
    first EOS token as TRL's own generation path does. ``model`` runs in eval mode (no dropout; transformers'
    gradient checkpointing, which drops the KV cache, is off in eval) and is put back as it was."""
    from transformers.generation.logits_process import LogitsProcessorList

    if temperature <= 0:
        raise OPDError(f"rollout {who!r}: sampling temperature {temperature} is not positive")
    tok = getattr(ctx.tokenizer, "tokenizer", ctx.tokenizer)
    input_ids, attention_mask = _left_pad(prompt_ids, tok.pad_token_id, ctx.pad_to_multiple_of)
    config = copy.deepcopy(config) if config is not None else generation_config(ctx, tok)
    processors = _sampling_processors(config, model, temperature, who)
    recorder = _SampledTokenLogprobs(input_ids.shape[1])
    config.do_sample, config.output_scores, config.output_logits = True, False, False
    config.return_dict_in_generate, config.use_cache = True, True
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 generation_config=config, logits_processor=LogitsProcessorList([*processors, recorder]))
    finally:
        model.train(was_training)
    completions = out.sequences[:, input_ids.shape[1]:]
    logps = recorder.finish(completions)
    eos = torch.tensor(eos_ids(ctx, tok), device=completions.device)
    is_eos = torch.isin(completions, eos)
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1),
                        torch.full_like(is_eos[:, 0], completions.shape[1], dtype=torch.long))
    keep = torch.arange(completions.shape[1], device=completions.device).unsqueeze(0) <= first.unsqueeze(1)
    completion_ids = [c[k].tolist() for c, k in zip(completions.cpu(), keep.cpu(), strict=True)]
    logprobs = [lp[k].tolist() for lp, k in zip(logps.cpu(), keep.cpu(), strict=True)]
    return completion_ids, logprobs


__all__ = ["adapter_free_name", "check_text_only", "effective_state", "eos_ids", "generate_with_logprobs",
           "generation_config", "is_peft", "private_copy"]
