"""``hf_generate``: sample with transformers' ``generate`` on the training weights (CPU or GPU)."""

from __future__ import annotations

from typing import Any, ClassVar

from opd_plugins.rollout.base import RolloutBackend


class HFGenerate(RolloutBackend):
    """Rollouts from ``model.generate`` on the live training weights, through TRL's own generation path.

    Works everywhere (no vLLM needed), so it is the default and the CPU backend. It reads the policy directly,
    so no weight sync is needed; sampling settings (``temperature``, ``top_p``, ``top_k``,
    ``max_completion_length``) come from the trainer arguments.
    """

    name: ClassVar[str] = "hf_generate"

    def generate(self, trainer: Any, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        from trl import GRPOTrainer

        return GRPOTrainer._generate_single_turn(
            trainer, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=has_tool_images
        )
