"""Held-out accuracy without privileged context: the number a self-distillation run must move."""

from __future__ import annotations

import math
from typing import Any

import torch

from opd_plugins.generation import generate_batch, generate_text, generation_mode  # noqa: F401 (re-exported)


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
