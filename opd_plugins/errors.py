"""Error types. User mistakes raise an :class:`OPDError` subclass; the CLI prints them without a traceback."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError


class OPDError(Exception):
    """Base class for every error that is the user's (or a plugin author's) to fix."""


@dataclass(frozen=True)
class Problem:
    """One validation problem: where (a dotted YAML key path) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class RecipeError(OPDError):
    """A recipe (or the command-line overrides applied to it) is invalid.

    Carries every problem found, so the user fixes them all in one go.
    """

    def __init__(self, problems: list[Problem] | Problem | str, source: str | None = None) -> None:
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = list(problems)
        self.source = source or "<recipe>"
        n = len(self.problems)
        head = f"{self.source} has {n} problem{'s' if n != 1 else ''}:"
        body = "\n".join("  " + str(p).replace("\n", "\n    ") for p in self.problems)
        super().__init__(f"{head}\n{body}")


class PluginLoadError(OPDError):
    """A plugin could not be loaded or registered (import failure, bad hookimpl, duplicate name)."""


class PluginError(OPDError):
    """A plugin's hook implementation raised while it was called."""


class ComponentNotFound(OPDError):
    """No component of that kind is registered under that name."""


class DataError(OPDError):
    """A dataset or task is missing, malformed, or lacks the columns a component needs."""


class ModelLoadError(OPDError):
    """A model or tokenizer could not be found or does not fit the recipe (e.g. vocab mismatch)."""


class TeacherError(OPDError):
    """A teacher returned missing, misaligned or non-finite scores."""


class TrainingError(OPDError):
    """Training stopped before an optimizer step because its numbers are not finite (a loss term, a gradient)."""


# ---------------------------------------------------------------------------------------------------------------
# Message helpers shared by the registry, the recipe loader and components (one wording everywhere)
# ---------------------------------------------------------------------------------------------------------------


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" Did you mean 'x'?"`` for the closest choice (also when one part of a compound name is misspelt:
    ``alpah`` → ``lora_alpha``), or ``""``."""
    choices = list(choices)
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    if not close:
        parts = {part: name for name in choices for part in name.split("_") if len(part) > 3}
        close = [parts[m] for m in difflib.get_close_matches(str(word), list(parts), n=1, cutoff=0.75)]
    return f" Did you mean {close[0]!r}?" if close else ""


def fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Allowed keys of the pydantic model reached by following ``loc`` from ``model`` (best effort)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return []
        ann = current.model_fields[part].annotation
        current = None
        for arg in (ann, *typing.get_args(ann)):
            for sub in (arg, *typing.get_args(arg)):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    current = sub
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def pydantic_problems(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> list[Problem]:
    """One :class:`Problem` per pydantic error, with its dotted YAML path below ``prefix``: unknown keys get a
    did-you-mean and the allowed keys, wrong values show what was given."""
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join([prefix, *map(str, loc)] if prefix else map(str, loc))
        if err["type"] == "extra_forbidden":
            allowed = fields_at(model, loc[:-1])
            msg = f"unknown key {str(loc[-1])!r}.{did_you_mean(str(loc[-1]), allowed)}"
            if allowed:
                msg += f" Allowed keys: {', '.join(allowed)}"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            if "input" in err and not isinstance(err["input"], dict):
                msg += f" [got {err['input']!r}]"
        problems.append(Problem(path, msg))
    return problems
