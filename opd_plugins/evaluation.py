"""Held-out accuracy without privileged context: the number a self-distillation run must move."""

from __future__ import annotations

import math
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


def evaluate_accuracy(model: Any, tokenizer: Any, dataset: Any, task: Any, *, num_prompts: int = 100,
                      max_new_tokens: int = 96, temperature: float = 0.0, samples_per_prompt: int = 1,
                      batch_size: int = 32, seed: int = 0, desc: str = "evaluating") -> dict[str, Any]:
    """Generate answers to the first ``num_prompts`` rows (prompt only: no hint) and score them with ``task``.

    Greedy when ``temperature == 0``; otherwise sampled with ``torch.manual_seed(seed)`` so that "before" and
    "after" use the same seeds. Returns accuracy, n, its standard error, and a few examples.
    """
    from rich.progress import Progress

    rows = [dataset[i] for i in range(min(num_prompts, len(dataset)))]
    jobs = [(r, k) for r in rows for k in range(samples_per_prompt)]
    scores: list[float] = []
    examples: list[dict[str, Any]] = []
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with generation_mode(model, tokenizer), Progress(transient=True) as progress:
        bar = progress.add_task(desc, total=len(jobs))
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            if temperature > 0:
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            completions = generate_batch(model, tokenizer, [r["prompt"] for r, _ in chunk],
                                         max_new_tokens=max_new_tokens, temperature=temperature)
            for (row, _), text in zip(chunk, completions, strict=True):
                s = float(task.score(text, str(row["answer"]), row.get("metadata")))
                scores.append(s)
                if len(examples) < 5:
                    q = row["prompt"][-1]["content"] if not isinstance(row["prompt"], str) else row["prompt"]
                    examples.append({"question": q, "answer": str(row["answer"]), "completion": text, "score": s})
            progress.advance(bar, len(chunk))
    n = len(scores)
    acc = sum(scores) / n if n else float("nan")
    stderr = math.sqrt(acc * (1 - acc) / n) if n else float("nan")
    return {"accuracy": acc, "n": n, "stderr": stderr, "temperature": temperature,
            "samples_per_prompt": samples_per_prompt, "max_new_tokens": max_new_tokens, "examples": examples}
