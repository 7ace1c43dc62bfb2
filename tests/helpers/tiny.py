"""Build tiny OPDTrainers in-process (no network, CPU, a second or two per step)."""

from __future__ import annotations

from datasets import Dataset

from opd_plugins.trainers import Components, OPDConfig, OPDTrainer

QUESTIONS = ["What is 3 + 4?", "What is 6 times 8?", "Which number is larger: 31 or 57?", "What is 12 + 30?"]
ANSWERS = ["7", "48", "57", "42"]


def prompt_dataset(n_repeat: int = 4) -> Dataset:
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": q}] for q in QUESTIONS] * n_repeat,
        "answer": ANSWERS * n_repeat,
        "hint": [f"(Hint: the correct answer is {a}.)" for a in ANSWERS] * n_repeat,
    })


def even_token_reward(completion_ids, **kwargs):
    """Fraction of even token ids: an easy, dense reward a tiny random model can learn."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def config(out, **overrides) -> OPDConfig:
    args = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, num_generations=4,
                max_completion_length=8, learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no",
                bf16=False, use_cpu=True, seed=0, disable_tqdm=True, temperature=1.0)
    args.update(overrides)
    return OPDConfig(**args)


def trainer(out, tokenizer, model, *, reward_funcs=(), components=None, dataset=None, **cfg) -> OPDTrainer:
    return OPDTrainer(model=model, args=config(out, **cfg), components=components or Components(),
                      reward_funcs=list(reward_funcs), train_dataset=dataset or prompt_dataset(),
                      processing_class=tokenizer)


def history(tr, key):
    return [h[key] for h in tr.state.log_history if key in h]
