"""The student's side of the loss: its token log-probs, full-vocabulary logits, or final hidden states and output
layer (``fused_lm_head``), from a batch of prompt + completion ids. Used by ``OPDTrainer.student_outputs``."""

from __future__ import annotations

from typing import Any

import torch

from opd_plugins.divergences._kernels import fused_token_logps
from opd_plugins.divergences.base import StudentOutputs
from opd_plugins.lm_head import LMHead, final_hidden_states, whole


def loss_mask(batch: dict[str, Any]) -> torch.Tensor:
    """``(B, T)`` float mask of the completion tokens every loss term sees (tool-call tokens excluded)."""
    mask = batch["completion_mask"].float()
    if "tool_mask" in batch:
        mask = mask * batch["tool_mask"].float()
    return mask


def truncated_rows(completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                   stop_ids: list[int | None]) -> torch.Tensor:
    """``(B,)`` bool: the completions cut at the length cap, TRL's rule: the last generated token (the last one the
    right-padded ``completion_mask`` covers) is neither an EOS nor the pad token. An empty completion is not cut."""
    lengths = completion_mask.long().sum(1)
    last = completion_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    stops = torch.tensor(sorted({i for i in stop_ids if i is not None}), device=completion_ids.device,
                         dtype=completion_ids.dtype)
    return (lengths > 0) & ~torch.isin(last, stops)


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
    if entropy:
        logps, ent = fused_token_logps(hidden, weight, completion_ids, temperature, chunk, bias, entropy=True)
    else:
        logps, ent = fused_token_logps(hidden, weight, completion_ids, temperature, chunk, bias), None
    return StudentOutputs(token_logps=logps, mask=mask, hidden=hidden, entropy=ent,
                          lm_head=LMHead(weight, bias, temperature))


__all__ = ["final_hidden_states", "full_vocab_outputs", "fused_outputs", "loss_mask", "whole"]  # the first and
# last re-exported from opd_plugins.lm_head, where they moved
