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
from opd_plugins.recipe.schema import SLOT_KINDS, ComponentSpec, Recipe

SECRET_WORDS = ("api_key", "apikey", "token", "secret", "password", "authorization")


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe file with ``yaml.safe_load``; every failure is a :class:`RecipeError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe file does not exist: {path}", source=str(path))
    if path.is_dir():
        raise RecipeError(f"recipe path is a directory, not a YAML file: {path}", source=str(path))
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"malformed YAML{where}: {problem}", source=str(path)) from None
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
        parsed = yaml.safe_load(value) if value.strip() else ""
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


def _component_problems(pm: Any, kind: str, spec: ComponentSpec, path: str) -> tuple[list[Problem], Any]:
    """Check a ``{name, params}`` slot against the registry; returns problems and the built params."""
    registry = pm.registry
    if spec.name not in registry.names(kind):
        return [Problem(f"{path}.name", registry.not_found_message(kind, spec.name))], None
    cls = registry.get(kind, spec.name)
    try:
        return [], cls.Params(**spec.params)
    except ValidationError as exc:
        return pydantic_problems(exc, cls.Params, f"{path}.params"), None


def cached_field_names(key: str, load: Any) -> set[str]:
    """The field names of the dataclass ``load()`` returns, cached as JSON under ``key`` in the user cache
    directory: importing TRL takes seconds, so ``validate`` answers from the cache after the first run."""
    import dataclasses
    import json

    from opd_plugins.paths import atomic_write, cache_dir

    path = cache_dir() / f"{key}.json"
    try:
        return set(json.loads(path.read_text()))
    except (OSError, ValueError):
        pass
    names = sorted(f.name for f in dataclasses.fields(load()))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(names), fsync=False)
    except OSError:
        pass  # a read-only cache only costs time
    return set(names)


def trainer_arg_names() -> set[str]:
    """Every ``OPDConfig`` field name, cached per opd_plugins/TRL/transformers version and ``opd_config.py``
    content."""
    import hashlib
    from importlib import metadata

    from opd_plugins.markers import __version__

    config_src = Path(__file__).resolve().parent.parent / "trainers" / "opd_config.py"
    digest = hashlib.sha1(config_src.read_bytes()).hexdigest()[:10] if config_src.exists() else "none"
    versions = "-".join([__version__, metadata.version("trl"), metadata.version("transformers"), digest])

    def load() -> type:
        from opd_plugins.trainers.opd_config import OPDConfig

        return OPDConfig

    return cached_field_names(f"trainer_args-{versions}", load)


def _trainer_arg_problems(args: dict[str, Any]) -> list[Problem]:
    fields = trainer_arg_names()
    problems = []
    for key in args:
        if key not in fields:
            problems.append(Problem(f"trainer.args.{key}", f"unknown trainer argument.{did_you_mean(key, sorted(fields))}"))
        elif key == "output_dir":
            problems.append(Problem("trainer.args.output_dir", "set the top-level output_dir instead"))
    return problems


def validate_recipe(raw: dict[str, Any], source: str = "<recipe>", pm: Any = None,
                    origins: dict[str, str] | None = None, device_check: bool = True) -> tuple[Recipe, Any]:
    """Validate a recipe mapping; returns ``(Recipe, plugin manager)`` or raises :class:`RecipeError`.

    ``device_check`` also rejects GPU-only options when this machine has no GPU (``train`` does this;
    ``validate`` reports them as notes instead, so GPU recipes can be checked anywhere).
    """
    from opd_plugins.manager import get_plugin_manager

    problems: list[Problem] = []
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems.extend(pydantic_problems(exc, Recipe))
        recipe = None

    # Plugins: built-ins and entry points, then the recipe's own modules.
    if pm is None:
        try:
            pm = get_plugin_manager()
        except PluginLoadError as exc:
            raise RecipeError([Problem("", str(exc))], source) from None
    from opd_plugins.manager import disabled_plugins

    plugin_list = raw.get("plugins") or []
    if isinstance(plugin_list, list):
        for i, module in enumerate(plugin_list):
            if not isinstance(module, str) or module in disabled_plugins():
                continue
            try:
                pm.load_module(module)
            except PluginLoadError as exc:
                problems.append(Problem(f"plugins[{i}]", str(exc)))
    try:
        registry = pm.registry
    except PluginLoadError as exc:
        problems.append(Problem("plugins", str(exc)))
        registry = None

    if registry is not None:
        problems.extend(_semantic_problems(_sections(raw, recipe), pm, device_check))

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


def _semantic_problems(recipe: Any, pm: Any, device_check: bool) -> list[Problem]:
    from opd_plugins.data.tasks import validate_task_params
    from opd_plugins.models import check_model_reference

    problems: list[Problem] = []
    built: dict[str, Any] = {}
    for slot, kind in SLOT_KINDS.items():
        spec = getattr(recipe, slot)
        if spec is None:
            continue
        p, params = _component_problems(pm, kind, spec, slot)
        problems += p
        if params is not None:
            try:
                built[slot] = pm.registry.get(kind, spec.name)(params)
            except ValueError as exc:
                problems.append(Problem(f"{slot}.params", str(exc)))
                continue
            nested = getattr(built[slot], "nested_problems", None)
            if nested is not None:
                problems += [Problem(f"{slot}.params.{path}", msg) for path, msg in nested(pm)]
    has_task = recipe.data is not None and recipe.data.task is not None
    for i, spec in enumerate(recipe.token_weighting or []):
        p, params = _component_problems(pm, "token_weighting", spec, f"token_weighting[{i}]")
        problems += p
        if params is not None and not has_task and pm.registry.get("token_weighting", spec.name)(params).requires_rewards():
            problems.append(Problem(f"token_weighting[{i}]", f"{spec.name} gates on task rewards, but the recipe has "
                                    "no reward: add data.task (a verifiable task that scores completions)"))
    weights: dict[str, Any] = {}
    for term in ("policy_gradient", "divergence", "divergence_reward"):
        if recipe.objective is None:
            break
        spec = getattr(recipe.objective, term)
        p, params = _component_problems(pm, "schedule", spec, f"objective.{term}")
        problems += p
        if params is not None:
            weights[term] = pm.registry.get("schedule", spec.name)(params)

    # The model and the data.
    msg = check_model_reference(recipe.model.name_or_path) if recipe.model is not None else None
    if msg:
        problems.append(Problem("model.name_or_path", msg))
    if recipe.data is not None and recipe.data.task is not None:
        problems += [Problem("data.task", m) for m in validate_task_params(recipe.data.task.name, recipe.data.task.params)]
    for key in ("dataset", "eval_dataset"):
        src = getattr(recipe.data, key) if recipe.data is not None else None
        if src is not None:
            from opd_plugins.data.loading import DatasetSource

            try:
                DatasetSource.model_validate(src)
            except ValidationError as exc:
                problems += pydantic_problems(exc, DatasetSource, f"data.{key}")

    # The trainer arguments (a preference objective is trained by TRL's DPOTrainer: see opd_plugins.soda).
    from opd_plugins import soda

    args = recipe.trainer.args if recipe.trainer is not None else {}
    preference = soda.is_preference_recipe(recipe, pm)
    if preference:
        problems += [Problem(path, msg) for path, msg in soda.trainer_arg_problems(args)]
    else:
        problems += _trainer_arg_problems(args)

    # Cross-field rules.
    uses_div = any(
        term in weights and _ever_nonzero(weights[term]) for term in ("divergence", "divergence_reward")
    )
    if uses_div and recipe.teacher is None and "teacher" not in recipe.invalid:
        problems.append(Problem("teacher", "required key is missing: objective.divergence or objective.divergence_reward is non-zero, so the recipe needs a teacher"))
    if uses_div and recipe.divergence is None and "divergence" not in recipe.invalid:
        problems.append(Problem("divergence", "required key is missing: objective.divergence or objective.divergence_reward is non-zero, so the recipe needs a divergence"))
    adv = built.get("advantage")
    if adv is not None and adv.needs_token_reward and (recipe.teacher is None or recipe.divergence is None):
        problems.append(Problem("advantage", f"{recipe.advantage.name} turns teacher guidance into advantages: the "
                                "recipe needs a teacher and a divergence"))
    text_problems = soda.recipe_problems(recipe, pm)  # None unless a text-only teacher or a preference objective
    if text_problems is not None:
        problems += [Problem(path, msg) for path, msg in text_problems]
    elif "teacher" in built and "divergence" in built:
        need = built["divergence"].requires()
        caps = built["teacher"].capabilities
        if need not in caps:
            problems.append(Problem(
                "divergence",
                f"{recipe.divergence.name} needs {need!r} teacher scores, but teacher {recipe.teacher.name!r} "
                f"provides only {', '.join(sorted(caps))}; choose a divergence that works from "
                f"{' or '.join(sorted(caps))} (e.g. estimator: sampled) or a teacher that gives {need!r}",
            ))
    if not preference:
        problems += _batch_problems(args, built)
    if device_check:
        problems += device_problems(recipe)
    return problems


def _ever_nonzero(schedule: Any) -> bool:
    return any(abs(schedule.value(s, 100)) > 0 for s in range(0, 101, 5))


def _batch_problems(args: dict[str, Any], built: dict[str, Any]) -> list[Problem]:
    num_gen = args.get("num_generations", 8)
    per_device = args.get("per_device_train_batch_size", 8)
    ga = args.get("gradient_accumulation_steps", 1)
    spg = args.get("steps_per_generation") or ga
    gen_batch = args.get("generation_batch_size") or per_device * spg
    problems = []
    if isinstance(num_gen, int) and isinstance(gen_batch, int) and num_gen > 0 and gen_batch % num_gen:
        problems.append(Problem(
            "trainer.args.num_generations",
            f"num_generations={num_gen} does not divide the generation batch of {gen_batch} completions "
            f"(per_device_train_batch_size={per_device} × steps_per_generation={spg}); set num_generations to a "
            f"divisor of {gen_batch} or change the batch size",
        ))
    adv = built.get("advantage")
    if adv is not None and isinstance(num_gen, int) and num_gen < adv.min_generations:
        problems.append(Problem(
            "trainer.args.num_generations",
            f"advantage {adv.name!r} needs groups of at least {adv.min_generations} completions per prompt, "
            f"got num_generations={num_gen}",
        ))
    check = getattr(adv, "num_generations_problem", None)
    message = check(num_gen) if check is not None and isinstance(num_gen, int) else None
    if message:
        problems.append(Problem("trainer.args.num_generations", message))
    return problems


def device_problems(recipe: Recipe) -> list[Problem]:
    """GPU-only options in a recipe, when this machine has no GPU."""
    import torch

    if torch.cuda.is_available():
        return []
    args = recipe.trainer.args if recipe.trainer is not None else {}
    problems = []
    for key in ("bf16", "fp16", "tf32", "use_vllm"):
        if args.get(key):
            problems.append(Problem(f"trainer.args.{key}", f"{key}: true needs a GPU and none is available here; set it to false on CPU"))
    for slot in ("teacher",):
        spec = getattr(recipe, slot, None)
        if spec is not None and str(spec.params.get("device", "")).startswith("cuda"):
            problems.append(Problem(f"{slot}.params.device", f"device {spec.params['device']!r} needs a GPU and none is available here"))
        if spec is not None and spec.params.get("quantization"):
            problems.append(Problem(f"{slot}.params.quantization", f"quantization {spec.params['quantization']!r} "
                                    "loads the weights through bitsandbytes, which needs a CUDA GPU; none is "
                                    "available here (remove it on CPU)"))
    return problems


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, pm: Any = None,
                device_check: bool = True) -> tuple[Recipe, Any]:
    """Read, override and validate a recipe file. Raises :class:`RecipeError` listing every problem."""
    raw = read_yaml(path)
    try:
        raw, origins = apply_overrides(raw, list(overrides or []))
    except RecipeError as exc:
        raise RecipeError(exc.problems, str(path)) from None
    return validate_recipe(raw, str(path), pm=pm, origins=origins, device_check=device_check)


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


__all__ = ["read_yaml", "apply_overrides", "validate_recipe", "load_recipe", "redact", "OPDError"]
