"""Error types. User mistakes raise an :class:`OPDError` subclass; the CLI prints them without a traceback."""

from __future__ import annotations

from dataclasses import dataclass


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
