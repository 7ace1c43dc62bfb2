"""The rollout-backend contract."""

from __future__ import annotations

from typing import Any, ClassVar

from opd_plugins.components import Component


class RolloutBackend(Component):
    """Base class of rollout backends: turn tokenized prompts into completions.

    :meth:`generate` receives one rank's prompt token ids (``num_generations`` copies of each prompt already
    in the list) and returns ``(completion_ids, logprobs)``: lists of token-id lists, and per-token behaviour
    log-probs (or None when the backend does not compute them). ``precision`` says what the backend samples
    with (``"model"`` = the training weights' own dtype).
    """

    kind: ClassVar[str] = "rollout"
    precision: ClassVar[str] = "model"

    def setup(self, trainer: Any) -> None:
        """Prepare the engine (called once, on every rank)."""

    def generate(self, trainer: Any, prompt_ids: list[list[int]], images: Any, multimodal_fields: Any,
                 num_generations: int, has_tool_images: bool = False) -> tuple[list[list[int]], list[list[float]] | None]:
        raise NotImplementedError

    def sync_weights(self, model: Any) -> None:
        """Push the trained weights to the engine (no-op for engines that read the model directly)."""
