"""What the phases of one training step hand each other inside ``OPDTrainer``.

TRL's ``_generate_and_score_completions`` drives a generation batch and calls back into the trainer's overrides
(``_generate``, ``_generate_single_turn``, ``_calculate_rewards``); TRL's ``_compute_loss`` drives a micro-batch
and calls ``_get_per_token_logps_and_entropies``. Those calls do not carry our data, so the phases share it here,
in one documented object instead of scattered private attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class StepState:
    """Per generation batch (reset when one starts):

    * ``rows``: this rank's dataset rows (``answer``, ``hint``, ...), in prompt order;
    * ``student_prompts``: the prompts the student generated from, after the sampler;
    * ``sampler_output``: the sampler's :class:`~opd_plugins.samplers.base.SamplerOutput` for them, ``guided`` its
      checked plan (:class:`~opd_plugins.trainers.guided.GuidedBatch`, None at evaluation), ``guided_consumed``
      once the rollout used it, and ``swap_behaviour``: the hinted generation's log-probs of each ``swap`` row;
    * ``rewards_per_func``: ``(N_global, n_funcs)`` task rewards of the whole generation batch;
    * ``global_rewards`` / ``local``: ``(N_global,)`` total rewards, and this rank's rows of them;
    * ``policy_versions``: the optimizer step each of this rank's completions was sampled at (from the rollout).
    * ``deferred``: per mode (``train`` / ``eval``), ``(generation id, rows, student prompts)`` of the generation
      batch whose micro-batches the teacher scores at loss time (``OPDConfig.teacher_scoring``); kept until that
      mode's next generation batch, so an evaluation in between does not disturb training's.

    Per micro-batch of the loss:

    * ``capture``: the next policy-gradient forward should keep its token log-probs for the divergence term;
    * ``captured_logps``: those ``(B, T)`` log-probs (with gradient), handed over once, with ``captured_entropy``
      (the exact ``(B, T)`` entropies TRL's forward computed, or None);
    * ``captured_outputs``: with ``fused_lm_head``, that forward's whole
      :class:`~opd_plugins.divergences.base.StudentOutputs` (final hidden states with gradient, lm head, token
      log-probs), so the divergence term reuses the forward instead of running its own.
    """

    rows: list[dict[str, Any]] | None = None
    student_prompts: list[Any] | None = None
    sampler_output: Any = None
    guided: Any = None
    guided_consumed: bool = False
    swap_behaviour: dict[int, list[float]] = field(default_factory=dict)
    rewards_per_func: torch.Tensor | None = None
    global_rewards: torch.Tensor | None = None
    local: slice | None = None
    policy_versions: list[int] | None = None
    generations: int = 0
    deferred: dict[str, tuple[int, list[Any], list[Any]]] = field(default_factory=dict)
    capture: bool = False
    captured_logps: torch.Tensor | None = None
    captured_entropy: torch.Tensor | None = None
    captured_outputs: Any = None

    def new_generation_batch(self, rows: list[dict[str, Any]]) -> None:
        """Forget the previous generation batch's data; keep this one's rows."""
        self.rows, self.student_prompts, self.sampler_output, self.guided = rows, None, None, None
        self.swap_behaviour = {}
        self.rewards_per_func = self.policy_versions = self.global_rewards = self.local = None

    def take_captured(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The captured ``(log-probs, entropies)``, forgotten once taken."""
        out = self.captured_logps, self.captured_entropy
        self.captured_logps = self.captured_entropy = None
        return out


__all__ = ["StepState"]
