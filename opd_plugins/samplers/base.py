"""The hint/prefix-sampler contract: per rollout, how the generation is guided and how the trainer must treat it.

A sampler sees the rows of the next generation batch (one per rollout: each prompt repeated ``num_generations``
times, in groups) and returns one :class:`Guidance` per rollout. The trainer honours its ``role``:

* ``none``: the rollout is the task itself.
* ``context``: the rollout is generated from ``prompt`` (the task with something added: a hint, a partial
  solution) and trained on that same prompt; on-policy under the augmented context (POPE, QuestA, SAGE).
* ``swap``: generated from ``prompt`` (with the hint), trained on the *original* prompt, its policy-gradient term
  weighted by the sampler's shaping of r_t = π_θ(y_t | x, y_<t) / π_old(y_t | x, h, y_<t) (:meth:`Sampler.swap_weights`;
  Adaptive Guidance's r / (r + γ)), unclipped, instead of TRL's ratio, clipping and importance correction. The
  denominator is the hinted generation's behaviour log-prob (the rollout backend's, or the trainer's own no-grad
  forward on the hinted prompt when the backend samples the policy itself).
* ``prefix``: ``prefix`` text is forced at the start of the completion and the policy continues it. With
  ``prefix_loss: masked`` (PrefixRL) its tokens leave every loss term and the token normaliser; with
  ``supervised`` (LUFFY) they are trained as off-policy supervision with weight f(π) = π / (π + γ)
  (:meth:`Sampler.supervised_weights`) times the rollout's advantage. The continuation is on-policy.

After rewards the trainer calls :meth:`Sampler.observe` with the whole generation batch (every rank's rollouts, the
same on every rank, so the sampler's state stays identical across ranks) and :meth:`Sampler.on_degenerate_groups`
with the groups whose rewards are all equal, with those rewards (all-fail and all-pass differ). State that must
survive a restart (per-prompt levels, stores of traces) goes in ``state_dict``. Samplers are not applied at
evaluation: held-out prompts are never hinted.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from opd_plugins.components import Component

Role = Literal["none", "context", "swap", "prefix"]
ROLES: tuple[str, ...] = ("none", "context", "swap", "prefix")
"""Every role, in the order of the ``sampler_role`` codes the trainer puts in the batch (0..3)."""


@dataclass
class Guidance:
    """How one rollout is guided (see the module docstring for what the trainer does with each ``role``).

    ``prompt``: the prompt to generate from (``context`` and ``swap``; same form as the dataset's: messages or
    text). ``prefix``: the text forced at the start of the completion (``prefix``). ``prefix_loss``: ``masked`` or
    ``supervised``. ``note``: a short description for logs and tests (e.g. ``"hint level 2"``).
    """

    role: Role = "none"
    prompt: Any = None
    prefix: str | None = None
    prefix_loss: Literal["masked", "supervised"] = "masked"
    note: str | None = None

    def problems(self) -> list[str]:
        """What is inconsistent in this guidance (empty when fine)."""
        out = []
        if self.role not in ROLES:
            out.append(f"role {self.role!r} is not one of {', '.join(ROLES)}")
        if self.role in ("context", "swap") and self.prompt is None:
            out.append(f"role {self.role!r} needs the prompt to generate from")
        if self.role == "prefix" and not self.prefix:
            out.append("role 'prefix' needs a non-empty prefix")
        if self.role != "prefix" and self.prefix is not None:
            out.append(f"role {self.role!r} cannot force a prefix (use role 'prefix')")
        if self.prefix_loss not in ("masked", "supervised"):
            out.append(f"prefix_loss {self.prefix_loss!r} is not 'masked' or 'supervised'")
        return out


@dataclass
class SamplerOutput:
    """One :class:`Guidance` per rollout, in the order of the rows the sampler was given."""

    guidance: list[Guidance] = field(default_factory=list)

    @classmethod
    def unguided(cls, n: int) -> "SamplerOutput":
        return cls([Guidance() for _ in range(n)])

    def generation_prompts(self, prompts: list[Any]) -> list[Any]:
        """The prompts the rollouts are generated from (a guidance's ``prompt`` where it gives one)."""
        return [g.prompt if g.role in ("context", "swap") else p for g, p in zip(self.guidance, prompts, strict=True)]

    def role_counts(self) -> dict[str, int]:
        return {role: sum(g.role == role for g in self.guidance) for role in ROLES}


@dataclass
class SamplerFeedback:
    """A generation batch's outcome, every rank's rollouts in generation order (groups of ``num_generations``).

    ``rows``: the dataset row of each rollout; ``rewards`` ``(N,)`` total rewards (NaN unscored); ``guidance``:
    what the sampler asked for each; ``completions``: each rollout's completion text (prefix included);
    ``step``: the optimizer step it was generated at.
    """

    rows: list[dict[str, Any]]
    rewards: torch.Tensor
    guidance: list[Guidance]
    completions: list[str]
    num_generations: int
    step: int

    def groups(self) -> list[tuple[dict[str, Any], torch.Tensor, list[Guidance], list[str]]]:
        """``(row, rewards (G,), guidance, completions)`` per prompt group."""
        G, out = self.num_generations, []
        for start in range(0, len(self.rows) - G + 1, G):
            sl = slice(start, start + G)
            out.append((self.rows[start], self.rewards[sl], self.guidance[sl], self.completions[sl]))
        return out


def prompt_key(row: dict[str, Any]) -> str:
    """A stable key of a dataset row's prompt: its ``id`` / ``index`` column when it has one, else a hash of the
    prompt (messages or text). Samplers key their per-prompt state by it."""
    for column in ("id", "index", "opd_prompt_index"):
        if row.get(column) is not None:
            return f"{column}:{row[column]}"
    blob = json.dumps(row.get("prompt"), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def success_rate(rewards: torch.Tensor, threshold: float) -> float | None:
    """Share of scored rewards at or above ``threshold`` (None when none is scored)."""
    scored = rewards[~torch.isnan(rewards)]
    return float((scored >= threshold).float().mean()) if scored.numel() else None


class Sampler(Component):
    """Base class of hint/prefix samplers (the contract is the module docstring).

    Subclasses implement :meth:`prepare` (deterministic given ``step`` and the sampler's state), declare the
    ``roles`` they may return (checked against the rollout backend at validation: ``swap`` needs behaviour
    log-probs), the dataset columns they read (:meth:`required_columns`, checked before any model loads), and
    learn from :meth:`observe`.
    """

    kind: ClassVar[str] = "sampler"
    roles: ClassVar[frozenset[str]] = frozenset({"none"})

    def setup(self, ctx: Any) -> None:
        """Prepare (once, on every rank, after the trainer is built) from a
        :class:`~opd_plugins.context.SetupContext`: a sampler that generates (``self_hint``) keeps its model."""

    def prepare(self, prompts: list[Any], rows: list[dict[str, Any]], step: int) -> SamplerOutput:
        raise NotImplementedError

    def required_columns(self) -> tuple[str, ...]:
        """Dataset columns :meth:`prepare` reads (e.g. the reference solution); checked when the data is built."""
        return ()

    def observe(self, feedback: SamplerFeedback) -> None:
        """The outcome of the generation batch just scored (every rank's rollouts; the same on every rank)."""

    def on_degenerate_groups(self, rows: list[dict[str, Any]], rewards: torch.Tensor, step: int) -> None:
        """Groups whose scored rewards are all equal: one row per group and its ``(n, G)`` rewards (all-fail
        and all-pass are told apart by the values)."""

    def swap_weights(self, ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The ``swap`` rows' per-token weight from r_t = π_θ(y_t | x) / π_old(y_t | x, h) ``(B, T)`` (with
        gradient), masked by ``mask``; the policy-gradient term is ``−A · weight``. Default: Adaptive Guidance's
        r / (r + γ) with γ the 0.9-quantile of the swap tokens' ratios (detached)."""
        return shaped_ratio(ratio, mask, gamma=None, quantile=0.9)

    def supervised_weights(self, token_probs: torch.Tensor) -> torch.Tensor:
        """The ``prefix_loss: supervised`` tokens' f(π) from their probabilities under π_θ (with gradient); the
        term is ``−A · f(π)``. Default: LUFFY's π / (π + 0.1)."""
        return token_probs / (token_probs + 0.1)


def shaped_ratio(ratio: torch.Tensor, mask: torch.Tensor, *, gamma: float | None, quantile: float = 0.9) -> torch.Tensor:
    """r / (r + γ) (Adaptive Guidance), γ a constant or (``gamma=None``) the ``quantile`` of the ratios at ``mask``'s
    positions, detached; 0 outside the mask."""
    valid = mask.bool()
    if gamma is None:
        values = ratio.detach()[valid].float()
        gamma = float(torch.quantile(values, quantile)) if values.numel() else 1.0
        gamma = gamma if math.isfinite(gamma) and gamma > 0 else 1.0
    return torch.where(valid, ratio / (ratio + gamma), torch.zeros_like(ratio))


__all__ = ["Guidance", "ROLES", "Role", "Sampler", "SamplerFeedback", "SamplerOutput", "prompt_key",
           "shaped_ratio", "success_rate"]
