"""The component base class shared by every kind (teacher, divergence, advantage, ...).

A component is a class with a snake_case ``name``, a docstring, a pydantic ``Params`` model that forbids
unknown keys, and ``example_params()``. Components are registered as classes (never instances) through the
``opd_register_components`` hook; the recipe picks one by name and the trainer builds it from its params.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

class Strict(BaseModel):
    """A pydantic model that forbids unknown keys (every level of a recipe is one)."""

    model_config = ConfigDict(extra="forbid")


class ComponentSpec(Strict):
    """``{name, params}``: a registered component and its parameters, as a recipe (or a nested slot) names it."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("params", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v


def as_schedule_spec(v: Any) -> Any:
    """A bare number is shorthand for the ``constant`` schedule: ``0.5`` → ``{name: constant, params: {value: 0.5}}``
    (a pydantic ``mode="before"`` validator body for schedule slots)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return {"name": "constant", "params": {"value": float(v)}}
    return v


KINDS: tuple[str, ...] = (
    "teacher",
    "divergence",
    "token_weighting",
    "advantage",
    "sampler",
    "prompt_selection",
    "rollout",
    "schedule",
    "task",
    "trainer",
)
"""Every component kind: those one training step meets, in that order (schedules weight the loss terms), then the
verifiable tasks that give rewards and the trainer variants that run a recipe."""

SNAKE_CASE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


class ComponentParams(BaseModel):
    """Base of every component's ``Params``: unknown keys are errors and params are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Component:
    """Base class of every registered component.

    Subclasses set ``kind`` through their kind's base class (e.g. :class:`~opd_plugins.divergences.base.Divergence`)
    and ``name`` themselves, and may override ``Params``, ``example_params``, ``state_dict`` and
    ``load_state_dict``.
    """

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    Params: ClassVar[type[ComponentParams]] = ComponentParams
    nested_slots: ClassVar[dict[str, str]] = {}
    """Params fields that name other components, and the kind of each: ``{"sparse": "advantage"}``. A field holds
    a :class:`ComponentSpec`, ``None``, or a dict or list of specs. The registry builds them (with the recipe's
    plugin manager) before the component and hands them over as ``nested``; the component never resolves them."""

    def __init__(self, params: ComponentParams | None = None, nested: dict[str, Any] | None = None) -> None:
        if params is None:
            params = self.Params()
        elif isinstance(params, dict):
            params = self.Params(**params)
        self.params = params
        self.nested: dict[str, Any] = dict(nested or {})
        missing = [f for f in self.nested_slots if f not in self.nested and getattr(params, f, None) is not None]
        if missing:
            raise ValueError(
                f"{self.kind} {self.name!r} names other components in params.{', params.'.join(missing)}, which must "
                f"be built by the registry: use registry.build({self.kind!r}, spec) (or Components.build / a recipe) "
                f"instead of {type(self).__name__}(params), or pass nested={{{missing[0]!r}: <built component>}}"
            )

    @classmethod
    def example_params(cls) -> ComponentParams:
        """Params that construct a working instance on CPU with a tiny model (used by the contract suite)."""
        return cls.Params()

    @classmethod
    def from_params(cls, params: dict[str, Any] | ComponentParams | None = None) -> "Component":
        """Build from a params mapping as written in a recipe (validated by ``Params``)."""
        if isinstance(params, ComponentParams):
            return cls(params)
        return cls(cls.Params(**(params or {})))

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field problems found once the component is built, nested components included: ``(key path below
        params, message)`` pairs, reported by validation under the component's YAML path. Default: none."""
        return []

    def peer_problems(self, peers: dict[str, Any]) -> list[tuple[str, str]]:
        """Problems of this component given the recipe's other built components (``peers``: slot -> component,
        e.g. ``teacher``, ``divergence``, ``rollout``, ``token_weighting`` (a list), ``pg_weight``), as
        ``(key path below params, message)``. Validation reports them under the component's YAML path; for rules
        that need another component (an FP8 precision flow that needs a high-precision student forward, say).
        Default: none."""
        return []

    def engine_problems(self, sharding: str, *, lora: bool) -> list[tuple[str, str]]:
        """Settings of this component it cannot honour when the student's parameters are laid out as ``sharding``
        (``none``, ``ddp``, ``fsdp``, ``deepspeed_zero3``; see :class:`~opd_plugins.context.SetupContext`), as
        ``(key path below params, reason with the alternative)``; ``lora``: the student is a LoRA model. ``train``
        refuses them before any model loads (from the launch's accelerate settings); :meth:`setup` may refuse the
        same with ``ctx.sharding``. Default: none."""
        return []

    def gpu_problems(self) -> list[tuple[str, str]]:
        """Settings of this component that need a CUDA GPU, as ``(key path below params, reason)``; validation
        reports them on a machine without one (``validate`` as notes, ``train`` as errors). Default: none."""
        return []

    def nested_components(self) -> dict[str, "Component"]:
        """Every nested component under a dotted key (``sparse``, ``teachers.math``): their state is saved with
        this component's (:meth:`state_dict` prefixes it)."""
        out: dict[str, Component] = {}
        for field, value in self.nested.items():
            if isinstance(value, Component):
                out[field] = value
            elif isinstance(value, dict):
                out.update({f"{field}.{k}": v for k, v in value.items()})
            elif isinstance(value, (list, tuple)):
                out.update({f"{field}.{i}": v for i, v in enumerate(value)})
        return out

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a restart (saved into every checkpoint). Tensors, numbers, strings, lists.

        The default saves the nested components' states under ``<slot>.<key>``; a component with state of its own
        overrides this and adds ``super().state_dict()``."""
        return {f"{key}.{k}": v for key, comp in self.nested_components().items() for k, v in comp.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the default restores the nested components')."""
        nested = self.nested_components()
        unknown = sorted(k for k in state if not any(k.startswith(f"{key}.") for key in nested))
        if unknown:
            raise ValueError(f"{type(self).__name__} was given unknown state keys {unknown}")
        for key, comp in nested.items():
            comp.load_state_dict({k[len(key) + 1:]: v for k, v in state.items() if k.startswith(f"{key}.")})

    def close(self) -> None:
        """Release what the component holds (threads, connections, spawned servers). Idempotent; called once
        training ends (``OPDTrainer.close_components``), also after a failure. The default closes the nested
        components."""
        for component in self.nested_components().values():
            component.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"
