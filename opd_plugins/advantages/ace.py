"""``ace``: asymmetric confidence-aware error penalty on top of a base estimator."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from opd_plugins.advantages import _common
from opd_plugins.advantages.base import AdvantageEstimator, AdvantageInputs, grouped
from opd_plugins.components import ComponentParams, ComponentSpec


class ACEAdvantage(AdvantageEstimator):
    """ACE: negative advantages grow with the policy's over-confidence, ``A_i ← A_i · (1 + α·m_i)`` if ``A_i < 0``.

    Errors are not all alike: an incorrect rollout the policy has grown *confident* in (a spuriously reinforced
    path) monopolises probability mass and should be pushed down harder than an exploratory one. ``A`` is the
    ``base`` estimator's advantage (default ``grpo``; ACE composes with GRPO and DAPO); only its negative entries
    — the completions that did worse than their baseline — are amplified, positive ones are untouched.

    The paper's confidence shift is ``c_i = log π_θ(y_i|x) − log π_ref(y_i|x)`` with ``m_i = softplus(c_i)``.
    The trainer gives an estimator the policy's sampled-token log-probs but not a reference model's, so the
    reference is replaced (let ``ℓ_i`` be the mean sampled-token log-prob of completion ``i``):

    * ``confidence: group_shift`` (default): ``m_i = softplus(ℓ_i − mean_{j ∈ group(i)} ℓ_j)`` — the paper's
      softplus of a log-ratio, with the prompt's other rollouts as the reference: how much more confident the
      policy is in this completion than in its siblings (per token, so length does not dominate).
    * ``confidence: token_prob``: ``m_i = exp(ℓ_i)``, the geometric-mean token probability in (0, 1].

    ``alpha`` is α (1.0 here; the paper's value was not verified). A token-level base advantage is scaled
    element-wise. NaN (unscored) rewards follow the base estimator (0 for ``grpo``, and 0 stays 0).
    Paper: Xu et al., "Overconfident Errors Need Stronger Correction: Asymmetric Confidence Penalties for
    Reinforcement Learning", https://arxiv.org/abs/2602.21420
    """

    name: ClassVar[str] = "ace"
    needs_logps: ClassVar[bool] = True
    nested_slots: ClassVar[dict[str, str]] = {"base": "advantage"}

    class Params(ComponentParams):
        base: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="grpo"),
                                    description="The estimator {name, params} whose negative advantages are amplified.")
        alpha: float = Field(1.0, ge=0, description="Strength α of the confidence penalty.")
        confidence: Literal["group_shift", "token_prob"] = Field(
            "group_shift", description="softplus of the log-prob shift against the group, or the mean token probability.")

    def __init__(self, params: Params | None = None, nested: dict[str, Any] | None = None) -> None:
        super().__init__(params, nested)
        self.base: AdvantageEstimator = self.nested["base"]
        _common.adopt_needs(self, self.base)

    def num_generations_problem(self, num_generations: int) -> str | None:
        """The nested estimator's objection to this group size, if any (e.g. ``median`` and even groups)."""
        return self.base.num_generations_problem(num_generations)

    def penalty(self, inputs: AdvantageInputs) -> torch.Tensor:
        """``m_i`` for this rank's rows ``(B,)``."""
        logps = _common.require(inputs.logps, "logps", self)
        ell = _common.row_mean(logps, inputs.mask)
        if self.params.confidence == "token_prob":
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
