"""The student's side of the loss: its token log-probs, full-vocabulary logits, or final hidden states and output
layer (``fused_lm_head``), from a batch of prompt + completion ids. Used by ``OPDTrainer.student_outputs``."""

from __future__ import annotations

from typing import Any

import torch

from opd_plugins.divergences._kernels import fused_entropy, fused_token_logps
from opd_plugins.divergences.base import LMHead, StudentOutputs
from opd_plugins.errors import OPDError


def loss_mask(batch: dict[str, Any]) -> torch.Tensor:
    """``(B, T)`` float mask of the completion tokens every loss term sees (tool-call tokens excluded)."""
    mask = batch["completion_mask"].float()
    if "tool_mask" in batch:
        mask = mask * batch["tool_mask"].float()
    return mask


def full_vocab_outputs(model: Any, ids: torch.Tensor, attention_mask: torch.Tensor, completion_ids: torch.Tensor,
                       mask: torch.Tensor, temperature: float) -> StudentOutputs:
    """Logits ``(B, T, V)`` of the completion positions divided by ``temperature``, and the token log-probs."""
    T = completion_ids.shape[1]
    # the last token is no input of a needed prediction: without it the T kept positions are the whole (contiguous)
    # output, which nothing has to copy
    logits = model(input_ids=ids[:, :-1], attention_mask=attention_mask[:, :-1], logits_to_keep=T).logits
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    # log π(x_t) = z_t − logsumexp(z): no (B, T, V) log-softmax tensor besides the logits themselves
    logps = logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    return StudentOutputs(token_logps=logps, mask=mask, logits=logits)


def fused_outputs(model: Any, unwrapped: Any, ids: torch.Tensor, attention_mask: torch.Tensor,
                  completion_ids: torch.Tensor, mask: torch.Tensor, temperature: float, chunk: int, *,
                  entropy: bool = False) -> StudentOutputs:
    """Final hidden states ``(B, T, H)`` and the output layer instead of logits; the token log-probs (and, with
    ``entropy``, the exact entropies) computed chunk by chunk from them (no ``(B, T, V)`` tensor)."""
    T = completion_ids.shape[1]
    hidden, head = final_hidden_states(model, unwrapped, ids, attention_mask, T + 1)
    hidden = hidden[:, :-1]
    weight, bias = whole(head.weight), whole(head.bias)
    logps = fused_token_logps(hidden, weight, completion_ids, temperature, chunk, bias)
    ent = fused_entropy(hidden.detach(), weight, temperature, chunk, bias) if entropy else None
    return StudentOutputs(token_logps=logps, mask=mask, hidden=hidden, entropy=ent,
                          lm_head=LMHead(weight, bias, temperature))


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


__all__ = ["final_hidden_states", "full_vocab_outputs", "fused_outputs", "loss_mask"]
