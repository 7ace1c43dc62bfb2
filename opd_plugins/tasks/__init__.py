"""Built-in verifiable tasks (component kind ``task``) and the reward function that scores completions with one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opd_plugins.errors import DataError
from opd_plugins.markers import hookimpl
from opd_plugins.tasks.answers import completion_text
from opd_plugins.tasks.arithmetic import ArithmeticTask
from opd_plugins.tasks.base import Task, TaskParams
from opd_plugins.tasks.numeric_answer import NumericAnswerTask
from opd_plugins.tasks.reasoning_gym import ReasoningGymTask


@hookimpl
def opd_register_components():
    return [ArithmeticTask, ReasoningGymTask, NumericAnswerTask]


def make_reward_function(task: Task) -> Callable[..., list[float]]:
    """A reward function for TRL's ``GRPOTrainer(reward_funcs=...)`` that scores completions with ``task``.

    Signature ``(prompts, completions, answer, **kwargs) -> list[float]``; completions may be strings or
    conversational. Uses the ``metadata`` column when the dataset has one. TRL logs it as
    ``rewards/<task.name>_correct/mean``.
    """

    def reward(prompts: list[Any], completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
        if len(completions) != len(answer):
            raise DataError(f"{task.name} reward: {len(completions)} completions but {len(answer)} answers")
        metadata = kwargs.get("metadata") or [None] * len(answer)
        return [
            task.score(completion_text(c), str(a), m) for c, a, m in zip(completions, answer, metadata, strict=True)
        ]

    reward.__name__ = reward.__qualname__ = f"{task.name}_correct"
    return reward


__all__ = ["ArithmeticTask", "NumericAnswerTask", "ReasoningGymTask", "Task", "TaskParams", "make_reward_function"]
