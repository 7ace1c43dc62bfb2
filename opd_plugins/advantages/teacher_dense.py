"""``teacher_dense``: the teacher's per-token reward as a dense advantage, plus a sparse outcome advantage."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from opd_plugins.advantages import _common
from opd_plugins.advantages.base import AdvantageEstimator, AdvantageInputs, reward_to_go
from opd_plugins.components import ComponentParams, ComponentSpec
from opd_plugins.schedules.base import progress


class TeacherDenseAdvantage(AdvantageEstimator):
    """OPD as RL: ``A_{i,t} = c_dense(step) · g_i · d_{i,t} + c_sparse · A^sparse_i`` over completion tokens.

    ``d_{i,t}`` is the divergence's per-token reward (teacher guidance; for ``reverse_kl``
    ``log π_T(y_t) − log π_θ(y_t)`` at the sampled token) and ``A^sparse`` the sequence advantage of the
    ``sparse`` estimator, computed on the task rewards and broadcast over the completion's tokens (a token-level
    nested estimator is added as is). With no task reward (all rewards NaN) the sparse part is 0, so pure
    distillation works; ``sparse: null`` drops it altogether (and with it the need for groups of the default
    ``grpo``). The dense coefficient follows ``dense_schedule`` from ``dense_coef`` (step 0)
    to ``dense_coef_end`` (last step): ``constant``, ``linear_decay`` or ``cosine_decay`` — the "sparse-to-dense"
    bridge leans on the teacher early and on the outcome later. ``dense_on: incorrect`` applies the dense term
    only to completions whose reward is below ``correct_threshold`` (``g_i``; KDRL's reward-guided KD; unscored
    completions keep it). ``reward_to_go: true`` replaces ``d_t`` by ``d_t − Σ_{t'>t} D_t'`` (D the divergence's
    per-token value): the policy gradient of the sequence-level divergence E_π[Σ_t D_t], where ``d_t`` alone is
    OPD's per-position gradient with the prefix fixed (:func:`~opd_plugins.advantages.base.reward_to_go`).

    Composition: ``sparse`` is any registered estimator, ``{name, params}`` (built-in, installed, or from the
    recipe's ``plugins:``), built by the registry with this estimator; its needs (``min_generations``, log-probs)
    become this estimator's.

    KDRL (Xu et al., https://arxiv.org/abs/2506.02208) optimises ``J_GRPO − β·KL(π_θ‖π_T)`` with β annealed
    from about 5e-3 to 1e-3. Its reward form here is ``sparse: {name: grpo}``, ``dense_coef: 5.0e-3``,
    ``dense_coef_end: 1.0e-3``, ``dense_schedule: linear_decay`` (add ``dense_on: incorrect`` for its
    reward-guided variant); the exact loss form is the ``grpo`` estimator with
    ``objective.divergence: {name: linear, params: {start: 5.0e-3, end: 1.0e-3}}``. Leave
    ``objective.divergence_reward`` at 0 with this estimator, or the token reward is added twice.
    Reference primitive: slime's OPD advantage ``Â_t = A_t − λ·KL̂_t`` (paper catalog §3.1).
    """

    name: ClassVar[str] = "teacher_dense"
    needs_token_reward: ClassVar[bool] = True
    nested_slots: ClassVar[dict[str, str]] = {"sparse": "advantage"}

    class Params(ComponentParams):
        dense_coef: float = Field(
            1.0, description="Coefficient of the per-token teacher reward at step 0 (throughout when constant).")
        dense_coef_end: float = Field(0.0, description="Coefficient at the last step, for the decaying schedules.")
        dense_schedule: Literal["constant", "linear_decay", "cosine_decay"] = Field(
            "constant", description="How the dense coefficient moves from dense_coef to dense_coef_end over training.")
        sparse: ComponentSpec | None = Field(
            default_factory=lambda: ComponentSpec(name="grpo"),
            description="Sequence-level estimator {name, params} on the task rewards, or null for none.")
        sparse_coef: float = Field(1.0, description="Coefficient of the sparse advantage.")
        dense_on: Literal["all", "incorrect"] = Field(
            "all", description="Dense term on every completion, or only on those below correct_threshold (KDRL).")
        correct_threshold: float = Field(0.5, description="A completion is correct when its reward is at least this.")
        reward_to_go: bool = Field(
            False, description="Dense term d_t − Σ_{t'>t} D_t' (the sequence-level divergence's policy gradient) "
                               "instead of OPD's per-position d_t.")

    def __init__(self, params: Params | None = None, nested: dict[str, Any] | None = None) -> None:
        super().__init__(params, nested)
        self.sparse: AdvantageEstimator | None = self.nested.get("sparse")
        _common.adopt_needs(self, self.sparse)

    def num_generations_problem(self, num_generations: int) -> str | None:
        """The nested estimator's objection to this group size, if any (e.g. ``median`` and even groups)."""
        return self.sparse.num_generations_problem(num_generations) if self.sparse is not None else None

    def needs_token_value(self) -> bool:
        return self.params.reward_to_go

    def dense_coefficient(self, step: int, max_steps: int) -> float:
        p, start, end = progress(step, max_steps), self.params.dense_coef, self.params.dense_coef_end
        if self.params.dense_schedule == "linear_decay":
            return start + (end - start) * p
        if self.params.dense_schedule == "cosine_decay":
            return end + (start - end) * 0.5 * (1 + math.cos(math.pi * p))
        return start

    def compute(self, inputs: AdvantageInputs) -> torch.Tensor:
        token_reward = _common.require(inputs.token_reward, "token_reward", self).float()
        mask = torch.ones_like(token_reward) if inputs.mask is None else inputs.mask.to(token_reward)
        rewards = inputs.rewards.float()
        local = rewards[inputs.local_slice].to(token_reward.device)
        gate = torch.ones_like(local)
        if self.params.dense_on == "incorrect":
            gate = (~(local >= self.params.correct_threshold)).to(token_reward)  # NaN (unscored) keeps the term
        if self.params.reward_to_go:
            token_reward = reward_to_go(token_reward, mask, _common.require(inputs.token_value, "token_value", self))
        adv = self.dense_coefficient(inputs.step, inputs.max_steps) * gate.unsqueeze(1) * token_reward * mask
        if self.sparse is not None and self.params.sparse_coef != 0 and not torch.isnan(rewards).all():
            sparse = self.sparse.compute(inputs).to(adv)
            adv = adv + self.params.sparse_coef * (sparse.unsqueeze(1) * mask if sparse.dim() == 1 else sparse)
        return adv
