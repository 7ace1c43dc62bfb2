"""The rollout-backend contract: ``generate(prompt_ids, sampling) -> Rollouts``."""

from __future__ import annotations

from typing import Any, ClassVar

from opd_plugins.components import Component
from opd_plugins.context import Rollouts, Sampling, SetupContext


class RolloutBackend(Component):
    """Base class of rollout backends: turn tokenized prompts into completions.

    :meth:`generate` receives one rank's prompt token ids (``sampling.num_generations`` copies of each prompt
    already in the list) and returns :class:`~opd_plugins.context.Rollouts`: one completion per prompt, the
    behaviour log-probs of the sampled tokens (or None when the backend does not compute them) and the policy version
    of the weights that sampled them. ``precision`` says what the backend samples with (``"model"`` = the training
    weights' own dtype). The trainer calls :meth:`setup` once and :meth:`sync_weights` whenever the policy has changed
    since the last rollout (before the next :meth:`generate`).
    """

    kind: ClassVar[str] = "rollout"
    precision: ClassVar[str] = "model"
    samples_policy: ClassVar[bool] = False
    """True when the backend samples the training policy itself (the same weights and numerics), so the trainer may
    recompute behaviour log-probs with its own forward when the backend reports none (a ``swap`` sampler needs
    them)."""
    reports_behaviour_logps: ClassVar[bool] = False
    """True when :meth:`generate` always returns behaviour log-probs."""
    generates_ahead: ClassVar[bool] = False
    """True when the backend wants to know the next generation batches (:meth:`prefetch`) to generate them early."""

    def setup(self, ctx: SetupContext) -> None:
        """Prepare the engine (called once, on every rank)."""

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> Rollouts:
        raise NotImplementedError

    def trainer_args(self) -> dict[str, Any]:
        """Trainer arguments this backend sets (e.g. TRL's ``use_vllm`` / ``vllm_mode`` for a vLLM backend):
        applied when the trainer's config is built, before any model loads. A recipe whose ``trainer.args`` set one
        of them to another value is refused. Default: none."""
        return {}

    def prefetch(self, batches: list[tuple[list[list[int]], Sampling]]) -> None:
        """The generation batches that come after the current one (prompt ids and sampling each), in order; called
        by the trainer after each generation when :attr:`generates_ahead` is set. Default: nothing."""

    def sync_weights(self, model: Any, version: int) -> None:
        """The policy changed (optimizer step ``version``): push ``model``'s weights to the engine. A no-op for
        engines that read the training model directly."""


__all__ = ["RolloutBackend", "Rollouts", "Sampling"]
