"""``Components``: the resolved components of one run, built from a recipe or by name in user code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from opd_plugins.components import Component


def _constant(value: float) -> Any:
    from opd_plugins.schedules import Constant

    return Constant(Constant.Params(value=value))


@dataclass
class Components:
    """Every component a step uses. Schedules weight the loss terms:
    ``loss = pg_weight(t)·PG + div_weight(t)·D``; ``div_reward_weight(t)`` adds D's per-token reward to the
    advantages."""

    teacher: Any = None
    divergence: Any = None
    advantage: Any = None
    sampler: Any = None
    prompt_selection: Any = None  # which dataset prompts each generation batch is drawn from (default: uniform)
    rollout: Any = None
    token_weighting: list[Any] = field(default_factory=list)
    pg_weight: Any = field(default_factory=lambda: _constant(1.0))
    div_weight: Any = field(default_factory=lambda: _constant(0.0))
    div_reward_weight: Any = field(default_factory=lambda: _constant(0.0))
    div_reward_to_go: bool = False  # add Σ_{t'≥t} d_t' instead of d_t (objective.divergence_reward_to_go)
    correction: Any = None  # a CorrectionSpec, or anything CorrectionSpec.model_validate takes ("tis", {...})
    diagnostics: Any = None  # a DiagnosticsSpec, or its fields as a dict ({"every": 10}); None: the defaults

    def __post_init__(self) -> None:
        from opd_plugins.correction import CorrectionSpec
        from opd_plugins.diagnostics import DiagnosticsSpec

        self.correction = CorrectionSpec.model_validate(self.correction)
        self.diagnostics = DiagnosticsSpec.model_validate(self.diagnostics or {})
        if self.advantage is None:
            from opd_plugins.advantages import GRPOAdvantage

            self.advantage = GRPOAdvantage()
        if self.sampler is None:
            from opd_plugins.samplers import NoSampler

            self.sampler = NoSampler()
        if self.prompt_selection is None:
            from opd_plugins.prompt_selection import UniformSelection

            self.prompt_selection = UniformSelection()
        if self.rollout is None:
            from opd_plugins.rollout import HFGenerate

            self.rollout = HFGenerate()

    @classmethod
    def build(cls, pm: Any = None, **slots: Any) -> "Components":
        """Resolve components by name, as a recipe would, from user code.

        Each slot takes an instance, a name (``"reverse_kl"``), or ``(name, params_dict)``; weights also take
        a number (a constant schedule)::

            Components.build(teacher=("hf_model", {"model": "path/to/teacher"}), divergence="reverse_kl",
                             div_weight=1.0, pg_weight=0.0)
        """
        if pm is None:
            from opd_plugins.manager import get_plugin_manager

            pm = get_plugin_manager()
        kinds = {"teacher": "teacher", "divergence": "divergence", "advantage": "advantage", "sampler": "sampler",
                 "prompt_selection": "prompt_selection", "rollout": "rollout", "pg_weight": "schedule",
                 "div_weight": "schedule", "div_reward_weight": "schedule"}
        resolved: dict[str, Any] = {}
        for slot, value in slots.items():
            if slot in ("correction", "diagnostics", "div_reward_to_go"):
                resolved[slot] = value
            elif slot == "token_weighting":
                resolved[slot] = [_resolve(pm, "token_weighting", v) for v in value]
            elif slot in kinds:
                if kinds[slot] == "schedule" and isinstance(value, (int, float)):
                    value = ("constant", {"value": float(value)})
                resolved[slot] = _resolve(pm, kinds[slot], value)
            else:
                extra = ["token_weighting", "correction", "diagnostics", "div_reward_to_go"]
                raise TypeError(f"unknown component slot {slot!r}; slots are {', '.join([*kinds, *extra])}")
        return cls(**resolved)

    @classmethod
    def from_recipe(cls, recipe: Any, pm: Any, built: dict[str, Any] | None = None) -> "Components":
        """The components of a validated recipe: those validation built (``built``, or ``recipe.take_components()``),
        else built now through ``pm``'s registry."""
        if built is None and hasattr(recipe, "take_components"):
            built = recipe.take_components()
        if built is not None:
            names = ("teacher", "divergence", "advantage", "sampler", "prompt_selection", "rollout", "pg_weight",
                     "div_weight", "div_reward_weight")
            return cls(**{k: built[k] for k in names if k in built},
                       token_weighting=list(built.get("token_weighting", [])), correction=recipe.correction,
                       diagnostics=recipe.diagnostics, div_reward_to_go=recipe.objective.divergence_reward_to_go)
        spec = lambda s: None if s is None else (s.name, s.params)  # noqa: E731
        return cls.build(
            pm,
            teacher=spec(recipe.teacher), divergence=spec(recipe.divergence), advantage=spec(recipe.advantage),
            sampler=spec(recipe.sampler), prompt_selection=spec(recipe.prompt_selection), rollout=spec(recipe.rollout),
            token_weighting=[spec(s) for s in recipe.token_weighting],
            pg_weight=spec(recipe.objective.policy_gradient), div_weight=spec(recipe.objective.divergence),
            div_reward_weight=spec(recipe.objective.divergence_reward), correction=recipe.correction,
            diagnostics=recipe.diagnostics, div_reward_to_go=recipe.objective.divergence_reward_to_go,
        )

    def named(self) -> dict[str, Component]:
        """Every component under a stable key (used for checkpoints)."""
        out = {k: getattr(self, k) for k in ("teacher", "divergence", "advantage", "sampler", "prompt_selection",
                                              "rollout", "pg_weight", "div_weight", "div_reward_weight")}
        out.update({f"token_weighting.{i}": tw for i, tw in enumerate(self.token_weighting)})
        return {k: v for k, v in out.items() if v is not None}


def _resolve(pm: Any, kind: str, value: Any) -> Any:
    if value is None or isinstance(value, Component):
        return value
    return pm.registry.build(kind, value)  # nested specs are built by the registry too
