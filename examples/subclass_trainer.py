"""Subclassing OPDTrainer from your own code, with components resolved by name.

Run it (tiny random model, CPU, a few seconds):

    python examples/subclass_trainer.py /tmp/subclass-demo

The subclass overrides one method, ``compute_advantages``, to add a length bonus to the advantages, and logs
one extra metric. Everything else (rollout, teacher, divergence, checkpoints, hooks) is inherited.
"""

from __future__ import annotations

import sys

from datasets import Dataset

from opd_plugins.testing import build_tiny_model, build_tokenizer
from opd_plugins.trainers import Components, OPDConfig, OPDTrainer


class LengthBonusTrainer(OPDTrainer):
    """OPDTrainer whose advantages also reward shorter completions."""

    def __init__(self, *args, length_bonus: float = 0.1, **kwargs):
        self.length_bonus = length_bonus
        super().__init__(*args, **kwargs)

    def compute_advantages(self, out, rows, scores, mask):
        advantages = super().compute_advantages(out, rows, scores, mask)
        lengths = out["completion_mask"].sum(1).float()
        bonus = -self.length_bonus * (lengths - lengths.mean()) / lengths.clamp(min=1).max()
        self._log("custom/length_bonus", float(bonus.abs().mean()))
        return advantages + (bonus.unsqueeze(1) if advantages.dim() == 2 else bonus)


def correct_reward(completions, answer, **kwargs):
    """1.0 when the answer appears in the completion."""
    return [float(a in c[0]["content"]) for c, a in zip(completions, answer, strict=True)]


def main(output_dir: str) -> LengthBonusTrainer:
    tokenizer = build_tokenizer()
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(8)],
        "answer": [str(2 * i) for i in range(8)],
        "hint": [f"(Hint: the correct answer is {2 * i}.)" for i in range(8)],
    })
    components = Components.build(teacher="self_context", divergence="reverse_kl", advantage=("grpo", {"scale": "none"}),
                                  pg_weight=1.0, div_weight=0.5)
    args = OPDConfig(output_dir=output_dir, max_steps=2, per_device_train_batch_size=4, num_generations=4,
                     max_completion_length=8, use_cpu=True, bf16=False, save_strategy="no")
    trainer = LengthBonusTrainer(model=build_tiny_model(tokenizer), args=args, components=components,
                                 reward_funcs=[correct_reward], train_dataset=dataset, processing_class=tokenizer,
                                 length_bonus=0.2)
    trainer.train()
    return trainer


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/subclass-demo")
