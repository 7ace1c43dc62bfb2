"""Tasks by name: the built-in verifiable tasks (:mod:`opd_plugins.tasks`) and those plugins register.

Tasks are components of kind ``task``; this module keeps the helpers code uses to get one without a recipe:
:func:`get_task`, :func:`validate_task_params`, :func:`make_reward_function`, and :data:`TASKS` (the built-ins).
A recipe's ``data.task`` is validated and built by the registry like any component.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opd_plugins.components import ComponentSpec
from opd_plugins.errors import DataError
from opd_plugins.recipe.schema import DEFAULT_HINT_TEMPLATE
from opd_plugins.tasks import make_reward_function
from opd_plugins.tasks.answers import (
    ANSWER_ONLY_SUFFIX,
    NUMBER_ONLY_SUFFIX,
    completion_text,
    decode_metadata,
    encode_metadata,
    extract_last_number,
    make_hint,
)
from opd_plugins.tasks.arithmetic import EVAL_MODULUS, ArithmeticParams, ArithmeticTask
from opd_plugins.tasks.base import AnswerFormat, Split, Task, TaskParams, rows_to_dataset
from opd_plugins.tasks.numeric_answer import NumericAnswerTask
from opd_plugins.tasks.reasoning_gym import EVAL_SEED_OFFSET, ReasoningGymParams, ReasoningGymTask

TASKS: dict[str, type[Task]] = {
    ArithmeticTask.name: ArithmeticTask, ReasoningGymTask.name: ReasoningGymTask, NumericAnswerTask.name: NumericAnswerTask,
}
"""The built-in tasks by name (plugins' tasks are in the registry: ``get_plugin_manager().registry.names("task")``)."""


def _registry(tasks: Mapping[str, type[Task]] | None) -> Any:
    from opd_plugins.manager import get_plugin_manager
    from opd_plugins.registry import ComponentRegistry, PluginInfo

    if tasks is None:
        return get_plugin_manager().registry
    registry = ComponentRegistry()
    for cls in tasks.values():
        registry.register(cls, PluginInfo("tasks", "tasks"))
    return registry


def validate_task_params(name: str, params: Mapping[str, Any] | None,
                         tasks: Mapping[str, type[Task]] | None = None) -> list[str]:
    """Every problem with ``{name, params}`` as readable strings (``"params.digits: ..."``); builds no data.
    ``tasks`` limits the lookup to those classes (default: every registered task)."""
    if params is not None and not isinstance(params, Mapping):
        return [f"params: must be a mapping, got {type(params).__name__}"]
    problems = _registry(tasks).problems("task", ComponentSpec(name=name, params=dict(params or {})))
    return [p.message if p.path == "name" else str(p) for p in problems]


def get_task(name: str, params: Mapping[str, Any] | None = None, tasks: Mapping[str, type[Task]] | None = None) -> Task:
    """The task registered as ``name``, built from ``params``; :class:`DataError` lists every problem."""
    problems = validate_task_params(name, params, tasks)
    if len(problems) == 1:
        raise DataError(f"task {name!r}: {problems[0]}")
    if problems:
        raise DataError(f"task {name!r} has {len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems))
    return _registry(tasks).build("task", ComponentSpec(name=name, params=dict(params or {})))


__all__ = [
    "ANSWER_ONLY_SUFFIX", "DEFAULT_HINT_TEMPLATE", "EVAL_MODULUS", "EVAL_SEED_OFFSET", "NUMBER_ONLY_SUFFIX", "TASKS",
    "AnswerFormat", "ArithmeticParams", "ArithmeticTask", "NumericAnswerTask", "ReasoningGymParams",
    "ReasoningGymTask", "Split", "Task", "TaskParams", "completion_text", "decode_metadata", "encode_metadata",
    "extract_last_number", "get_task", "make_hint", "make_reward_function", "rows_to_dataset",
    "validate_task_params",
]
