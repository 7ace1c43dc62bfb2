"""``ace``: asymmetric confidence-aware error penalty on top of a base estimator."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from opd_plugins.advantages import _common
from opd_plugins.advantages.base import AdvantageEstimator, AdvantageInputs, grouped
from opd_plugins.components import ComponentParams, ComponentSpec


class ACEAdvantage(AdvantageEstimator):
    """ACE: negative advantages grow with the policy's over-confidence, ``A_i ← A_i · (1 + α·m_i)`` if ``A_i < 0``.

    Errors are not all alike: an incorrect rollout the policy has grown *confident* in (a spuriously reinforced
    path) monopolises probability mass and should be pushed down harder than an exploratory one. ``A`` is the
    ``base`` estimator's advantage (default ``grpo``; ACE composes with GRPO and DAPO); only its negative entries
    — the completions that did worse than their baseline — are amplified, positive ones are untouched.

    The paper's confidence shift is ``c_i = log π_θ(y_i|x) − log π_ref(y_i|x)`` (the sequence log-ratio against a
    reference policy) with ``m_i = softplus(c_i)``: with ``reference`` set — a teacher ``{name, params}`` scoring the
    sampled tokens as π_ref, typically the initial weights, ``{name: self_context, params: {weights: initial,
    template: "{prompt}"}}`` — that is what ``confidence: reference`` (the default when there is a reference)
    computes. Without a reference the shift is approximated (let ``ℓ_i`` be the mean sampled-token log-prob of
    completion ``i``), a simplification that measures confidence relative to the siblings, not drift from π_ref:

    * ``confidence: group_shift`` (default without a reference): ``m_i = softplus(ℓ_i − mean_{j ∈ group(i)} ℓ_j)``
      — how much more confident the policy is in this completion than in its siblings (per token).
    * ``confidence: token_prob``: ``m_i = exp(ℓ_i)``, the geometric-mean token probability in (0, 1].

    ``alpha`` is α (1.0 here; the paper's value was not verified). A token-level base advantage is scaled
    element-wise. NaN (unscored) rewards follow the base estimator (0 for ``grpo``, and 0 stays 0).
    Paper: Xu et al., "Overconfident Errors Need Stronger Correction: Asymmetric Confidence Penalties for
    Reinforcement Learning", https://arxiv.org/abs/2602.21420
    """

    name: ClassVar[str] = "ace"
    needs_logps: ClassVar[bool] = True
    nested_slots: ClassVar[dict[str, str]] = {"base": "advantage", "reference": "teacher"}

    class Params(ComponentParams):
        base: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="grpo"),
                                    description="The estimator {name, params} whose negative advantages are amplified.")
        alpha: float = Field(1.0, ge=0, description="Strength α of the confidence penalty.")
        reference: ComponentSpec | None = Field(
            None, description="The reference policy π_ref, a teacher {name, params} scoring the sampled tokens "
                              "(e.g. self_context with weights: initial and template '{prompt}').")
        confidence: Literal["auto", "reference", "group_shift", "token_prob"] = Field(
            "auto", description="reference: softplus(log π_θ(y) − log π_ref(y)) (the paper's; needs reference); "
                                "group_shift / token_prob: proxies without one; auto: reference when set, else "
                                "group_shift.")

        @model_validator(mode="after")
        def _reference_for_confidence(self) -> "ACEAdvantage.Params":
            if self.confidence == "reference" and self.reference is None:
                raise ValueError("confidence: reference needs reference (a teacher scoring π_ref, e.g. {name: "
                                 "self_context, params: {weights: initial, template: '{prompt}'}})")
            return self

    def __init__(self, params: Params | None = None, nested: dict[str, Any] | None = None) -> None:
        super().__init__(params, nested)
        self.base: AdvantageEstimator = self.nested["base"]
        _common.adopt_needs(self, self.base)

    def num_generations_problem(self, num_generations: int) -> str | None:
        """The nested estimator's objection to this group size, if any (e.g. ``median`` and even groups)."""
        return self.base.num_generations_problem(num_generations)

    @property
    def confidence(self) -> str:
        c = self.params.confidence
        return ("reference" if self.params.reference is not None else "group_shift") if c == "auto" else c

    def reference(self):
        return self.nested.get("reference") or super().reference()

    def penalty(self, inputs: AdvantageInputs) -> torch.Tensor:
        """``m_i`` for this rank's rows ``(B,)``."""
        logps = _common.require(inputs.logps, "logps", self)
        if self.confidence == "reference":
            ref = _common.require(inputs.ref_logps, "ref_logps", self)
            mask = torch.ones_like(logps) if inputs.mask is None else inputs.mask.to(logps)
            return F.softplus(((logps.float() - ref.float()) * mask).sum(1))
        ell = _common.row_mean(logps, inputs.mask)
        if self.confidence == "token_prob":
            return ell.exp()
        everyone = grouped(_common.gather_rows(ell, inputs), inputs.num_generations)
        reference = torch.nanmean(everyone, dim=1, keepdim=True).expand_as(everyone).reshape(-1)
        return F.softplus(ell - reference[inputs.local_slice].to(ell))

    def compute(self, inputs: AdvantageInputs) -> torch.Tensor:
        adv = self.base.compute(inputs).float()
        factor = 1 + self.params.alpha * self.penalty(inputs).to(adv)
        if adv.dim() == 2:
            factor = factor.unsqueeze(1)
        return torch.where(adv < 0, adv * factor, adv)
