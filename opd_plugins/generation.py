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
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
                              "eos_token_id": tokenizer.eos_token_id}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(**enc, **kwargs)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


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


__all__ = ["generate_batch", "generate_text", "generation_mode"]
