"""``variance``: prefer prompts whose success probability is near 0.5 (Thompson sampling on p(1−p))."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from opd_plugins.prompt_selection.base import PromptSelection, pop_tensor


class VarianceSelection(PromptSelection):
    """Prompts whose success probability ``p`` is near 0.5, where a group's rewards vary most.

    A group of G rollouts of a prompt with success probability ``p`` is degenerate (all equal: no GRPO signal)
    with probability ``p^G + (1−p)^G``; its reward variance is ``p(1−p)``. Each prompt keeps a Beta posterior of
    ``p``: ``α = prior_alpha + s``, ``β = prior_beta + f``, with ``s`` / ``f`` its scored rollouts with reward
    ``≥ threshold`` / below it (NaN rewards are left out). With ``decay < 1`` all evidence is multiplied by
    ``decay`` at every :meth:`observe` before the new counts are added (discounted Thompson sampling), so the
    posteriors follow a policy that improves. Each chunk draws ``p̃_i ~ Beta(α_i, β_i)`` for every prompt and takes
    the ``k`` largest ``p̃_i(1 − p̃_i) + epsilon·[i never observed]``: a prompt seen little has a wide posterior and
    is drawn near 0.5 often enough to be explored; ``epsilon`` moves never-seen prompts further ahead.

    Papers: VADE (arXiv, November 2025) and PACED (https://arxiv.org/abs/2603.11178) weight problems by
    p(1−p); Beta-posterior Thompson sampling with discounting as in Raj & Kalyani, "Taming Non-stationary Bandits:
    A Bayesian Approach" (2017).
    """

    name: ClassVar[str] = "variance"

    class Params(PromptSelection.Params):
        threshold: float = Field(1.0, description="A rollout succeeds when its reward is >= threshold.")
        prior_alpha: float = Field(1.0, gt=0, description="Beta prior's alpha (pseudo-successes).")
        prior_beta: float = Field(1.0, gt=0, description="Beta prior's beta (pseudo-failures).")
        decay: float = Field(1.0, gt=0, le=1, description="Evidence kept per observe (1: never forget).")
        epsilon: float = Field(0.05, ge=0, description="Score bonus of a prompt never observed.")

    def __init__(self, params: Any = None, nested: dict[str, Any] | None = None) -> None:
        super().__init__(params, nested)
        self.successes = torch.zeros(0, dtype=torch.float64)
        self.failures = torch.zeros(0, dtype=torch.float64)
        self.observed = torch.zeros(0, dtype=torch.int64)  # scored rollouts seen per prompt (never decayed)

    def _grow(self, n: int) -> None:
        if n > self.successes.numel():
            pad = n - self.successes.numel()
            self.successes = torch.cat([self.successes, torch.zeros(pad, dtype=torch.float64)])
            self.failures = torch.cat([self.failures, torch.zeros(pad, dtype=torch.float64)])
            self.observed = torch.cat([self.observed, torch.zeros(pad, dtype=torch.int64)])

    def posterior(self, n_prompts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(α, β)`` of the first ``n_prompts`` prompts."""
        self._grow(n_prompts)
        p = self.params
        return p.prior_alpha + self.successes[:n_prompts], p.prior_beta + self.failures[:n_prompts]

    def posterior_mean(self, n_prompts: int) -> torch.Tensor:
        """``E[p] = α / (α + β)`` per prompt."""
        a, b = self.posterior(n_prompts)
        return a / (a + b)

    def choose(self, k: int, n_prompts: int, step: int, generator: torch.Generator) -> list[int]:
        a, b = self.posterior(n_prompts)
        p = sample_beta(a, b, generator)
        unseen = self.observed[:n_prompts] == 0
        score = p * (1 - p) + self.params.epsilon * unseen.double()
        chosen = torch.argsort(score, descending=True, stable=True)[:k]
        mean = (a / (a + b))[chosen]
        self.last_stats = {"mean_pq": float((mean * (1 - mean)).mean()), "unseen_share": float(unseen[chosen].double().mean())}
        return chosen.tolist()

    def update(self, indices: list[int], rewards: torch.Tensor, step: int) -> None:
        self._grow(max(indices, default=-1) + 1)
        scored = ~torch.isnan(rewards)
        wins = (scored & (rewards >= self.params.threshold)).sum(1).double()
        idx = torch.tensor(indices, dtype=torch.int64)
        if self.params.decay < 1:
            self.successes *= self.params.decay
            self.failures *= self.params.decay
        self.successes.index_add_(0, idx, wins)
        self.failures.index_add_(0, idx, scored.sum(1).double() - wins)
        self.observed.index_add_(0, idx, scored.sum(1))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "successes": self.successes.clone(), "failures": self.failures.clone(),
                "observed": self.observed.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.successes = pop_tensor(state, "successes", torch.float64)
        self.failures = pop_tensor(state, "failures", torch.float64)
        self.observed = pop_tensor(state, "observed", torch.int64)
        super().load_state_dict(state)


def sample_gamma(shape: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``Gamma(shape, 1)`` draws (float64) from ``generator`` only: Marsaglia & Tsang's squeeze-free rejection
    method ("A simple method for generating gamma variables", 2000), with ``Gamma(a) = Gamma(a+1)·U^(1/a)`` for
    ``a < 1``. (``torch.distributions`` takes no generator.)"""
    shape = shape.double()
    a = torch.where(shape < 1, shape + 1, shape)
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(a)
    todo = torch.arange(a.numel())
    while todo.numel():
        x = torch.randn(todo.numel(), generator=generator, dtype=torch.float64)
        u = torch.rand(todo.numel(), generator=generator, dtype=torch.float64)
        v = (1 + c[todo] * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d[todo] * (1 - v + torch.log(v.clamp(min=1e-300))))
        out[todo[ok]] = (d[todo] * v)[ok]
        todo = todo[~ok]
    u = torch.rand(a.numel(), generator=generator, dtype=torch.float64)
    return torch.where(shape < 1, out * u ** (1.0 / shape), out)


def sample_beta(alpha: torch.Tensor, beta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``Beta(α, β)`` draws as ``X / (X + Y)``, ``X ~ Gamma(α)``, ``Y ~ Gamma(β)``, from ``generator`` only."""
    x, y = sample_gamma(alpha, generator), sample_gamma(beta, generator)
    total = x + y
    return torch.where(total > 0, x / total.clamp(min=1e-300), alpha / (alpha + beta))
