"""The task contract: a verifiable task is a component (kind ``task``) that builds prompts and scores answers.

Every row a task builds has the columns the rest of the framework relies on:

* ``prompt``: conversational, ``[{"role": "user", "content": question}]``;
* ``answer``: the reference answer, a string;
* ``hint``: privileged context for self-distillation teachers, e.g. ``"(Hint: the correct answer is 42.)"``;
* ``task``: the task's name;
* ``metadata``: a JSON string with whatever the task needs to score an answer (reasoning-gym's entry metadata).

``train`` and ``eval`` splits never share a problem, and the same ``(split, size, seed)`` always gives the same
rows. A larger ``size`` extends a smaller one (the first ``n`` rows do not change). A plugin adds a task by
registering a :class:`Task` subclass through ``opd_register_components``; recipes name it in ``data.task``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from opd_plugins.components import Component, ComponentParams
from opd_plugins.errors import DataError
from opd_plugins.tasks.answers import encode_metadata, make_hint

if TYPE_CHECKING:
    import datasets

Split = Literal["train", "eval"]
AnswerFormat = Literal["free", "number_only"]


class TaskParams(ComponentParams):
    """Base for task parameters: unknown keys are an error, instances are immutable."""


class Task(Component):
    """A source of verifiable problems: builds ``train``/``eval`` datasets and scores completions against answers.

    Problems the params model cannot see (an unknown upstream dataset, say) are reported by
    :meth:`~opd_plugins.components.Component.problems`, which must build nothing. ``builds_prompts`` is False for
    a task that only scores a dataset's rows (``numeric_answer``).
    """

    kind: ClassVar[str] = "task"
    Params: ClassVar[type[TaskParams]] = TaskParams
    builds_prompts: ClassVar[bool] = True

    def __init__(self, params: TaskParams | Mapping[str, Any] | None = None) -> None:
        if params is not None and not isinstance(params, self.Params):
            params = self.Params.model_validate(dict(params))
        super().__init__(params)

    @abstractmethod
    def build(self, split: Split, size: int, seed: int) -> datasets.Dataset:
        """``size`` rows of ``split``; deterministic in ``(split, size, seed)``; train and eval never overlap."""

    @abstractmethod
    def score(self, completion: str, answer: str, metadata: str | Mapping[str, Any] | None = None) -> float:
        """1.0 when ``completion`` answers correctly, else 0.0. ``metadata`` is the row's ``metadata`` column."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"

    # helpers for subclasses ------------------------------------------------------------------------------------------

    def _check_split_and_size(self, split: str, size: int) -> None:
        if split not in ("train", "eval"):
            raise DataError(f"{self.name} task: split must be 'train' or 'eval', got {split!r}")
        if not isinstance(size, int) or size < 0:
            raise DataError(f"{self.name} task: size must be a non-negative integer, got {size!r}")

    def _row(self, question: str, answer: str, metadata: Mapping[str, Any], solution: str = "") -> dict[str, Any]:
        return {
            "prompt": [{"role": "user", "content": question}],
            "answer": answer,
            "hint": make_hint(answer),
            "task": self.name,
            "metadata": encode_metadata(metadata),
            "solution": solution,
        }


def rows_to_dataset(rows: list[dict[str, Any]]) -> datasets.Dataset:
    """A dataset with the standard task columns (the schema holds even when ``rows`` is empty). ``solution`` is a
    worked reference solution where the task can write one ("" otherwise): what hint/prefix samplers reveal."""
    import datasets

    text = datasets.Value("string")
    features = datasets.Features(
        {
            "prompt": datasets.List({"role": text, "content": text}),
            "answer": text,
            "hint": text,
            "task": text,
            "metadata": text,
            "solution": text,
        }
    )
    columns = {name: [row[name] for row in rows] for name in features}
    return datasets.Dataset.from_dict(columns, features=features)
