"""Trainer variants: the training loops a recipe chooses by ``trainer.name`` (``opd``, ``soda``, a plugin's own).

A variant is registered like any component (kind ``trainer``, through ``opd_register_components``), so a plugin adds
a training loop the way tox plugins add environment types to tox's ``ToxEnvRegister``: by name, never by a flag on
a component of another kind. It says which recipe sections it uses, which trainer arguments it takes, which
cross-field rules apply, which lifecycle hooks it calls, and how it trains. Recipe validation asks the variant;
``opd-plugins train`` calls :meth:`TrainerVariant.train`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from opd_plugins.components import Component
from opd_plugins.errors import Problem

if TYPE_CHECKING:  # pragma: no cover
    from opd_plugins.recipe.rules import RecipeContext
    from opd_plugins.recipe.schema import Recipe

SECTIONS: tuple[str, ...] = ("teacher", "divergence", "advantage", "sampler", "prompt_selection", "rollout",
                             "token_weighting", "objective", "correction", "diagnostics")
"""Recipe sections a variant may use (``model``, ``data``, ``trainer``, ``evaluation`` and ``output_dir`` are
every variant's)."""


class TrainerVariant(Component):
    """Base class of trainer variants (registry kind ``trainer``; the recipe's ``trainer.name``).

    Subclasses set ``name``, a docstring, ``sections`` (the recipe sections the loop reads; a recipe that sets any
    other is refused, with :attr:`unused_reason`) and ``lifecycle_hooks`` (the hooks the loop calls; a recipe whose
    ``plugins:`` implement another is refused), and implement :meth:`train`. Validation calls
    :meth:`arg_problems` and :meth:`recipe_problems`; both must load nothing heavy.
    """

    kind: ClassVar[str] = "trainer"
    sections: ClassVar[frozenset[str]] = frozenset()
    lifecycle_hooks: ClassVar[frozenset[str]] = frozenset()
    unused_reason: ClassVar[str] = "this trainer does not read it"

    def arg_problems(self, args: dict[str, Any]) -> list[Problem]:
        """Problems of ``trainer.args`` (unknown names, wrong values), with their YAML paths."""
        return []

    def recipe_problems(self, ctx: RecipeContext) -> list[Problem]:
        """Cross-field problems of a recipe for this loop (``ctx.built`` holds the components built so far)."""
        return []

    def summary(self, recipe: Recipe) -> str:
        """What ``opd-plugins validate`` prints about a valid recipe: the components this loop will use."""
        parts = [f"trainer={self.name}"]
        for slot in ("teacher", "divergence", "advantage", "sampler", "prompt_selection", "rollout"):
            spec = getattr(recipe, slot, None)
            if slot in self.sections and spec is not None:
                parts.append(f"{slot}={spec.name}")
        if "token_weighting" in self.sections:
            parts += [f"token_weighting={s.name}" for s in recipe.token_weighting]
        return ", ".join(parts)

    def train(self, recipe: Recipe, pm: Any, *, resume: bool = False, overwrite: bool = False,
              argv: list[str] | None = None) -> dict[str, Any]:
        """Run a validated recipe end to end into its ``output_dir``; returns the run's summary."""
        raise NotImplementedError


__all__ = ["SECTIONS", "TrainerVariant"]
