"""``trainer.args``: the field names of a trainer's config class, cached so that ``validate`` stays fast.

Importing TRL takes seconds; the names of a config dataclass's fields are cached as JSON in the user cache under a
key that changes with the versions (and, for our own config classes, their source), so ``validate`` imports TRL
only once per version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from opd_plugins.errors import Problem, did_you_mean
from opd_plugins.paths import atomic_write, cache_dir


def cached_field_names(key: str, load: Callable[[], type]) -> set[str]:
    """The field names of the dataclass ``load()`` returns, cached as JSON under ``key`` in the user cache."""
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
    nor in ``allowed``; ``output_dir`` is always refused (the recipe's top-level ``output_dir`` sets it).
    ``explain(key)`` may add why a key does not belong (e.g. it is another trainer's option)."""
    allowed = set(allowed)
    problems = []
    for key in args:
        path = f"trainer.args.{key}"
        if key == "output_dir":
            problems.append(Problem(path, "set the top-level output_dir instead"))
        elif key not in fields and key not in allowed:
            why = explain(key) if explain is not None else ""
            problems.append(Problem(path, f"{why or 'unknown trainer argument'}."
                                          f"{did_you_mean(key, sorted(fields | allowed))}"))
    return problems


__all__ = ["cached_field_names", "name_problems", "versions_key"]
