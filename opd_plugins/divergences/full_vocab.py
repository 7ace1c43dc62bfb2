"""Full-vocabulary divergences on the shared kernels: the formula contract and the component base.

A full-vocabulary divergence is ``D(s, t)`` per position between the student's and the teacher's next-token
distributions. Its maths is a :class:`FullVocabFormula`:

* ``value(s_lp, t_lp)``: ``D`` from normalised log-probs ``(..., V) -> (...)``, in plain differentiable torch ops
  (required; the kernels' reference and their forward pass);
* ``probability_grad(s_lp, t_lp)``: ``∂D/∂s`` ``(..., V)`` in probability space, when it has a closed form (optional:
  the kernels project it onto the logits, ``s ⊙ (g − ⟨s, g⟩)``; without it the backward pass differentiates
  ``value`` with autograd, chunk by chunk, which costs a little more time and a ``(chunk, V)`` graph);
* ``sampled_reward(log_r, form)``: the per-token reward at the sampled token from ``log_r = log t(x) − log s(x)``
  (needed when the divergence is used as a reward, ``objective.divergence_reward`` or a teacher-guided estimator):
  ``score`` — its policy gradient is exactly −∇D in expectation — or ``estimate`` — an unbiased non-negative
  estimate of −D.

A component subclasses :class:`FullVocabDivergence` and returns its formula from :meth:`~FullVocabDivergence.formula`;
the chunked (``chunk_size``) and fused (``fused_lm_head``) kernels of :mod:`opd_plugins.divergences._kernels` then
serve it exactly as they serve the built-ins (docs/writing_plugins.md has a worked example).

The built-in formulas are f-divergences ``Σ_x s(x)·f(r(x))`` of the ratio ``r = t/s``, for which the sampled-token
rewards are ``score: −(f(r) − r·f'(r) + f'(1))`` and ``estimate: −(f(r) − f'(1)·(r − 1))``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from opd_plugins.components import ComponentParams
from opd_plugins.divergences._kernels import chunked_divergence, fused_divergence
from opd_plugins.divergences.base import Divergence, DivergenceTerms, StudentOutputs
from opd_plugins.teachers.base import Capability, TeacherScores

_INF = float("inf")


def safe_log(x: float) -> float:
    """``log x`` with ``log 0 = -inf`` (mixture weights at the ends of their range)."""
    return math.log(x) if x > 0 else float("-inf")


def zero_nan(x: torch.Tensor) -> torch.Tensor:
    """NaN → 0 in place, infinities kept: the NaNs here are 0·(±∞) terms whose limit is 0 (as in xlogy)."""
    return x.nan_to_num_(nan=0.0, posinf=_INF, neginf=-_INF)


def xdiff(p_logp: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``p · (a − b)`` with ``p = exp(p_logp)``, and 0 where p = 0 and a − b = ±∞."""
    return zero_nan(p_logp.exp() * (a - b))


