"""Helpers shared by the built-in estimators: nested estimator specs, per-row statistics across ranks.

Not a component module (it registers nothing).
"""

from __future__ import annotations

from typing import Any

import torch

from opd_plugins.advantages.base import AdvantageEstimator, AdvantageInputs
from opd_plugins.components import ComponentSpec

# ---------------------------------------------------------------------------------------------------------------
# Nested estimators: `sparse: {name, params}` / `base: {name, params}`
# ---------------------------------------------------------------------------------------------------------------


def build_nested(spec: ComponentSpec | None, field: str) -> tuple[AdvantageEstimator | None, list[tuple[str, str]]]:
    """Build the estimator a ``{name, params}`` field names; returns ``(estimator, problems)``.

    Names resolve from the built-in estimators, then from installed plugins (entry points) through a fresh
    :func:`~opd_plugins.manager.get_plugin_manager` — imported here, at construction, never at import time.
    Problems are ``(key path below params, message)`` pairs, as the recipe loader's ``nested_problems`` expects;
    the estimator is None when there is any.
    """
    if spec is None:
        return None, []
    from pydantic import ValidationError

    from opd_plugins.advantages import opd_register_components
    from opd_plugins.errors import OPDError

    cls = {c.name: c for c in opd_register_components()}.get(spec.name)
    if cls is None:
        try:
            from opd_plugins.manager import get_plugin_manager

            registry = get_plugin_manager().registry
        except OPDError as exc:
            return None, [(f"{field}.name", f"cannot look up advantage {spec.name!r}: {exc}")]
        if spec.name not in registry.names("advantage"):
            return None, [(f"{field}.name", registry.not_found_message("advantage", spec.name))]
        cls = registry.get("advantage", spec.name)
    try:
        return cls.from_params(spec.params), []
    except ValidationError as exc:
        from opd_plugins.errors import pydantic_problems

        return None, [(p.path, p.message) for p in pydantic_problems(exc, cls.Params, f"{field}.params")]
    except ValueError as exc:
        return None, [(f"{field}.params", str(exc))]


def nested_problems(owner: Any, field: str, pm: Any) -> list[tuple[str, str]]:
    """The ``nested_problems(pm)`` answer for one nested field, worded against the recipe's registry ``pm``."""
    problems = owner._nested_problems
    spec = getattr(owner.params, field)
    if problems and problems[0][0] == f"{field}.name" and spec.name in pm.registry.names("advantage"):
        return [(f"{field}.name", f"advantage {spec.name!r} comes from a module in the recipe's `plugins:` list; a "
                 f"nested estimator must be built in or installed as a plugin (entry point `opd_plugins`)")]
    if problems and problems[0][0] == f"{field}.name":
        return [(f"{field}.name", pm.registry.not_found_message("advantage", spec.name))]
    return list(problems)


def adopt_needs(owner: AdvantageEstimator, nested: AdvantageEstimator | None) -> None:
    """The owner needs whatever its nested estimator needs (instance attributes shadow the ClassVars)."""
    if nested is None:
        return
    owner.min_generations = max(type(owner).min_generations, nested.min_generations)
    owner.needs_token_reward = type(owner).needs_token_reward or nested.needs_token_reward
    owner.needs_logps = type(owner).needs_logps or nested.needs_logps


def check_nested(owner: Any) -> None:
    if owner._nested_problems:
        path, msg = owner._nested_problems[0]
        raise ValueError(f"advantage {owner.name!r}: params.{path}: {msg}")


def nested_state(prefix: str, nested: AdvantageEstimator | None) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in (nested.state_dict() if nested is not None else {}).items()}


def load_nested_state(owner: Any, prefix: str, nested: AdvantageEstimator | None, state: dict[str, Any]) -> None:
    mine = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    other = sorted(set(state) - {f"{prefix}.{k}" for k in mine})
    if other:
        raise ValueError(f"{type(owner).__name__} was given unknown state keys {other}")
    if nested is not None:
        nested.load_state_dict(mine)
    elif mine:
        raise ValueError(f"{type(owner).__name__} has no nested estimator but was given state {sorted(mine)}")


# ---------------------------------------------------------------------------------------------------------------
# Per-row statistics
# ---------------------------------------------------------------------------------------------------------------


def row_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(B, T) → (B,)`` mean over the mask's tokens (0 for a row with no token)."""
    values = values.float()
    mask = torch.ones_like(values) if mask is None else mask.to(values)
    return (values * mask).sum(1) / mask.sum(1).clamp(min=1)


def gather_rows(local: torch.Tensor, inputs: AdvantageInputs) -> torch.Tensor:
    """This rank's per-row values ``(B,)`` → the global batch's ``(N,)``.

    Every rank calls the estimator in the same step, so when a process group spans the batch the rows are
    all-gathered. Without one (a single process, or tests that pass a slice) the other ranks' rows are NaN:
    statistics then use the rows this process has.
    """
    n = inputs.rewards.shape[0]
    local = local.float()
    if local.shape[0] == n:
        return local
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() * local.shape[0] == n:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)
    out = torch.full((n,), float("nan"), dtype=local.dtype, device=local.device)
    out[inputs.local_slice] = local
    return out


def require(tensor: torch.Tensor | None, what: str, owner: Any) -> torch.Tensor:
    """A clear error when the trainer did not fill an input the estimator declared it needs."""
    if tensor is None:
        hint = ("the recipe needs a teacher and a divergence (the divergence's per-token reward is the guidance)"
                if what == "token_reward" else "the trainer must pass the policy's log-probs (needs_logps)")
        raise ValueError(f"advantage {owner.name!r} needs inputs.{what}, which is None: {hint}")
    return tensor
