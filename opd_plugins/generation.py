"""Batched text generation from a local model: used by evaluation and by text teachers (peers, not layers)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def generation_mode(model: Any, tokenizer: Any) -> Iterator[None]:
    """Left padding, eval mode and no gradient for batched generation; the previous settings come back after."""
    padding_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)


def generate_batch(model: Any, tokenizer: Any, prompts: list[Any], *, max_new_tokens: int, temperature: float,
                   top_p: float = 1.0, top_k: int = 0) -> list[str]:
    """One batch of responses (inside :func:`generation_mode`; the caller seeds the sampler), decoded without
    special tokens. Conversational prompts go through the chat template with the generation prompt; plain strings
    are continued as they are (as TRL tokenizes them). ``temperature == 0`` is greedy."""
    texts = [q if isinstance(q, str) else tokenizer.apply_chat_template(q, add_generation_prompt=True, tokenize=False)
             for q in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    enc = enc.to(next(model.parameters()).device)
    if temperature == 0 and tokenizer.eos_token_id is not None and _greedy_can_drop_rows(model):
        tokens = greedy_dropping_finished(model, enc["input_ids"], enc["attention_mask"],
                                          max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        return tokenizer.batch_decode(tokens, skip_special_tokens=True)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
                              "eos_token_id": tokenizer.eos_token_id}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(**enc, **kwargs)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


# Generation settings that change greedy decoding (logits processors); with any of them set, ``model.generate`` decodes.
_GREEDY_NEUTRAL: dict[str, Any] = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
    "min_length": 0, "min_new_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None, "num_beams": 1,
    "exponential_decay_length_penalty": None, "guidance_scale": None, "watermarking_config": None,
}


def _greedy_can_drop_rows(model: Any) -> bool:
    """Whether :func:`greedy_dropping_finished` decodes exactly what ``model.generate`` would: a decoder-only
    model with a standard key/value cache and no generation setting that alters greedy decoding."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or not hasattr(model, "generation_config"):
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config or getattr(text, "sliding_window", None) or any(
            t != "full_attention" for t in (getattr(text, "layer_types", None) or ())):
        return False
    gc = model.generation_config
    return all(getattr(gc, k, v) in (v, None) for k, v in _GREEDY_NEUTRAL.items())


def greedy_dropping_finished(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                             max_new_tokens: int, eos_token_id: int, min_shared_prefix: int = 8) -> list[list[int]]:
    """Greedy decoding of a padded batch, computed only where it is needed; the same tokens as
    ``model.generate(do_sample=False)`` (up to floating-point rounding).

    * A row leaves the batch (and the key/value cache) as soon as it emits ``eos_token_id``, so the cost is the
      tokens actually generated instead of ``rows x`` the longest row.
    * The token prefix every row shares (a chat template's system prompt, a task's fixed wording: 35 of the
      quickstart's 50 prompt tokens) is run once, when it is at least ``min_shared_prefix`` tokens long, and its
      cache is repeated for every row; only the rest of each prompt is run per row.

    On CPU a forward pass costs in proportion to the tokens in it, so an evaluation of short answers to prompts
    with a long common prefix runs several times faster. Returns each row's new tokens, the EOS token included.
    """
    from transformers import DynamicCache

    rows = input_ids.shape[0]
    real = [ids[m.bool()] for ids, m in zip(input_ids, attention_mask, strict=True)]
    shared = _shared_prefix_length(real) if rows > 1 else 0
    if shared < min_shared_prefix:
        shared = 0
    cache = DynamicCache(config=model.config)
    kv = {_cache_keyword(model): cache}
    if shared:
        prefix = real[0][:shared][None]
        model(input_ids=prefix, position_ids=torch.arange(shared, device=prefix.device)[None],
              attention_mask=torch.ones_like(prefix), use_cache=True, logits_to_keep=1, **kv)
        cache.batch_repeat_interleave(rows)
    # Each row's remaining prompt, left-padded; the mask covers the shared prefix too.
    rest = [r[shared:] for r in real]
    width = max(len(r) for r in rest)
    step_ids = input_ids.new_zeros((rows, width))
    suffix_mask = attention_mask.new_zeros((rows, width))
    for i, r in enumerate(rest):
        step_ids[i, width - len(r):] = r
        suffix_mask[i, width - len(r):] = 1
    mask = torch.cat([attention_mask.new_ones((rows, shared)), suffix_mask], dim=1)
    position = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, shared:]
    out: list[list[int]] = [[] for _ in range(rows)]
    alive = torch.arange(rows)
    for t in range(max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=position, use_cache=True,
                       logits_to_keep=1, **kv).logits[:, -1, :]
        nxt = logits.argmax(-1)
        for row, tok in zip(alive.tolist(), nxt.tolist(), strict=True):
            out[row].append(tok)
        keep = nxt != eos_token_id
        if t == max_new_tokens - 1 or not bool(keep.any()):
            break
        if not bool(keep.all()):
            idx = keep.nonzero().squeeze(1)
            cache.batch_select_indices(idx)
            alive, mask, nxt = alive[idx.cpu()], mask[idx], nxt[idx]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        position = mask.long().sum(-1, keepdim=True) - 1
        step_ids = nxt[:, None]
    return out


def _cache_keyword(model: Any) -> str:
    """The forward argument that takes the key/value cache: ``cache`` in newer transformers 5 releases,
    ``past_key_values`` before (and still accepted, with a deprecation warning, in between)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _shared_prefix_length(rows: list[torch.Tensor]) -> int:
    """Length of the token prefix all ``rows`` share, leaving every row at least one token of its own (the
    position whose logits give its first new token)."""
    limit = min(len(r) for r in rows) - 1
    first = rows[0][:max(limit, 0)]
    shared = len(first)
    for r in rows[1:]:
        diff = (r[:shared] != first[:shared]).nonzero()
        if len(diff):
            shared = int(diff[0])
        if shared == 0:
            break
    return shared


def generate_text(model: Any, tokenizer: Any, prompts: list[Any], *, max_new_tokens: int, temperature: float,
                  top_p: float = 1.0, top_k: int = 0, batch_size: int = 16, seed: int | None = None) -> list[str]:
    """One stripped response per prompt, in batches of ``batch_size``. When sampling, each batch is seeded with
    ``torch.manual_seed(seed + first row)`` if ``seed`` is given."""
    out: list[str] = []
    with generation_mode(model, tokenizer):
        for start in range(0, len(prompts), batch_size):
            if temperature > 0 and seed is not None:
                torch.manual_seed(seed + start)
            out += [t.strip() for t in generate_batch(model, tokenizer, prompts[start:start + batch_size],
                                                      max_new_tokens=max_new_tokens, temperature=temperature,
                                                      top_p=top_p, top_k=top_k)]
    return out


__all__ = ["generate_batch", "generate_text", "generation_mode", "greedy_dropping_finished"]
