"""A causal LM's output layer taken apart: its final hidden states and its linear head, so that logits are computed
a chunk of tokens at a time and a ``(B, T, V)`` tensor never exists. The student's fused lm head
(``fused_lm_head``), the divergence kernels and the local teachers (``hf_model``, ``self_context``) share it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from opd_plugins.errors import OPDError


@dataclass
class LMHead:
    """A linear output layer: ``logits = (hidden @ weight.T + bias) / temperature``."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    temperature: float = 1.0

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(n, V)`` float32 logits of a chunk of hidden states ``(n, H)``, divided by the temperature."""
        return chunk_logits(hidden.to(self.weight.device), self.weight, self.bias, self.temperature)


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 temperature: float) -> torch.Tensor:
    """Logits ``(n, V)`` of a chunk of hidden states divided by the temperature: the matmul in the inputs' dtype (as
    the model's lm head computes it), the rest in float32."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return logits / temperature if temperature != 1.0 else logits


@torch.no_grad()
def head_scores(hidden: torch.Tensor, head: LMHead, target_ids: torch.Tensor, chunk: int, *,
                top_k: int = 0) -> dict[str, torch.Tensor]:
    """From final hidden states ``(B, T, H)`` and their head, ``chunk`` positions at a time (nothing ``(B, T, V)``):
    ``token_logps`` of ``target_ids`` ``(B, T)``, ``entropy`` ``(B, T)`` and, with ``top_k``, ``topk_ids`` /
    ``topk_logps`` ``(B, T, k)`` and ``topk_mass``. Float32 (ids int64), on the hidden states' device."""
    B, T, H = hidden.shape
    flat, targets, n = hidden.reshape(-1, H), target_ids.reshape(-1), B * T
    out = {"token_logps": torch.empty(n), "entropy": torch.empty(n)}
    out = {k: v.to(hidden.device) for k, v in out.items()}
    if top_k:
        out["topk_ids"] = torch.empty(n, top_k, dtype=torch.long, device=hidden.device)
        out["topk_logps"] = torch.empty(n, top_k, device=hidden.device)
    for i in range(0, n, chunk):
        lp = torch.log_softmax(head.logits(flat[i:i + chunk]), -1).to(hidden.device)
        out["token_logps"][i:i + chunk] = lp.gather(-1, targets[i:i + chunk].unsqueeze(-1)).squeeze(-1)
        out["entropy"][i:i + chunk] = -(lp.exp() * lp).sum(-1)
        if top_k:
            vals, ids = lp.topk(top_k, dim=-1)
            out["topk_logps"][i:i + chunk], out["topk_ids"][i:i + chunk] = vals, ids
    shaped = {k: v.view(B, T, *v.shape[1:]) for k, v in out.items()}
    if top_k:
        shaped["topk_mass"] = shaped["topk_logps"].exp().sum(-1)
    return shaped


def whole(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """An FSDP2-sharded parameter (a DTensor) gathered whole, differentiably (its gradient is reduce-scattered back
    into the shards); any other tensor as it is."""
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor


def final_hidden_states(model: Any, unwrapped: Any, ids: torch.Tensor, attention_mask: torch.Tensor,
                         keep: int) -> tuple[torch.Tensor, torch.nn.Linear]:
    """For ``fused_lm_head``: the inputs of the model's output layer at its last ``keep`` positions
    ``(B, keep, H)`` (with gradient), and that layer.

    ``model`` runs as usual (through any DDP/PEFT wrapper), but a forward pre-hook on the output layer records its
    input and narrows it to the last position, so the model computes ``(B, 1, V)`` logits instead of
    ``(B, keep, V)``. Those logits are then checked against ``F.linear`` of the recorded states, which catches
    soft-capping or rescaling the config does not announce. Refused, with the reason: logit soft-capping or
    scaling, an output layer that is not a floating-point ``nn.Linear``, a PEFT adapter on it (LoRA on
    ``lm_head``, or ``lm_head`` in ``modules_to_save``), a sharded weight. Tied embeddings need nothing special:
    the weight's gradient accumulates into the shared parameter.
    """
    what = "fused_lm_head computes the student logits as hidden @ lm_head.weight.T (+ bias)"
    unset = "; set fused_lm_head: false"
    config = getattr(unwrapped, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "final_logit_softcapping", None):
        raise OPDError(f"{what}, but this model soft-caps its logits (final_logit_softcapping="
                       f"{config.final_logit_softcapping}){unset}")
    for key in ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            raise OPDError(f"{what}, but this model rescales its logits ({key}={getattr(config, key)}){unset}")
    head = unwrapped.get_output_embeddings() if hasattr(unwrapped, "get_output_embeddings") else None
    if hasattr(head, "base_layer") or hasattr(head, "original_module"):
        name = f"{type(head).__module__}.{type(head).__name__}"
        raise OPDError(f"{what}, but the lm head carries a PEFT adapter ({name}: LoRA on lm_head or lm_head in "
                       f"modules_to_save); leave lm_head out of the adapter{unset}")
    if not isinstance(head, torch.nn.Linear):
        raise OPDError(f"{what}, but the model's output layer is {type(head).__name__}, not a torch.nn.Linear{unset}")
    if not head.weight.is_floating_point():
        raise OPDError(f"{what}, but the lm head's weight is {head.weight.dtype} (quantized?){unset}")
    captured: list[torch.Tensor] = []

    def narrow(module: Any, args: tuple) -> tuple:
        captured.append(args[0])
        return (args[0][:, -1:], *args[1:])

    handle = head.register_forward_pre_hook(narrow)
    try:
        logits = model(input_ids=ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    finally:
        handle.remove()
    if len(captured) != 1 or captured[0].dim() != 3 or captured[0].shape[1] != keep:
        raise OPDError(f"{what}, but the model's forward called its output layer {len(captured)} times, not once on "
                       f"(B, {keep}, H) hidden states{unset}")
    hidden, weight = captured[0], head.weight
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise OPDError(f"{what}, but the lm head's weight is {tuple(weight.shape)} for hidden size "
                       f"{hidden.shape[-1]} (partitioned by DeepSpeed ZeRO-3? fused_lm_head supports DDP and "
                       f"FSDP2; under ZeRO-3 use the chunked divergence){unset}")
    with torch.no_grad():
        ref = torch.nn.functional.linear(hidden[:, -1:], whole(weight), whole(head.bias)).float()
        diff = float((logits[:, -1:].float() - ref).abs().max()) if logits.shape == ref.shape else float("inf")
        if not diff <= 1e-2 * float(ref.abs().max()) + 1e-4:
            raise OPDError(f"{what}, but this model's logits differ from that by up to {diff:.3g}: it post-processes "
                           f"them (soft-capping or scaling){unset}")
    return hidden, head


__all__ = ["LMHead", "chunk_logits", "final_hidden_states", "head_scores", "whole"]
