"""What a component may see of the run it is part of: :class:`SetupContext`, and the rollout contract's types.

Components never get the trainer. At setup each gets a :class:`SetupContext` — the student model, its tokenizer,
the device, the sampling temperature, the registry, a ``log`` function, the training progress — and that is exactly
the surface a third-party component can rely on. The trainer builds the context (``OPDTrainer.setup_context``); the
test kit builds one without a trainer (``opd_plugins.testing.fake_context``).

A rollout backend turns prompt token ids into completions: ``generate(prompt_ids, sampling) -> Rollouts``, with the
behaviour log-probs of every sampled token when it has them and the policy version its weights come from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Sharding = str
"""How the student's parameters are laid out across processes: ``none`` (one process), ``ddp`` (replicated),
``fsdp`` or ``deepspeed_zero3`` (each rank holds a shard)."""


def _no_log(name: str, value: float) -> None:
    """The default ``log`` of a context built without a trainer: metrics go nowhere."""


@dataclass
class SetupContext:
    """The narrow view of a run a component gets at ``setup(ctx)``.

    * ``model``: the student, unwrapped (no DDP/DeepSpeed wrapper), live weights; with LoRA, the PEFT model.
    * ``tokenizer``: the student's tokenizer (processing class); ``chat_template_kwargs`` as the trainer applies them.
    * ``device``: where the student's tensors live; ``temperature``: the sampling temperature (student log-probs
      are computed at it, and teachers default to it).
    * ``registry``: the run's component registry (the recipe's plugins included).
    * ``log(name, value)``: log a metric for the current step (averaged and written with the trainer's own).
    * ``progress()``: ``(global_step, max_steps)`` now.
    * ``on_optimizer_step(fn)``: call ``fn()`` after every optimizer step (e.g. to update an EMA).
    * ``sharding``: see :data:`Sharding`; ``process_index`` / ``num_processes``: this rank and the world size.
    * ``max_completion_length``, ``generation_config`` (TRL's ``GenerationConfig`` for rollouts, or None),
      ``eos_token_ids``, ``pad_to_multiple_of``: the trainer's sampling settings, for rollout backends.
    * ``trl_generate``: TRL's own generation path (transformers or vLLM, as the trainer arguments set it), a callable
      ``(prompt_ids, images, multimodal_fields, num_generations, has_tool_images) -> (completion_ids, logprobs)``;
      the ``hf_generate`` backend is a thin component over it. None outside a trainer.
    * ``shard_frozen(module)``: the module sharded the way the student is (FSDP2 ``fully_shard`` per decoder layer, or
      a DeepSpeed ZeRO-3 inference engine), for a frozen model a component keeps (an ``hf_model`` teacher); None
      when the student is not sharded.
    * ``peers``: the run's other components by slot (``rollout``, ``teacher``, ...), read-only, for components whose
      correctness depends on another (an offline teacher checks that the rollouts are replayed from its cache).
    """

    model: Any
    tokenizer: Any
    device: Any = "cpu"
    temperature: float = 1.0
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    registry: Any = None
    log: Callable[[str, float], None] = _no_log
    progress: Callable[[], tuple[int, int]] = lambda: (0, 0)
    on_optimizer_step: Callable[[Callable[[], None]], None] | None = None
    sharding: Sharding = "none"
    process_index: int = 0
    num_processes: int = 1
    max_completion_length: int | None = None
    generation_config: Any = None
    eos_token_ids: list[int] | None = None
    pad_to_multiple_of: int | None = None
    trl_generate: Callable[..., tuple[list[list[int]], list[list[float]] | None]] | None = None
    shard_frozen: Callable[[Any], Any] | None = None
    peers: Mapping[str, Any] = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        """True when each rank holds only a shard of the student's parameters (FSDP, ZeRO-3)."""
        return self.sharding in ("fsdp", "deepspeed_zero3")

    @property
    def step(self) -> int:
        return int(self.progress()[0])


@dataclass
class Sampling:
    """What a rollout backend is asked for: ``num_generations`` completions per prompt (the prompt ids already hold
    that many copies of each), at policy version ``step``. ``images`` / ``multimodal_fields`` / ``has_tool_images``
    are TRL's vision-language inputs (None for text)."""

    num_generations: int
    step: int = 0
    images: Any = None
    multimodal_fields: Any = None
    has_tool_images: bool = False


@dataclass
class Rollouts:
    """What a rollout backend returns: one completion (token ids) per prompt, in order; the behaviour log-probs of
    every sampled token under the distribution it was drawn from (None when the backend has none); and the policy
    version (optimizer step) of the weights each completion was sampled with — one int for all, or one per row."""

    completion_ids: list[list[int]]
    behaviour_logps: list[list[float]] | None = None
    policy_version: int | list[int] = 0

    def versions(self) -> list[int]:
        """One policy version per completion."""
        if isinstance(self.policy_version, int):
            return [self.policy_version] * len(self.completion_ids)
        return list(self.policy_version)


__all__ = ["Rollouts", "Sampling", "SetupContext", "Sharding"]
