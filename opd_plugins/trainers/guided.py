"""What the trainer does with a sampler's guidance (:mod:`opd_plugins.samplers.base`): the plan of one generation
batch, forced prefixes, the swapped prompts, and the ``swap`` / ``supervised`` loss terms. Used by ``OPDTrainer``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from opd_plugins.errors import OPDError
from opd_plugins.samplers.base import ROLES, Guidance, Sampler, SamplerOutput


@dataclass
class GuidedBatch:
    """One generation batch's guidance, per rollout: ``roles``; ``prompts`` (what to generate from) and
    ``originals`` (the task's prompts); ``prefix_ids`` (forced completion tokens, empty for none) and ``supervised``
    (whether those tokens are trained on)."""

    roles: list[str]
    prompts: list[Any]
    originals: list[Any]
    prefix_ids: list[list[int]]
    supervised: list[bool]
    guidance: list[Guidance] = field(default_factory=list)

    @property
    def any_guided(self) -> bool:
        return any(r != "none" for r in self.roles)

    def rows_with(self, role: str) -> list[int]:
        return [i for i, r in enumerate(self.roles) if r == role]

    def role_codes(self, device: Any = None) -> torch.Tensor:
        return torch.tensor([ROLES.index(r) for r in self.roles], dtype=torch.long, device=device)


def plan(sampler: Sampler, output: Any, prompts: list[Any], tokenizer: Any, max_completion_length: int) -> GuidedBatch:
    """Check a sampler's output and turn it into a :class:`GuidedBatch`; an :class:`OPDError` naming the sampler for
    anything inconsistent (wrong type or length, a role it did not declare, a prefix that leaves no room)."""
    name = sampler.name
    if not isinstance(output, SamplerOutput):
        raise OPDError(f"sampler {name!r} returned {type(output).__name__}, not opd_plugins.samplers.SamplerOutput")
    if len(output.guidance) != len(prompts):
        raise OPDError(f"sampler {name!r} returned guidance for {len(output.guidance)} rollouts, not {len(prompts)}")
    prefix_ids, supervised = [], []
    for i, g in enumerate(output.guidance):
        problems = g.problems() if isinstance(g, Guidance) else [f"{type(g).__name__} is not a Guidance"]
        if not problems and g.role not in sampler.roles | {"none"}:
            problems = [f"role {g.role!r} is not among the roles the sampler declares ({', '.join(sorted(sampler.roles))})"]
        if problems:
            raise OPDError(f"sampler {name!r}, rollout {i}: {'; '.join(problems)}")
        ids: list[int] = []
        if g.role == "prefix":
            ids = tokenizer(g.prefix, add_special_tokens=False)["input_ids"]
            if len(ids) >= max_completion_length:
                raise OPDError(f"sampler {name!r}, rollout {i}: its prefix is {len(ids)} tokens, which leaves no room "
                               f"in max_completion_length={max_completion_length} for the policy to continue; cut "
                               "prefixes shorter (max_prefix_tokens of the built-in samplers) or raise "
                               "max_completion_length")
        prefix_ids.append(ids)
        supervised.append(g.role == "prefix" and g.prefix_loss == "supervised")
    return GuidedBatch(roles=[g.role for g in output.guidance], prompts=output.generation_prompts(prompts),
                       originals=list(prompts), prefix_ids=prefix_ids, supervised=supervised,
                       guidance=list(output.guidance))


def with_prefixes(prompt_ids: list[list[int]], guided: GuidedBatch | None) -> list[list[int]]:
    """The token ids to generate from: each prompt followed by its forced prefix."""
    if guided is None:
        return prompt_ids
    return [list(p) + list(x) for p, x in zip(prompt_ids, guided.prefix_ids, strict=True)]


def prepend_prefixes(completion_ids: list[list[int]], logprobs: list[list[float]] | None, guided: GuidedBatch | None,
                     max_completion_length: int) -> tuple[list[list[int]], list[list[float]] | None]:
    """Completions as the trainer sees them: forced prefix + continuation, cut to ``max_completion_length``; the
    prefix's behaviour log-probs are NaN (nothing sampled them)."""
    if guided is None or not any(guided.prefix_ids):
        return completion_ids, logprobs
    ids = [(list(x) + list(c))[:max_completion_length] for x, c in zip(guided.prefix_ids, completion_ids, strict=True)]
    if logprobs is not None:
        logprobs = [([math.nan] * len(x) + list(lp))[:max_completion_length]
                    for x, lp in zip(guided.prefix_ids, logprobs, strict=True)]
    return ids, logprobs


def prefix_tool_mask(completion_ids: list[list[int]], tool_mask: list[list[int]] | None,
                     guided: GuidedBatch) -> list[list[int]] | None:
    """TRL's ``tool_mask`` (1 = a token of the policy's own) with the forced prefix tokens set to 0, so they leave
    TRL's loss, its token count and its importance correction (``supervised`` ones get their own term)."""
    if not any(guided.prefix_ids):
        return tool_mask
    out = []
    for i, ids in enumerate(completion_ids):
        mask = list(tool_mask[i]) if tool_mask is not None else [1] * len(ids)
        n = min(len(guided.prefix_ids[i]), len(mask))
        out.append([0] * n + mask[n:])
    return out


def supervised_prefix_mask(guided: GuidedBatch, shape: tuple[int, int], device: Any) -> torch.Tensor:
    """``(B, T)`` 1 at the forced prefix tokens of ``prefix_loss: supervised`` rollouts."""
    mask = torch.zeros(shape, device=device)
    for i, (ids, sup) in enumerate(zip(guided.prefix_ids, guided.supervised, strict=True)):
        if sup:
            mask[i, : min(len(ids), shape[1])] = 1.0
    return mask


def guided_terms(sampler: Sampler, token_logps: torch.Tensor, inputs: dict[str, Any], advantages: torch.Tensor,
                 normalizer: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The loss terms of ``swap`` rows and ``supervised`` prefix tokens, from the policy's token log-probs with
    gradient (TRL's policy-gradient forward of this micro-batch), and their statistics.

    * ``swap``: −Σ A_i · w_t / normalizer over the swap rows' tokens, w = ``sampler.swap_weights(r, mask)`` with
      r_t = exp(log π_θ(y_t | x) − log π_old(y_t | x, h)) (the denominator detached).
    * ``supervised``: −Σ A_i · f(π_θ(y_t)) / normalizer over the supervised prefix tokens, f =
      ``sampler.supervised_weights``.

    ``advantages`` are the micro-batch's ``(B,)`` or ``(B, T)`` advantages (before the trainer zeroed them for TRL's
    own loss)."""
    terms: dict[str, torch.Tensor] = {}
    stats: dict[str, float] = {}
    adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(1).expand_as(token_logps)
    adv = adv.to(token_logps.dtype)
    roles = inputs.get("sampler_role")
    behaviour = inputs.get("swap_behaviour_logps")
    if roles is not None and behaviour is not None:
        swap = (roles == ROLES.index("swap")).unsqueeze(1) & inputs["completion_mask"].bool()
        if "tool_mask" in inputs:
            swap = swap & inputs["tool_mask"].bool()
        if bool(swap.any()):
            log_ratio = (token_logps - behaviour.detach().to(token_logps.dtype)).clamp(-20, 20)
            log_ratio = torch.where(swap, log_ratio, torch.zeros_like(log_ratio))
            weights = sampler.swap_weights(torch.exp(log_ratio), swap.to(token_logps.dtype))
            terms["guided_swap"] = -(adv * weights * swap).sum() / normalizer
            ratio = torch.exp(log_ratio.detach())[swap]
            stats.update(swap_ratio_mean=float(ratio.mean()), swap_weight_mean=float(weights.detach()[swap].mean()))
    supervised = inputs.get("prefix_supervised_mask")
    if supervised is not None and bool(supervised.any()):
        mask = supervised.bool()
        f = sampler.supervised_weights(torch.exp(token_logps))
        terms["guided_prefix"] = -(adv * f * mask).sum() / normalizer
        stats["prefix_prob_mean"] = float(torch.exp(token_logps.detach())[mask].mean())
    return terms, stats


__all__ = ["GuidedBatch", "guided_terms", "plan", "prefix_tool_mask", "prepend_prefixes", "supervised_prefix_mask",
           "with_prefixes"]