class FullVocabFormula:
    """The maths of one full-vocabulary divergence (see the module docstring). Subclasses implement ``value`` and
    may implement ``probability_grad`` (or ``logit_grad`` directly) and ``sampled_reward``."""

    name: ClassVar[str] = "divergence"

    def value(self, s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def probability_grad(self, s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor | None:
        """``∂D/∂s`` ``(n, V)``, or None to let the kernels differentiate :meth:`value`."""
        return None

    def logit_grad(self, s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor | None:
        """``∂D/∂z`` for logits ``z`` with ``s = softmax(z)``: ``s ⊙ (g − Σ_v s_v g_v)`` from
        :meth:`probability_grad`; None when there is no closed form."""
        g = self.probability_grad(s_lp, t_lp)
        if g is None:
            return None
        s = s_lp.exp()
        sg = zero_nan(s * g)
        return sg - s * sg.sum(-1, keepdim=True)

    def sampled_reward(self, log_r: torch.Tensor, form: str = "score") -> torch.Tensor:
        raise NotImplementedError(f"divergence {self.name!r} has no sampled-token reward: implement sampled_reward() "
                                  "to use it as a reward (objective.divergence_reward, teacher-guided estimators)")


def check_fused_params(params: ComponentParams) -> None:
    """``fused_lm_head`` computes in chunks: refuse ``chunk_size: 0`` with it (a Params validator's body)."""
    if params.fused_lm_head and params.chunk_size == 0:
        raise ValueError("fused_lm_head computes the logits chunk by chunk, so chunk_size must be > 0; set "
                         "chunk_size (e.g. 256) or fused_lm_head: false")


def student_divergence(name: str, student: StudentOutputs, teacher: TeacherScores, formula: FullVocabFormula,
                       chunk_size: int) -> torch.Tensor:
    """Per-token divergence ``(B, T)`` (unmasked) of a full-vocabulary component, from the student's final hidden
    states and lm head when :class:`StudentOutputs` carries them (``fused_lm_head``), else from its logits."""
    factored = teacher.logps is None and teacher.hidden is not None and teacher.lm_head is not None
    if teacher.logps is None and not factored:
        raise ValueError(f"divergence {name!r} needs teacher full-vocabulary log-probs (requires() == 'full')")
    if student.hidden is not None and student.lm_head is not None:
        head = student.lm_head
        teacher_head = (teacher.hidden, teacher.lm_head) if factored else None
        return fused_divergence(student.hidden, head.weight, teacher.logps, formula, head.temperature, chunk_size,
                                bias=head.bias, teacher_head=teacher_head)
    if factored:
        raise ValueError(f"divergence {name!r} got the teacher's hidden states and lm head, which only the fused "
                         "lm head (fused_lm_head: true) takes")
    if student.logits is None:
        raise ValueError(f"divergence {name!r} needs student logits, or its final hidden states and lm head with "
                         "fused_lm_head (requires() == 'full')")
    return chunked_divergence(student.logits, teacher.logps, formula, chunk_size)


class FullVocabParams(ComponentParams):
    """Params every full-vocabulary divergence has."""

    chunk_size: int = Field(256, ge=0, description="Tokens per chunk of the full-vocabulary computation; 0 = all at "
                                                     "once (holds several (B, T, V) tensors).")
    reward: Literal["score", "estimate"] = Field(
        "score", description="Per-token reward at the sampled token: 'score' (its policy gradient is exactly −∇D in "
                             "expectation) or 'estimate' (an unbiased, non-negative estimate of −D).")
    fused_lm_head: bool = Field(
        False, description="Compute the student logits chunk by chunk from the final hidden states and the lm head "
                           "(the (B, T, V) logits and their gradient never exist), the policy-gradient term's "
                           "log-probs from the same forward, and a local teacher's log-probs chunk by chunk from "
                           "its hidden states and head; token weightings then get no student logits.")

    @model_validator(mode="after")
    def _fused_needs_chunks(self):
        check_fused_params(self)
        return self


class FullVocabDivergence(Divergence):
    """A divergence computed exactly over the vocabulary from student logits and teacher log-probs.

    Subclasses say which divergence through :meth:`formula`. The loss is the exact per-token divergence
    (differentiated directly, chunked over tokens); the value is the same, detached; the reward is the formula's
    sampled-token form chosen by ``reward``. With ``fused_lm_head`` the trainer passes the final hidden states and
    the lm head instead of the logits.
    """

    Params = FullVocabParams

    def formula(self) -> FullVocabFormula:
        raise NotImplementedError

    def requires(self) -> Capability:
        return "full"

    def uses_hidden_states(self) -> bool:
        return self.params.fused_lm_head

    def takes_teacher_head(self) -> bool:
        return self.params.fused_lm_head

    def per_token(self, student: StudentOutputs, teacher: TeacherScores) -> DivergenceTerms:
        mask = student.mask * teacher.mask
        value = student_divergence(self.name, student, teacher, self.formula(), self.params.chunk_size) * mask
        return DivergenceTerms(loss=value, value=value.detach())

    def reward_requires(self) -> str:
        return "sampled"  # the sampled tokens' log-probs only

    def reward(self, student: StudentOutputs, teacher: TeacherScores) -> torch.Tensor:
        mask = student.mask * teacher.mask
        log_r = (teacher.token_logps - student.token_logps).detach().float()
        log_r = torch.where(mask > 0, log_r, torch.zeros_like(log_r))  # padding may hold anything: reward 0 there
        return (self.formula().sampled_reward(log_r, self.params.reward) * mask).detach()


__all__ = ["FullVocabDivergence", "FullVocabFormula", "FullVocabParams", "check_fused_params", "safe_log",
           "student_divergence", "xdiff", "zero_nan"]
