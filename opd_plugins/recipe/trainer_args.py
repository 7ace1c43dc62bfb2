"""``trainer.args``: the fields of a trainer's config class (names, types, defaults), cached so that ``validate``
stays fast, and the checks of the values given for them.

Importing TRL takes seconds; the fields of a config dataclass are cached as JSON in the user cache under a key that
changes with the versions (and, for our own config classes, their source), so ``validate`` imports TRL only once
per version. Values are checked against the field's annotation (a number where a number belongs, one of the
choices of an enum field) and against :data:`RANGES` (the bounds of the options that matter most: learning rate,
batch sizes, steps, temperatures, ...), so a wrong value is refused before anything loads rather than after the
model has.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import math
import sys
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from opd_plugins.errors import Problem, did_you_mean
from opd_plugins.paths import atomic_write, cache_dir

FieldInfo = dict[str, Any]
"""What is cached per field: ``{"types": [...], "choices": [...] | None, "default": ...}``; ``types`` holds
``bool``, ``int``, ``float``, ``str``, ``list``, ``dict``, ``none`` or ``any``."""


FIELDS_FORMAT = 3
"""Changes when :func:`describe_fields` describes fields differently (old cache files are then ignored)."""


def cached_fields(key: str, load: Callable[[], type]) -> dict[str, FieldInfo]:
    """The fields of the dataclass ``load()`` returns (:data:`FieldInfo` per name), cached as JSON under ``key``
    in the user cache."""
    path = cache_dir() / f"{key}-fields{FIELDS_FORMAT}.json"
    try:
        cached = json.loads(path.read_text())
        if isinstance(cached, dict) and all(isinstance(v, dict) and "types" in v for v in cached.values()):
            return cached
    except (OSError, ValueError):
        pass
    # Importing the trainers loads third-party modules that may print at import time (transformers prints
    # "[INFO] Running in WANDB offline mode" under WANDB_MODE=offline): keep that off stdout, which is the result
    # of commands such as ``validate``.
    with contextlib.redirect_stdout(sys.stderr):
        cls = load()
    fields = describe_fields(cls)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(fields, sort_keys=True), fsync=False)
    except OSError:
        pass  # a read-only cache only costs time
    return fields


def cached_field_names(key: str, load: Callable[[], type]) -> set[str]:
    """The field names of the dataclass ``load()`` returns (from :func:`cached_fields`)."""
    return set(cached_fields(key, load))


def describe_fields(cls: type) -> dict[str, FieldInfo]:
    """:data:`FieldInfo` for every field of a dataclass, from its (resolved) annotations."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: that field is then not type-checked
        hints = {}
    out: dict[str, FieldInfo] = {}
    for f in dataclasses.fields(cls):
        kinds: set[str] = set()
        choices: list[Any] = []
        _atoms(hints.get(f.name, Any), kinds, choices)
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, enum.Enum):
            default = default.value
        out[f.name] = {"types": sorted(kinds), "choices": choices or None,
                       "default": default if isinstance(default, (bool, int, float, str, type(None))) else None}
    return out


def _atoms(tp: Any, kinds: set[str], choices: list[Any]) -> None:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            _atoms(arg, kinds, choices)
    elif origin is typing.Literal:
        for value in typing.get_args(tp):
            kinds.add("none" if value is None else type(value).__name__)
            if value is not None and value not in choices:
                choices.append(value)
    elif tp is type(None) or tp is None:
        kinds.add("none")
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        kinds.add("str")
        choices.extend(m.value for m in tp if m.value not in choices)
    elif tp in (bool, int, float, str):
        kinds.add(tp.__name__)
    elif tp in (list, tuple) or origin in (list, tuple):
        kinds.add("list")
        for arg in typing.get_args(tp):  # TRL and transformers wrap a single value: `loss_type: ipo`
            if arg is not Ellipsis:
                _atoms(arg, kinds, choices)
    elif tp is dict or origin is dict:
        kinds.add("dict")
    else:
        kinds.add("any")


