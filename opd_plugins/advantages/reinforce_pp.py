"""``reinforce_pp``: REINFORCE++ — token-level returns (with an optional KL-to-reference reward) whitened over the
global batch."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from opd_plugins.advantages import _common
from opd_plugins.advantages.base import AdvantageEstimator, AdvantageInputs, grouped
from opd_plugins.advantages.grpo import _nanstd
from opd_plugins.components import ComponentParams, ComponentSpec


class ReinforcePPAdvantage(AdvantageEstimator):
    """REINFORCE++: per-token returns whitened over the batch's tokens.

    The per-token reward is ``r_t = −β·(log π_θ(y_t) − log π_ref(y_t))`` plus the outcome reward ``x`` at the last
    completion token, the return is ``G_t = Σ_{k≥t} r_k`` (γ = 1) and the advantage is
    ``A_t = (G_t − mean(G)) / sqrt(var(G) + eps)`` over every valid token of the *global* batch (every rank gets the
    same normalisation; Bessel-corrected, as verl's ``masked_whiten``). β is ``kl_coef``; with it the KL penalty is
    in the reward, as in the paper, not in the loss (leave ``trainer.args.beta`` at 0 then), and ``reference`` is the
    teacher ``{name, params}`` that scores π_ref (the initial weights:
    ``{name: self_context, params: {weights: initial, template: "{prompt}"}}``). With β = 0 every token of a
    completion has return ``x``, and token whitening weighs long completions more than short ones.

    ``baseline: group`` (verl's ``reinforce_plus_plus_baseline``, for reasoning tasks) first subtracts each prompt's
    group mean from ``x``. ``whiten: sequence`` is the earlier per-sequence form, ``(x − mean_batch x) / std``
    broadcast over the completion (equal to the token form only at β = 0 with equal lengths). NaN (unscored)
    rewards get outcome 0 and are left out of the statistics; rows with no token get advantage 0.
    Paper: Hu, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models",
    https://arxiv.org/abs/2501.03262
    """

    name: ClassVar[str] = "reinforce_pp"
    nested_slots: ClassVar[dict[str, str]] = {"reference": "teacher"}

    class Params(ComponentParams):
        baseline: Literal["none", "group"] = Field(
            "none", description="Subtract nothing, or each prompt's group mean, from the outcome reward.")
        whiten: Literal["token", "sequence"] = Field(
            "token", description="Whiten token-level returns (the paper) or per-sequence rewards.")
        kl_coef: float = Field(0.0, ge=0, description="β of the per-token KL-to-reference reward (needs reference).")
        reference: ComponentSpec | None = Field(
            None, description="The reference policy π_ref, a teacher {name, params} (needed when kl_coef > 0).")
        eps: float = Field(1e-8, ge=0, description="Added to the variance.")

        @model_validator(mode="after")
        def _kl_needs_reference(self) -> "ReinforcePPAdvantage.Params":
            if self.kl_coef > 0 and self.reference is None:
                raise ValueError("kl_coef > 0 puts −β·log(π_θ/π_ref) in the reward, so it needs reference (e.g. "
                                 "{name: self_context, params: {weights: initial, template: '{prompt}'}})")
            if self.kl_coef > 0 and self.whiten == "sequence":
                raise ValueError("kl_coef is a per-token reward, which whiten: sequence cannot carry; use whiten: "
                                 "token")
            return self

    def __init__(self, params: Params | None = None, nested: dict[str, Any] | None = None) -> None:
        super().__init__(params, nested)
        if self.params.baseline == "group":
            self.min_generations = 2
        if self.params.kl_coef > 0:
            self.needs_logps = True

    def reference(self):
        return self.nested.get("reference")

    def _outcome(self, inputs: AdvantageInputs) -> torch.Tensor:
        x = inputs.rewards.float()
        if self.params.baseline == "group":
            g = grouped(x, inputs.num_generations)
            x = (g - torch.nanmean(g, dim=1, keepdim=True)).reshape(-1)
        return x

    def compute(self, inputs: AdvantageInputs) -> torch.Tensor:
        x = self._outcome(inputs)
        if self.params.whiten == "sequence":
            var = _nanstd(x, dim=0) ** 2
            adv = (x - torch.nanmean(x)) / torch.sqrt(var + self.params.eps)  # 0/0 (all equal, eps 0) → NaN → 0
            return torch.nan_to_num(adv, nan=0.0)[inputs.local_slice]
        local = torch.nan_to_num(x[inputs.local_slice], nan=0.0)
        if inputs.mask is None:
            raise ValueError("advantage 'reinforce_pp' with whiten: token needs the completion mask")
        mask = inputs.mask.float()
        B, T = mask.shape
        last = (mask * torch.arange(1, T + 1, device=mask.device)).argmax(1)  # index of each row's last token
        reward = torch.zeros(B, T, device=mask.device)
        reward[torch.arange(B), last] = local.to(mask.device) * (mask.sum(1) > 0)
        if self.params.kl_coef > 0:
            logps = _common.require(inputs.logps, "logps", self).float()
            ref = _common.require(inputs.ref_logps, "ref_logps", self).float()
            reward = reward - self.params.kl_coef * (logps - ref) * mask
        returns = reward.flip(1).cumsum(1).flip(1) * mask  # G_t = Σ_{k ≥ t} r_k
        mean, var = _global_moments(returns, mask, inputs)
        return ((returns - mean) / torch.sqrt(var + self.params.eps)) * mask


def _global_moments(values: torch.Tensor, mask: torch.Tensor, inputs: AdvantageInputs) -> tuple[torch.Tensor, ...]:
    """Mean and Bessel-corrected variance of ``values`` over the valid tokens of every rank's rows."""
    stats = torch.stack([(values * mask).sum(), (values.square() * mask).sum(), mask.sum()]).double()
    import torch.distributed as dist

    if inputs.local is not None and dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    total, sq, n = stats.unbind()
    mean = total / n.clamp(min=1)
    var = (sq - n * mean.square()) / (n - 1).clamp(min=1)
    return mean.to(values.dtype), var.clamp(min=0).to(values.dtype)
