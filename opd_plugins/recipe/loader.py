"""YAML → command-line overrides → validation → :class:`Recipe`.

Validation collects every problem (with its YAML key path) and finishes before any model or dataset is
loaded: structure, plugins, component names (with did-you-mean and the registered choices), component params,
trainer arguments, and cross-field rules (teacher capabilities, batch divisibility, GPU-only options).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from opd_plugins.errors import OPDError, PluginLoadError, Problem, RecipeError, did_you_mean, fields_at, pydantic_problems
from opd_plugins.recipe import yaml_io
from opd_plugins.recipe.preference import legacy_rewrite
from opd_plugins.recipe.launch import Launch, launch_from_env
from opd_plugins.recipe.rules import GENERIC_RULES, RecipeContext, device_problems, device_rule, launch_rule
from opd_plugins.recipe.schema import Recipe

SECRET_WORDS = ("api_key", "apikey", "token", "secret", "password", "authorization")


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe file with :mod:`~opd_plugins.recipe.yaml_io`'s safe loader; every failure is a
    :class:`RecipeError` naming the file (too large, not UTF-8, malformed, an alias bomb, a duplicate key, ...)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise RecipeError(f"recipe file does not exist: {path}", source=str(path))
    if path.is_dir():
        raise RecipeError(f"recipe path is a directory, not a YAML file: {path}", source=str(path))
    try:
        text = yaml_io.read_text(path)
    except ValueError as exc:
        raise RecipeError(str(exc), source=str(path)) from None
    except OSError as exc:
        raise RecipeError(f"cannot read the recipe: {exc.strerror or exc}", source=str(path)) from None
    try:
        raw = yaml_io.load(text)
    except yaml.YAMLError as exc:
        kind = "refused YAML" if isinstance(exc, yaml_io.YAMLLimitError) else "malformed YAML"
        raise RecipeError(f"{kind}{yaml_io.describe(exc)}", source=str(path)) from None
    if raw is None:
        raise RecipeError("the recipe is empty", source=str(path))
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe must be a YAML mapping at the top level, got {type(raw).__name__}", source=str(path))
    return raw


# ---------------------------------------------------------------------------------------------------------------
# Overrides: a.b.c=value
# ---------------------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override {text!r} is not of the form dotted.key=value")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise RecipeError(f"override {text!r} has an empty key part")
    try:
        parsed = yaml_io.load(value) if value.strip() else ""
    except yaml_io.YAMLLimitError as exc:
        raise RecipeError(f"override {key.strip()}=...: refused YAML{yaml_io.describe(exc)}") from None
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Apply dotted overrides to a copy of ``raw``; returns it and ``{dotted path: override text}``.

    Missing intermediate mappings are created (so ``teacher.params.top_k=32`` works when the YAML has no
    ``params``); whether the key is allowed is decided by validation, which names the override.
    """
    import copy

    out = copy.deepcopy(raw)
    origins: dict[str, str] = {}
    for text in overrides:
        parts, value = parse_override(text)
        text = _redact_override(parts[-1], text)  # as shown in messages
        node: Any = out
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"override {text!r}: {'.'.join(parts[:i])} has no item {part}")
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise RecipeError(f"override {text!r}: {'.'.join(parts[:i])} is not a mapping")
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise RecipeError(f"override {text!r}: {'.'.join(parts[:-1])} has no item {last}")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise RecipeError(f"override {text!r}: {'.'.join(parts[:-1])} is not a mapping")
        origins[".".join(parts)] = text
    return out, origins


def _redact_override(key: str, text: str) -> str:
    """``key=value`` as the user typed it, with the value hidden when the key looks like a secret."""
    lowered = key.lower()
    if any(w in lowered for w in SECRET_WORDS) and not lowered.endswith("_env"):
        return text.split("=", 1)[0] + "=***"
    return text


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------


_did_you_mean = did_you_mean  # old private names, kept for plugins that imported them
_fields_at = fields_at


