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
    "rollout",
    "schedule",
)
"""Every component kind, in the order one training step meets them (schedules weight the loss terms)."""

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

    def __init__(self, params: ComponentParams | None = None) -> None:
        if params is None:
            params = self.Params()
        elif isinstance(params, dict):
            params = self.Params(**params)
        self.params = params

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

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a restart (saved into every checkpoint). Tensors, numbers, strings, lists."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state but was given keys {sorted(state)}")

    def close(self) -> None:
        """Release what the component holds (threads, connections, spawned servers). Idempotent; called once
        training ends (``OPDTrainer.close_components``), also after a failure."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"
