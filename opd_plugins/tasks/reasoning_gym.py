"""``reasoning_gym``: any of reasoning-gym's procedural datasets, scored by the dataset's own checker."""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from opd_plugins.errors import DataError
from opd_plugins.tasks.answers import (
    ANSWER_ONLY_SUFFIX,
    ANSWER_PREFIX_RE,
    ANSWER_TAG_RE,
    NUMBER_ONLY_SUFFIX,
    as_decimal,
    decode_metadata,
    extract_last_number,
    is_number,
)
from opd_plugins.tasks.arithmetic import EVAL_MODULUS, _question_in_eval
from opd_plugins.tasks.base import AnswerFormat, Split, Task, TaskParams, rows_to_dataset

if TYPE_CHECKING:
    import datasets

EVAL_SEED_OFFSET = 1_000_003
"""The eval split of seed ``s`` is drawn from reasoning-gym seed ``s + EVAL_SEED_OFFSET``."""

_RG_CHUNK = 1000  # rows per reasoning-gym dataset instance; the stream is a chain of these, so it never depends on size


class ReasoningGymParams(TaskParams):
    dataset: str = Field(description="A reasoning-gym dataset name, e.g. chain_sum, basic_arithmetic, countdown.")
    config: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the dataset's config.")
    answer_format: AnswerFormat = Field(
        "free", description=f"number_only appends {NUMBER_ONLY_SUFFIX!r} (or {ANSWER_ONLY_SUFFIX!r} for text answers)."
    )


def _reasoning_gym_registry() -> dict[str, tuple[type, type]]:
    from reasoning_gym.factory import DATASETS

    return DATASETS