def versions_key(*packages: str, sources: Iterable[Path] = ()) -> str:
    """``opd-plugins version-trl version-...-<digest of sources>``: a cache key for config field names."""
    from importlib import metadata

    from opd_plugins.markers import __version__

    digest = hashlib.sha1()
    for src in sources:
        digest.update(src.read_bytes() if src.exists() else b"none")
    return "-".join([__version__, *(metadata.version(p) for p in packages), digest.hexdigest()[:10]])


def name_problems(args: dict[str, Any], fields: set[str], *, explain: Callable[[str], str] | None = None,
                  allowed: Iterable[str] = ()) -> list[Problem]:
    """``trainer.args.<key>: unknown trainer argument`` (with did-you-mean) for every key that is neither a field
    nor in ``allowed``; ``output_dir`` and ``seed`` are always refused (the recipe's top-level keys set them).
    ``explain(key)`` may add why a key does not belong (e.g. it is another trainer's option)."""
    allowed = set(allowed)
    problems = []
    for key in args:
        path = f"trainer.args.{key}"
        if key in ("output_dir", "seed"):
            problems.append(Problem(path, f"set the top-level {key} instead (the recipe's {key} sets the trainer's)"))
        elif key not in fields and key not in allowed:
            why = explain(key) if explain is not None else ""
            problems.append(Problem(path, f"{why or 'unknown trainer argument'}."
                                          f"{did_you_mean(key, sorted(fields | allowed))}"))
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------------


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


def _unit(v: float) -> bool:
    return 0 <= v <= 1


def _open_unit(v: float) -> bool:
    return 0 < v <= 1


def _below_one(v: float) -> bool:
    return 0 <= v < 1


RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "learning_rate": (_positive, "> 0"),
    "per_device_train_batch_size": (_positive, ">= 1"),
    "per_device_eval_batch_size": (_positive, ">= 1"),
    "gradient_accumulation_steps": (_positive, ">= 1"),
    "max_steps": (lambda v: v > 0 or v == -1, ">= 1 (or -1: train num_train_epochs)"),
    "num_train_epochs": (_positive, "> 0"),
    "logging_steps": (_positive, "> 0"),
    "save_steps": (_positive, "> 0"),
    "eval_steps": (_positive, "> 0"),
    "save_total_limit": (_positive, ">= 1"),
    "warmup_steps": (_non_negative, ">= 0"),
    "warmup_ratio": (_unit, "in [0, 1]"),
    "weight_decay": (_non_negative, ">= 0"),
    "adam_beta1": (_below_one, "in [0, 1)"),
    "adam_beta2": (_below_one, "in [0, 1)"),
    "adam_epsilon": (_positive, "> 0"),
    "max_grad_norm": (_non_negative, ">= 0 (0 = no clipping)"),
    "dataloader_num_workers": (_non_negative, ">= 0"),
    "num_generations": (_positive, ">= 1"),
    "generation_batch_size": (_positive, ">= 1"),
    "steps_per_generation": (_positive, ">= 1"),
    "num_iterations": (_positive, ">= 1"),
    "max_completion_length": (_positive, ">= 1"),
    "max_prompt_length": (_positive, ">= 1"),
    "max_length": (_positive, ">= 1"),
    "temperature": (_positive, "> 0"),
    "top_p": (_open_unit, "in (0, 1]"),
    "top_k": (_non_negative, ">= 0 (0 = no top-k truncation)"),
    "min_p": (_unit, "in [0, 1]"),
    "repetition_penalty": (_positive, "> 0"),
    "beta": (_non_negative, ">= 0"),
    "epsilon": (_non_negative, ">= 0"),
    "epsilon_high": (_non_negative, ">= 0"),
    "delta": (_positive, "> 0"),
    "top_entropy_quantile": (_open_unit, "in (0, 1]"),
    "label_smoothing": (_below_one, "in [0, 1)"),
}
"""Bounds of the numeric options that matter most (any trainer config that has them); every number must also be
finite."""


