"""Data: built-in verifiable tasks (:mod:`.tasks`) and datasets from the hub or local files (:mod:`.loading`).

Importing this package is cheap: ``datasets`` and ``reasoning_gym`` are imported only when data is built.
"""

from __future__ import annotations

from opd_plugins.data.loading import DatasetSource, check_columns, load_source
from opd_plugins.data.tasks import (
    DEFAULT_HINT_TEMPLATE,
    TASKS,
    ArithmeticTask,
    ReasoningGymTask,
    Task,
    TaskParams,
    completion_text,
    extract_last_number,
    get_task,
    make_hint,
    make_reward_function,
    validate_task_params,
)

__all__ = [
    "DEFAULT_HINT_TEMPLATE",
    "TASKS",
    "ArithmeticTask",
    "DatasetSource",
    "ReasoningGymTask",
    "Task",
    "TaskParams",
    "check_columns",
    "completion_text",
    "extract_last_number",
    "get_task",
    "load_source",
    "make_hint",
    "make_reward_function",
    "validate_task_params",
]
