"""The divergence-objective contract: a per-token loss, and the same quantity as a per-token reward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from opd_plugins.components import Component
from opd_plugins.lm_head import LMHead  # noqa: F401 - re-exported: StudentOutputs.lm_head's type
from opd_plugins.teachers.base import Capability, TeacherScores


@dataclass
class StudentOutputs:
    """The student's side, aligned with the completion tokens ``(B, T)``.

    ``token_logps`` carry gradient during the loss; ``logits`` ``(B, T, V)`` are present only when the
    divergence asks for the full vocabulary (``requires == "full"``), already divided by the temperature.
    When the divergence computes the logits itself (:meth:`Divergence.uses_hidden_states`, e.g.
    ``fused_lm_head: true``), ``logits`` is None and ``hidden`` ``(B, T, H)`` (the inputs of the output layer,
    with gradient) and ``lm_head`` are given instead.
    """

    token_logps: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    lm_head: LMHead | None = None
    entropy: torch.Tensor | None = None
    """``(B, T)`` exact entropy of the student's next-token distributions (detached), when the forward computed
    it (TRL's policy-gradient forward always does; the trainer asks for it when a token weighting needs it)."""
    old_token_logps: torch.Tensor | None = None
    """``(B, T)`` log π_old of the sampled tokens (the policy that sampled them), when the generation batch is
    reused for later optimizer steps or iterations (TRL's ``old_per_token_logps``); None on-policy."""

    def policy_ratio(self) -> torch.Tensor:
        """ρ_t = exp(log π_θ(x_t) − sg(log π_old(x_t))), with gradient: a sampled-token estimator's loss
        ``ρ_t · sg(estimate)`` has expected gradient ``E_{x~π_θ}[estimate · ∇log π_θ]`` although x_t came from
        π_old. On-policy (no ``old_token_logps``) ρ_t is 1 in value and ``∇log π_θ`` in gradient: the plain
        score-function surrogate."""
        old = self.old_token_logps if self.old_token_logps is not None else self.token_logps
        return torch.exp(self.token_logps - old.detach())


@dataclass
class DivergenceTerms:
    """``loss``: per-token differentiable surrogate whose gradient is the divergence's gradient.
    ``value``: per-token estimate of the divergence itself (detached), for logging and rewards."""

    loss: torch.Tensor
    value: torch.Tensor


class Divergence(Component):
    """Base class of divergence objectives D(student, teacher).

    :meth:`requires` says what the teacher must provide (``sampled`` < ``topk`` < ``full``); the trainer checks
    it against the teacher's capabilities before training. :meth:`per_token` returns the loss surrogate and the
    value; :meth:`reward` returns a per-token reward, which must depend on the sampled token for the policy
    gradient to be right. The default, ``-value``, is right for sampled-token estimators only: a divergence
    computed over the full vocabulary must override :meth:`reward` with a sampled-token estimate (the contract
    suite checks this).
    """

    kind: ClassVar[str] = "divergence"

    def engine_problems(self, sharding: str, *, lora: bool) -> list[tuple[str, str]]:
        if getattr(self.params, "fused_lm_head", False) and sharding == "deepspeed_zero3":
            return [("fused_lm_head", f"divergence {self.name!r}: fused_lm_head reads the lm head's weight outside "
                                      "its forward, which DeepSpeed ZeRO-3 partitions; set fused_lm_head: false "
                                      "(the chunked computation, chunk_size) or launch with FSDP2 "
                                      "(recipes/accelerate/fsdp2.yaml), where the head is gathered")]
        return []

    def requires(self) -> Capability:
        return "sampled"

    def reference(self) -> Any:
        """A teacher component whose sampled-token log-probs are the divergence's *reference* policy π_ref, or
        None. The trainer sets it up with the run's context, scores every batch with it too, and hands the result
        over as ``TeacherScores.ref_token_logps``."""
        return None

    def uses_hidden_states(self) -> bool:
        """True when :meth:`per_token` wants the student's final hidden states and lm head
        (``StudentOutputs.hidden``/``lm_head``) instead of its logits, to compute the logits chunk by chunk."""
        return False

    def takes_teacher_head(self) -> bool:
        """True when :meth:`per_token` accepts the teacher's full vocabulary in factored form too
        (``TeacherScores.hidden``/``lm_head`` instead of ``logps``): a local teacher then never forms its
        ``(B, T, V)`` log-probs for the loss (:attr:`~opd_plugins.teachers.base.TeacherBatch.head_chunk`)."""
        return False

    def per_token(self, student: StudentOutputs, teacher: TeacherScores) -> DivergenceTerms:
        raise NotImplementedError

    def reward_requires(self) -> Capability:
        """What :meth:`reward` reads: ``sampled`` when the sampled tokens' log-probs of both sides suffice (so the
        trainer computes the reward without ``(B, T, V)`` logits of the whole generation batch), else what
        :meth:`requires` says (the default: :meth:`reward` below calls :meth:`per_token`)."""
        return self.requires()

    def reward(self, student: StudentOutputs, teacher: TeacherScores) -> torch.Tensor:
        with torch.no_grad():
            return -self.per_token(student, teacher).value * student.mask
