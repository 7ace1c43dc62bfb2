"""``numeric_answer``: scores dataset rows whose reference answer ends with a number (GSM8K's ``#### 72``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from opd_plugins.errors import DataError
from opd_plugins.tasks.answers import as_decimal, extract_last_number
from opd_plugins.tasks.base import Split, Task

if TYPE_CHECKING:
    import datasets


class NumericAnswerTask(Task):
    """Scores dataset rows whose reference answer ends with a number (GSM8K's ``... #### 72``, ``42``, ``3.5``).

    It generates no prompts: use it as ``data.task`` next to ``data.dataset``. Correct when the last number in
    the completion equals the last number in the reference answer.
    """

    name: ClassVar[str] = "numeric_answer"
    builds_prompts: ClassVar[bool] = False

    def build(self, split: Split, size: int, seed: int) -> datasets.Dataset:
        raise DataError(
            "task 'numeric_answer' only scores rows: give it together with data.dataset (rows from a file or the hub)"
        )

    def score(self, completion: str, answer: str, metadata: str | Mapping[str, Any] | None = None) -> float:
        got, want = as_decimal(extract_last_number(completion)), as_decimal(extract_last_number(str(answer)))
        return 1.0 if got is not None and want is not None and got == want else 0.0
