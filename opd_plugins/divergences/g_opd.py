"""``g_opd``: Generalized On-Policy Distillation (G-OPD) and reward extrapolation (ExOPD), per-token."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from opd_plugins.components import ComponentParams, ComponentSpec
from opd_plugins.divergences.base import Divergence, DivergenceTerms, StudentOutputs
from opd_plugins.teachers.base import TeacherScores


class GOPD(Divergence):
    """G-OPD: OPD as dense KL-constrained RL with a reward scale λ and a reference model π_ref,

    ``J = E_{y~π_s}[ λ·log(π_T(y)/π_ref(y)) − KL(π_s ‖ π_ref) ]``, i.e. the per-token reward at the sampled token

    ``r_t = λ·(log π_T(x_t) − log π_ref(x_t)) − (log π_s(x_t) − log π_ref(x_t))
         = (log π_T(x_t) − log π_s(x_t)) + (λ − 1)·(log π_T(x_t) − log π_ref(x_t))``,

    whose optimum (per position) is ``π* ∝ π_ref·(π_T/π_ref)^λ``. λ = 1 is standard OPD for any π_ref (r_t is
    exactly ``reverse_kl``'s reward); λ > 1 is ExOPD (reward extrapolation: beyond the teacher); 0 < λ < 1
    interpolates towards π_ref; λ = 0 keeps the student at π_ref.

    ``reference`` is a teacher ``{name, params}`` that scores the student's sampled tokens as π_ref: ExOPD takes
    the student's own initial weights, ``{name: self_context, params: {weights: initial, template: "{prompt}"}}``
    (the initial weights on the unprivileged prompt); *reward correction* (strong-to-weak distillation) takes the
    teacher's base model before its RL, ``{name: hf_model, params: {model: ...}}``. The trainer scores every batch
    with it (``TeacherScores.ref_token_logps``). With λ ≠ 1 a reference is required; ``reference: null`` with
    ``uniform_reference: true`` drops the π_ref terms, ``r_t = λ·log π_T − log π_s``, whose optimum is
    ``π ∝ π_T^λ`` (a sharpened teacher, not the paper's target) — allowed only when asked for.

    Value: ``−r_t`` (the k1 estimate of KL(π_s ‖ π_T) at λ = 1; for λ ≠ 1 an objective, not a divergence: it is
    not zero where student equals teacher). Loss: the score-function surrogate ``ρ_t·sg(−r_t)`` (ρ_t =
    π_s/π_old for tokens an older policy sampled, 1 on-policy), whose expected gradient is exactly −∇J per
    position. Reward: ``r_t``. Needs only sampled-token log-probs. Temperature: all log-probs are at their models'
    sampling/scoring temperatures; nothing is rescaled here.

    Paper: Yang et al., "Learning beyond Teacher: Generalized On-Policy Distillation with Reward Extrapolation",
    https://arxiv.org/abs/2602.12125.
    """

    name: ClassVar[str] = "g_opd"
    nested_slots: ClassVar[dict[str, str]] = {"reference": "teacher"}

    class Params(ComponentParams):
        reward_scale: float = Field(1.0, ge=0.0, description="λ, the weight of the teacher reward against the KL to "
                                                              "the reference: 1 = standard OPD, > 1 = ExOPD.")
        reference: ComponentSpec | None = Field(
            None, description="The reference policy π_ref as a teacher {name, params} scoring the sampled tokens "
                              "(ExOPD: self_context with weights: initial and template '{prompt}').")
        uniform_reference: bool = Field(
            False, description="With λ ≠ 1 and no reference: drop the π_ref terms (optimum π ∝ π_T^λ).")

        @model_validator(mode="after")
        def _reference_for_lambda(self) -> "GOPD.Params":
            if self.reward_scale != 1.0 and self.reference is None and not self.uniform_reference:
                raise ValueError(
                    f"reward_scale={self.reward_scale} (λ ≠ 1) needs a reference policy π_ref: the target is "
                    "π_ref·(π_T/π_ref)^λ. Set reference (ExOPD: {name: self_context, params: {weights: initial, "
                    "template: '{prompt}'}}), or uniform_reference: true to target π ∝ π_T^λ instead")
            if self.reference is not None and self.uniform_reference:
                raise ValueError("uniform_reference: true contradicts a reference; remove one of them")
            return self

    def reference(self) -> Any:
        return self.nested.get("reference")

    def token_reward(self, student: StudentOutputs, teacher: TeacherScores) -> torch.Tensor:
        """``r_t`` (masked, detached)."""
        mask = student.mask * teacher.mask
        t_lp, s_lp = teacher.token_logps.detach(), student.token_logps.detach()
        ref = teacher.ref_token_logps
        if ref is None and self.reference() is not None:
            raise ValueError("divergence 'g_opd' has a reference, but the teacher scores carry no ref_token_logps "
                             "(the trainer fills them from the reference teacher)")
        implicit = t_lp if ref is None else t_lp - ref.detach()
        return (((t_lp - s_lp) + (self.params.reward_scale - 1.0) * implicit) * mask).detach()

    def per_token(self, student: StudentOutputs, teacher: TeacherScores) -> DivergenceTerms:
        mask = student.mask * teacher.mask
        value = -self.token_reward(student, teacher)
        return DivergenceTerms(loss=student.policy_ratio() * value * mask, value=value)

    def reward_requires(self) -> str:
        return "sampled"  # the sampled tokens' log-probs only

    def reward(self, student: StudentOutputs, teacher: TeacherScores) -> torch.Tensor:
        return self.token_reward(student, teacher)