def validate_recipe(raw: dict[str, Any], source: str = "<recipe>", pm: Any = None,
                    origins: dict[str, str] | None = None, device_check: bool = True,
                    launch: Launch | None = None) -> tuple[Recipe, Any]:
    """Validate a recipe mapping; returns ``(Recipe, plugin manager)`` or raises :class:`RecipeError`.

    The recipe's components are built here, once, through the registry (``recipe.components``), and the run uses
    them. ``device_check`` also rejects GPU-only options when this machine has no GPU (``train`` does this;
    ``validate`` reports them as notes instead, so GPU recipes can be checked anywhere), and checks the recipe
    against this process's distributed launch (``launch``, default: read from the environment accelerate sets).
    ``launch`` given: check against that launch (``validate --accelerate-config``).
    """
    from opd_plugins.manager import disabled_plugins, get_plugin_manager

    raw, notes = legacy_rewrite(raw)
    problems: list[Problem] = []
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems.extend(pydantic_problems(exc, Recipe))
        recipe = None

    # Plugins: built-ins and entry points, then the recipe's own modules (their hooks checked once, together).
    if pm is None:
        try:
            pm = get_plugin_manager()
        except PluginLoadError as exc:  # an installed plugin: not the recipe's, so no YAML key
            raise RecipeError([Problem("", str(exc))], source) from None
    recipe_plugins = []
    index: dict[str, int] = {}
    plugin_list = raw.get("plugins") or []
    if isinstance(plugin_list, list):
        for i, module in enumerate(plugin_list):
            if not isinstance(module, str) or module in disabled_plugins():
                continue
            try:
                info = pm.load_module(module, check=False, require_hooks=True)
            except PluginLoadError as exc:
                problems.append(Problem(f"plugins[{i}]", str(exc)))
                continue
            if info is not None:
                index[info.name] = i
                recipe_plugins.append((i, pm.get_plugin(info.name)))
        for name, message in pm.check_hooks(raise_errors=False).items():
            problems.append(Problem(f"plugins[{index[name]}]" if name in index else "", message))
            recipe_plugins = [(i, m) for i, m in recipe_plugins if i != index.get(name)]
    try:
        registry = pm.registry
    except PluginLoadError as exc:
        culprit = next((f"plugins[{i}]" for name, i in index.items() if repr(name) in str(exc)), "")
        problems.append(Problem(culprit, str(exc)))
        registry = None

    ctx = None
    if registry is not None:
        if launch is None and device_check:
            launch = launch_from_env()
        ctx = RecipeContext(_sections(raw, recipe), registry, recipe_plugins=recipe_plugins, device_check=device_check,
                            launch=launch)
        for rule in GENERIC_RULES:
            problems += rule(ctx)
        if ctx.variant is not None:
            problems += ctx.variant.recipe_problems(ctx)
        problems += device_rule(ctx)
        problems += launch_rule(ctx)

    if problems:
        if origins:
            problems = [
                Problem(p.path, p.message + "".join(
                    f" (from command-line override {text!r})" for key, text in origins.items()
                    if p.path == key or p.path.startswith(key + ".") or key.startswith(p.path + ".")
                )) for p in problems
            ]
        raise RecipeError(problems, source)
    recipe._source = source
    recipe._components = ctx.built if ctx is not None else None
    recipe._notes = notes
    return recipe, pm


class _Sections:
    """The recipe's top-level sections that parsed on their own (None where a section itself is invalid),
    so that one broken section does not hide the problems of the others."""

    def __init__(self, values: dict[str, Any], invalid: set[str] | None = None) -> None:
        self.__dict__.update(values)
        self.invalid = invalid or set()


def _sections(raw: dict[str, Any], recipe: Recipe | None) -> _Sections:
    from pydantic import TypeAdapter

    if recipe is not None:
        return _Sections({k: getattr(recipe, k) for k in Recipe.model_fields})
    values: dict[str, Any] = {}
    invalid: set[str] = set()
    for key, info in Recipe.model_fields.items():
        if key not in raw:
            values[key] = None if info.is_required() else info.get_default(call_default_factory=True)
            continue
        try:
            values[key] = TypeAdapter(info.annotation).validate_python(raw[key])
        except ValidationError:
            values[key] = None
            invalid.add(key)
    return _Sections(values, invalid)


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, pm: Any = None,
                device_check: bool = True, launch: Launch | None = None) -> tuple[Recipe, Any]:
    """Read, override and validate a recipe file. Raises :class:`RecipeError` listing every problem."""
    raw = read_yaml(path)
    try:
        raw, origins = apply_overrides(raw, list(overrides or []))
    except RecipeError as exc:
        raise RecipeError(exc.problems, str(path)) from None
    return validate_recipe(raw, str(path), pm=pm, origins=origins, device_check=device_check, launch=launch)


def redact(obj: Any) -> Any:
    """A copy with secret-looking values replaced (used before a recipe is written to a run directory)."""
    if isinstance(obj, dict):
        return {
            k: ("***" if any(w in str(k).lower() for w in SECRET_WORDS) and isinstance(v, str) and not str(k).lower().endswith("_env") else redact(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


__all__ = ["read_yaml", "apply_overrides", "validate_recipe", "load_recipe", "redact", "device_problems", "OPDError"]