def _number(value: Any, kinds: list[str]) -> Any:
    """``value`` as the number a numeric field takes (a numeric-looking string converted), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip().replace("_", ""))
        except ValueError:
            return None
    if not isinstance(value, (int, float)):
        return None
    if "float" in kinds:
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    return value


def coerce_value(value: Any, info: FieldInfo) -> Any:
    """``value`` for a field described by ``info``: a numeric-looking string (``"1e-4"``), or an integral float
    for an ``int`` field, becomes the number; anything else is returned unchanged."""
    kinds = info.get("types") or []
    if isinstance(value, (str, float)) and not isinstance(value, bool) and ({"int", "float"} & set(kinds)):
        if isinstance(value, str) and "str" in kinds:
            return value
        number = _number(value, kinds)
        if number is not None:
            return number
    return value


def coerce_values(args: dict[str, Any], fields: dict[str, FieldInfo]) -> dict[str, Any]:
    """``args`` with every value converted by :func:`coerce_value` (keys that are not fields unchanged)."""
    return {k: coerce_value(v, fields[k]) if k in fields else v for k, v in args.items()}


def value_problems(args: dict[str, Any], fields: dict[str, FieldInfo], *,
                   ranges: dict[str, tuple[Callable[[float], bool], str]] | None = None) -> list[Problem]:
    """``trainer.args.<key>: ...`` for every value that does not fit its field: of the wrong type (a string where
    a number belongs, a list where a flag does), not one of an enum field's choices, not finite, or outside
    :data:`RANGES`. Numeric-looking strings are read as numbers (:func:`coerce_value`)."""
    ranges = RANGES if ranges is None else ranges
    problems = []
    for key, raw in args.items():
        info = fields.get(key)
        if info is None:
            continue  # unknown names are name_problems' business
        path, kinds = f"trainer.args.{key}", set(info.get("types") or [])
        value = coerce_value(raw, info)
        message = _type_problem(value, kinds, info.get("choices"))
        if message is None and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                message = "must be a finite number"
            elif key in ranges and not ranges[key][0](value):
                message = f"must be {ranges[key][1]}"
        if message:
            problems.append(Problem(path, f"{message} [got {raw!r}]"))
    return problems


_NAMES = {"bool": "true", "int": "an integer", "float": "a number", "str": "a string", "list": "a list",
          "dict": "a mapping", "none": "null"}


def _type_problem(value: Any, kinds: set[str], choices: list[Any] | None) -> str | None:
    if not kinds or "any" in kinds:
        return None
    if value is None:
        return None if "none" in kinds else f"must be {_expected(kinds)}, not null"
    if isinstance(value, bool):
        ok = "bool" in kinds
    elif isinstance(value, int):
        ok = bool(kinds & {"int", "float"})
    elif isinstance(value, float):
        ok = "float" in kinds
    elif isinstance(value, str):
        ok = "str" in kinds
        if ok and choices and value not in choices and not kinds & {"int", "float", "bool"}:
            return (f"unknown value {value!r}.{did_you_mean(value, [str(c) for c in choices])} "
                    f"Choices: {', '.join(map(str, choices))}")
    elif isinstance(value, (list, tuple)):
        ok = "list" in kinds
    elif isinstance(value, dict):
        ok = "dict" in kinds
    else:
        ok = False
    return None if ok else f"must be {_expected(kinds)}"


def _expected(kinds: set[str]) -> str:
    if "float" in kinds:
        kinds = kinds - {"int"}
    names = [_NAMES[k] for k in ("float", "int", "bool", "str", "list", "dict", "none") if k in kinds]
    if "bool" in kinds:
        names.insert(names.index("true") + 1, "false")
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else (names or ["another type"])[0]


__all__ = ["RANGES", "cached_field_names", "cached_fields", "coerce_value", "coerce_values", "describe_fields",
           "name_problems", "value_problems", "versions_key"]
