"""Held-out accuracy without privileged context: the number a self-distillation run must move."""

from __future__ import annotations

import math
from typing import Any

import torch


@torch.no_grad()
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
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    scores: list[float] = []
    examples: list[dict[str, Any]] = []
    gen = torch.Generator(device="cpu").manual_seed(seed)
    try:
        with Progress(transient=True) as progress:
            bar = progress.add_task(desc, total=len(jobs))
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start:start + batch_size]
                texts = [
                    r["prompt"] if isinstance(r["prompt"], str)
                    else tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
                    for r, _ in chunk
                ]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
                                          "eos_token_id": tokenizer.eos_token_id}
                if temperature > 0:
                    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                    kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
                else:
                    kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
                out = model.generate(**enc, **kwargs)
                completions = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                for (row, _), text in zip(chunk, completions, strict=True):
                    s = float(task.score(text, str(row["answer"]), row.get("metadata")))
                    scores.append(s)
                    if len(examples) < 5:
                        q = row["prompt"][-1]["content"] if not isinstance(row["prompt"], str) else row["prompt"]
                        examples.append({"question": q, "answer": str(row["answer"]), "completion": text, "score": s})
                progress.advance(bar, len(chunk))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    n = len(scores)
    acc = sum(scores) / n if n else float("nan")
    stderr = math.sqrt(acc * (1 - acc) / n) if n else float("nan")
    return {"accuracy": acc, "n": n, "stderr": stderr, "temperature": temperature,
            "samples_per_prompt": samples_per_prompt, "max_new_tokens": max_new_tokens, "examples": examples}
