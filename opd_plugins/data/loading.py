"""Datasets from the Hugging Face hub or local files, brought into the framework's column layout.

The framework's columns: ``prompt`` (conversational), ``answer`` (str, for verifiable rewards and hints) and
``hint`` (privileged context). :func:`load_source` renames the dataset's own columns through
``DatasetSource.columns``, turns string prompts into chat messages and builds ``hint`` from ``answer``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opd_plugins.errors import DataError
from opd_plugins.recipe.schema import DEFAULT_HINT_TEMPLATE, DatasetSource

if TYPE_CHECKING:
    import datasets

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

# Column names that usually hold a framework column; used to suggest a `columns:` mapping.
_SYNONYMS = {
    "prompt": ("question", "problem", "query", "input", "instruction", "messages", "text", "content"),
    "answer": ("solution", "final_answer", "target", "output", "label", "response", "ground_truth", "gold"),
    "hint": ("privileged_context", "context", "rationale", "explanation"),
}


def check_columns(ds: Any, required: Sequence[str], source_desc: str) -> None:
    """Raise :class:`DataError` unless ``ds`` has every column in ``required``.

    The message names the source, the missing columns, the columns the dataset does have, and the ``columns:``
    mapping to add (a guess from common names when one fits).
    """
    available = list(ds.column_names or []) if not isinstance(ds, Mapping) else list(ds)
    missing = [c for c in required if c not in available]
    if not missing:
        return
    guesses = {}
    for column in missing:
        known = [c for c in _SYNONYMS.get(column, ()) if c in available]
        close = known or difflib.get_close_matches(column, available, n=1, cutoff=0.5)
        guesses[column] = close[0] if close else "<dataset column>"
    mapping = ", ".join(f"{k}: {v}" for k, v in guesses.items())
    raise DataError(
        f"{source_desc} is missing required column(s) {', '.join(missing)}; it has: "
        f"{', '.join(available) or '(no columns)'}. Map them with `columns: {{{mapping}}}` in the dataset source "
        f"(framework column: dataset column)."
    )


def looks_local(path: str) -> bool:
    """Whether ``path`` names a local file or directory rather than a hub id."""
    return (
        path.startswith(("/", "./", "../", "~"))
        or Path(path).suffix.lower() in _BUILDERS
        or os.path.exists(os.path.expanduser(path))
    )


def _load_raw(src: DatasetSource) -> datasets.Dataset:
    import datasets

    if not looks_local(src.path):
        try:
            return datasets.load_dataset(src.path, src.name, split=src.split, data_files=src.data_files)
        except Exception as e:  # the hub client raises many types (ConnectionError, DatasetNotFoundError, ...)
            raise DataError(
                f"could not load {src.describe()} from the Hugging Face hub: {type(e).__name__}: {e}. "
                f"(No network? Point `path` at a local .jsonl/.parquet/.csv file instead.)"
            ) from e

    path = Path(src.path).expanduser()
    if not path.exists():
        raise DataError(f"{src.describe()}: local path {str(path)!r} does not exist")
    try:
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if src.split not in loaded:
                    raise DataError(f"{src.describe()}: no split {src.split!r}; it has {', '.join(loaded)}")
                loaded = loaded[src.split]
            return loaded
        if path.is_dir():
            return datasets.load_dataset(str(path), src.name, split=src.split, data_files=src.data_files)
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(
                f"{src.describe()}: unsupported file type {path.suffix!r}; use one of {', '.join(sorted(_BUILDERS))}"
            )
        return datasets.load_dataset(builder, data_files={"train": str(path)}, split="train")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"could not read {src.describe()}: {type(e).__name__}: {e}") from e


def _to_messages(prompt: Any, system_prompt: str | None) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
    if system_prompt is not None and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def load_source(src: DatasetSource, required: Sequence[str] = ("prompt",)) -> datasets.Dataset:
    """Load ``src`` and bring it into the framework's layout; :class:`DataError` names anything missing.

    Steps: load (local file, local directory or hub), keep the first ``limit`` rows, rename ``columns``
    (framework column -> dataset column), make string prompts conversational (adding ``system_prompt`` unless the
    prompt already starts with a system message), turn ``answer`` into strings, build ``hint`` from
    ``hint_template`` when there is an ``answer`` but no ``hint``, then check ``required`` columns.
    """
    import datasets

    ds = _load_raw(src)
    desc = src.describe()
    if src.limit is not None and src.limit < len(ds):
        ds = ds.select(range(src.limit))

    source_columns = list(src.columns.values())
    absent = [c for c in source_columns if c not in ds.column_names]
    if absent:
        raise DataError(
            f"{desc}: `columns:` maps to {', '.join(map(repr, absent))}, which the dataset does not have; "
            f"it has: {', '.join(ds.column_names)}"
        )
    if len(set(source_columns)) != len(source_columns):
        raise DataError(f"{desc}: `columns:` maps two framework columns to the same dataset column: {src.columns}")
    renames = {theirs: ours for ours, theirs in src.columns.items() if theirs != ours}
    shadowed = [ours for ours in renames.values() if ours in ds.column_names and ours not in renames]
    if shadowed:  # the mapping wins over a same-named column the dataset already has
        ds = ds.remove_columns(shadowed)
    if renames:
        ds = ds.rename_columns(renames)

    columns = set(ds.column_names)
    first = ds[0] if len(ds) else {}
    if "prompt" in first and not isinstance(first["prompt"], str | list):
        raise DataError(
            f"{desc}: column 'prompt' must hold strings or lists of chat messages, got {type(first['prompt']).__name__}"
        )
    convert_prompt = "prompt" in columns and (isinstance(first.get("prompt"), str) or src.system_prompt is not None)
    convert_answer = "answer" in columns and not isinstance(first.get("answer", ""), str)
    add_hint = "answer" in columns and "hint" not in columns
    if add_hint and len(ds):
        _format_hint(src.hint_template, {**first, "answer": str(first["answer"])}, desc)  # fail before mapping
    if convert_prompt or convert_answer or add_hint:
        text = datasets.Value("string")
        features = ds.features.copy()
        if convert_prompt and isinstance(first.get("prompt"), str):
            features["prompt"] = datasets.List({"role": text, "content": text})
        if "answer" in columns:
            features["answer"] = text
        if add_hint:
            features["hint"] = text
        ds = ds.map(
            _standardize,
            fn_kwargs={
                "system_prompt": src.system_prompt,
                "hint_template": src.hint_template if add_hint else None,
                "convert_prompt": convert_prompt,
                "convert_answer": convert_answer or add_hint,
            },
            features=features,
            desc="Standardizing columns",
        )
    check_columns(ds, required, desc)
    return ds


def _standardize(
    row: dict[str, Any],
    system_prompt: str | None,
    hint_template: str | None,
    convert_prompt: bool,
    convert_answer: bool,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if convert_prompt:
        out["prompt"] = _to_messages(row["prompt"], system_prompt)
    if convert_answer:
        out["answer"] = "" if row["answer"] is None else str(row["answer"])
    if hint_template is not None:
        out["hint"] = hint_template.format(**{**row, **out})
    return out


def _format_hint(template: str, row: Mapping[str, Any], desc: str) -> str:
    try:
        return template.format(**row)
    except KeyError as e:
        raise DataError(
            f"{desc}: hint_template {template!r} uses field {e.args[0]!r}, which is not a column; "
            f"columns: {', '.join(row)}"
        ) from None
