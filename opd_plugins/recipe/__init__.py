"""Recipes: YAML → overrides → validation → :class:`Recipe`. Never loads a model."""

from opd_plugins.recipe.loader import apply_overrides, load_recipe, validate_recipe
from opd_plugins.recipe.schema import ComponentSpec, Recipe

__all__ = ["ComponentSpec", "Recipe", "apply_overrides", "load_recipe", "validate_recipe"]