class ReasoningGymTask(Task):
    """Any of reasoning-gym's procedural datasets (chain_sum, basic_arithmetic, countdown, gsm_symbolic, ...),
    scored by the dataset's own ``score_answer``.

    The splits come from different seeds (``seed`` and ``seed + EVAL_SEED_OFFSET``) and, like arithmetic, are
    partitioned by a hash of the question text: a question is eval-only iff its hash is divisible by
    :data:`EVAL_MODULUS`. So no eval question can ever appear in a train split, whatever the sizes and seeds (small
    problem spaces such as 1-digit ``chain_sum`` repeat questions often). Repeated questions within a split are
    dropped too.
    """

    name: ClassVar[str] = "reasoning_gym"
    Params: ClassVar[type[TaskParams]] = ReasoningGymParams
    params: ReasoningGymParams

    @classmethod
    def example_params(cls) -> ReasoningGymParams:
        return ReasoningGymParams(dataset="chain_sum", config={"min_terms": 2, "max_terms": 2, "max_digits": 2})

    def problems(self) -> list[tuple[str, str]]:
        """An unknown dataset, reserved config keys, or a config the dataset refuses (nothing is built)."""
        params = self.params
        registry = _reasoning_gym_registry()
        if params.dataset not in registry:
            close = difflib.get_close_matches(params.dataset, list(registry), n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            return [("dataset", f"unknown reasoning-gym dataset {params.dataset!r}.{hint} "
                     f"({len(registry)} available, e.g. {', '.join(sorted(registry)[:8])}, ...)")]
        reserved = sorted({"seed", "size"} & set(params.config))
        if reserved:
            return [("config", f"{', '.join(reserved)} are set by the task from the split; remove them")]
        _, config_cls = registry[params.dataset]
        try:
            config = config_cls(**params.config)
            if hasattr(config, "validate"):
                config.validate()
        except TypeError as e:
            fields = getattr(config_cls, "__dataclass_fields__", {})
            valid = ", ".join(f for f in fields if f not in ("seed", "size"))
            return [("config", f"{e} (valid keys for {params.dataset}: {valid})")]
        except (AssertionError, ValueError) as e:
            return [("config", f"invalid config for {params.dataset}: {e}")]
        return []

    def _ensure_valid(self) -> None:
        problems = self.problems()
        if problems:
            raise DataError("reasoning_gym task: " + "; ".join(f"params.{path}: {msg}" for path, msg in problems))

    def _stream(self, seed: int) -> Iterator[dict[str, Any]]:
        import reasoning_gym

        for chunk in itertools.count():
            ds = reasoning_gym.create_dataset(
                self.params.dataset, size=_RG_CHUNK, seed=seed + chunk * _RG_CHUNK, **self.params.config
            )
            for i in range(_RG_CHUNK):
                yield ds[i]

    def _unique(self, split: str, seed: int, size: int) -> tuple[list[dict[str, Any]], int]:
        want_eval = split == "eval"
        seen: set[str] = set()
        rows: list[dict[str, Any]] = []
        draws = 0
        for entry in itertools.islice(self._stream(seed), 20 * size + 1000 if size else 0):
            if len(rows) == size:
                break
            draws += 1
            question = entry["question"]
            if question in seen or _question_in_eval(question) != want_eval:
                continue
            seen.add(question)
            rows.append(entry)
        return rows, draws

    def build(self, split: Split, size: int, seed: int) -> datasets.Dataset:
        self._check_split_and_size(split, size)
        self._ensure_valid()
        entries, draws = self._unique(split, seed if split == "train" else seed + EVAL_SEED_OFFSET, size)
        if len(entries) < size:
            raise DataError(
                f"reasoning_gym task {self.params.dataset!r} with config {self.params.config}: found only "
                f"{len(entries)} distinct {split} questions in {draws} draws, but size={size} was requested. The "
                f"problem space is too small: lower the size or widen the config."
            )
        rows = []
        for entry in entries:
            answer = "" if entry["answer"] is None else str(entry["answer"])
            question = entry["question"]
            if self.params.answer_format == "number_only":
                question = f"{question} {NUMBER_ONLY_SUFFIX if is_number(answer) else ANSWER_ONLY_SUFFIX}"
            row = self._row(question, answer, entry.get("metadata") or {})
            if not answer:  # datasets with many valid answers (graph_color, rush_hour, ...) have no reference
                row["hint"] = ""
            rows.append(row)
        return rows_to_dataset(rows)

    def _dataset(self) -> Any:
        """A reasoning-gym dataset instance, only used for its ``score_answer``."""
        if getattr(self, "_scorer", None) is None:
            import reasoning_gym

            self._ensure_valid()
            self._scorer = reasoning_gym.create_dataset(
                self.params.dataset, size=_RG_CHUNK, seed=0, **self.params.config
            )
        return self._scorer

    @staticmethod
    def answer_candidates(completion: str, reference: str) -> list[str]:
        """What may be handed to reasoning-gym's ``score_answer``, which expects the bare answer (best first).

        1. If the completion has ``<answer>...</answer>`` tags, only the last tagged text is considered.
        2. Numeric reference: the last number in that text (commas removed). If it equals the reference numerically
           (``"12.0"`` vs ``"12"``), the reference's own spelling is passed on.
        3. Reference of N > 1 lines (grids, move lists): the last N lines, without a leading "Answer:".
        4. Otherwise the last non-empty line, without a leading "Answer:" / "The final answer is" and surrounding
           ``*``, backticks or quotes; tried without and then with a trailing period.

        The score is the best over the candidates, so a completion never gets credit that one of these strings
        would not get on its own.
        """
        tagged = ANSWER_TAG_RE.findall(completion)
        text = tagged[-1] if tagged else completion
        if is_number(reference):
            number = extract_last_number(text)
            if number is None:
                return []
            return [reference if as_decimal(number) == as_decimal(reference) else number]
        reference_lines = reference.strip("\n").splitlines()
        if len(reference_lines) > 1:
            lines = text.strip("\n").rstrip().splitlines()[-len(reference_lines) :]
            if not lines:
                return []
            lines[0] = ANSWER_PREFIX_RE.sub("", lines[0].lstrip("*` \t"))
            return ["\n".join(lines)]
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            return []
        line = ANSWER_PREFIX_RE.sub("", lines[-1].strip("*`'\" \t")).strip("*`'\" \t")
        candidates = [line.removesuffix(".").strip(), line]
        return [c for i, c in enumerate(candidates) if c and c not in candidates[:i]]

    @classmethod
    def extract_answer(cls, completion: str, reference: str) -> str | None:
        """The first of :meth:`answer_candidates`, or None."""
        candidates = cls.answer_candidates(completion, reference)
        return candidates[0] if candidates else None

    def score(self, completion: str, answer: str, metadata: str | Mapping[str, Any] | None = None) -> float:
        entry = {"question": "", "answer": answer, "metadata": decode_metadata(metadata)}
        scorer = self._dataset()
        for candidate in self.answer_candidates(completion, answer):
            try:
                value = scorer.score_answer(candidate, entry)
            except Exception:  # reasoning-gym scorers may raise on malformed answers: that is a wrong answer
                continue
            if value is not None and value >= 1.0:
                return 1.0
        return 0.0
