"""Built-in verifiable tasks: datasets of questions with a checkable answer, and the reward that checks them.

Every row a task builds has the columns the rest of the framework relies on:

* ``prompt``: conversational, ``[{"role": "user", "content": question}]``;
* ``answer``: the reference answer, a string;
* ``hint``: privileged context for self-distillation teachers, e.g. ``"(Hint: the correct answer is 42.)"``;
* ``task``: the task's name;
* ``metadata``: a JSON string with whatever the task needs to score an answer (reasoning-gym's entry metadata).

``train`` and ``eval`` splits never share a problem, and the same ``(split, size, seed)`` always gives the same
rows. A larger ``size`` extends a smaller one (the first ``n`` rows do not change).
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import random
import re
import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from opd_plugins.errors import DataError

if TYPE_CHECKING:
    import datasets

Split = Literal["train", "eval"]
AnswerFormat = Literal["free", "number_only"]

DEFAULT_HINT_TEMPLATE = "(Hint: the correct answer is {answer}.)"
NUMBER_ONLY_SUFFIX = "Reply with just the number."
ANSWER_ONLY_SUFFIX = "Reply with just the answer."

# A number as people write it: optional minus (ASCII or U+2212), digits with optional thousands commas, optional
# decimals. A minus directly after a letter or digit is a hyphen ("5-3" ends in 3, not -3); digits glued to a letter
# ("mul1") are not numbers.
_NUMBER_RE = re.compile(r"(?<![\w.])[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)", re.ASCII)
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_ANSWER_PREFIX_RE = re.compile(r"^(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:=]?\s*", re.IGNORECASE)


# --------------------------------------------------------------------------------------------------------------------
# Answer extraction (shared by tasks and third-party rewards)
# --------------------------------------------------------------------------------------------------------------------


def extract_last_number(text: str) -> str | None:
    """The last number in ``text``, normalised (thousands commas removed, U+2212 minus made ASCII), or None.

    ``"so 1,234 apples"`` gives ``"1234"``; ``"it is -7."`` gives ``"-7"``; ``"5-3=2"`` gives ``"2"``.
    """
    matches = _NUMBER_RE.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "").replace("\u2212", "-")


def _as_decimal(text: str | None) -> Decimal | None:
    if text is None:
        return None
    try:
        return Decimal(text.strip().replace(",", "").replace("\u2212", "-"))
    except InvalidOperation:
        return None


def _is_number(text: str) -> bool:
    return _NUMBER_RE.fullmatch(text.strip()) is not None


def _tag_tuples(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return {"__tuple__": [_tag_tuples(x) for x in obj]}
    if isinstance(obj, list):
        return [_tag_tuples(x) for x in obj]
    if isinstance(obj, Mapping):
        return {str(k): _tag_tuples(v) for k, v in obj.items()}
    return obj


def _untag_tuples(obj: dict[str, Any]) -> Any:
    return tuple(obj["__tuple__"]) if obj.keys() == {"__tuple__"} else obj


def encode_metadata(metadata: Mapping[str, Any]) -> str:
    """The ``metadata`` column: JSON that keeps tuples as tuples (reasoning-gym scorers compare them)."""
    return json.dumps(_tag_tuples(metadata), default=str, sort_keys=True)


def decode_metadata(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Inverse of :func:`encode_metadata`; a mapping or None passes through (as a dict)."""
    if text is None or text == "":
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    return json.loads(text, object_hook=_untag_tuples)


def completion_text(completion: Any) -> str:
    """The text of one completion as TRL passes it: a string, or a list of chat messages.

    For a conversational completion the contents of its assistant messages are joined (all messages when none is
    marked ``assistant``). Multimodal content parts contribute their ``text``.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        completion = [completion]
    messages = list(completion)
    assistant = [m for m in messages if isinstance(m, Mapping) and m.get("role") == "assistant"]
    parts = []
    for message in assistant or messages:
        content = message.get("content", "") if isinstance(message, Mapping) else message
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, Sequence):
            parts.extend(p.get("text", "") for p in content if isinstance(p, Mapping))
    return "\n".join(parts)


def make_hint(answer: str, template: str = DEFAULT_HINT_TEMPLATE) -> str:
    """The privileged-context string for ``answer``: ``"(Hint: the correct answer is 42.)"`` by default."""
    return template.format(answer=answer)


# --------------------------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------------------------


class TaskParams(BaseModel):
    """Base for task parameters: unknown keys are an error, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Task(ABC):
    """A source of verifiable problems: builds ``train``/``eval`` datasets and scores completions against answers."""

    name: ClassVar[str]
    Params: ClassVar[type[TaskParams]] = TaskParams

    def __init__(self, params: TaskParams | Mapping[str, Any] | None = None) -> None:
        if not isinstance(params, self.Params):
            params = self.Params.model_validate(dict(params or {}))
        self.params = params

    @classmethod
    def example_params(cls) -> TaskParams:
        """Small, valid parameters (used by the contract tests and the docs)."""
        return cls.Params()

    @classmethod
    def check_params(cls, params: TaskParams) -> list[str]:
        """Problems that the pydantic model cannot see (e.g. an unknown upstream dataset). Must not build anything."""
        return []

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

    def _row(self, question: str, answer: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "prompt": [{"role": "user", "content": question}],
            "answer": answer,
            "hint": make_hint(answer),
            "task": self.name,
            "metadata": encode_metadata(metadata),
        }


def rows_to_dataset(rows: list[dict[str, Any]]) -> datasets.Dataset:
    """A dataset with the standard task columns (the schema holds even when ``rows`` is empty)."""
    import datasets

    text = datasets.Value("string")
    features = datasets.Features(
        {
            "prompt": datasets.List({"role": text, "content": text}),
            "answer": text,
            "hint": text,
            "task": text,
            "metadata": text,
        }
    )
    columns = {name: [row[name] for row in rows] for name in features}
    return datasets.Dataset.from_dict(columns, features=features)


# --------------------------------------------------------------------------------------------------------------------
# arithmetic
# --------------------------------------------------------------------------------------------------------------------

ArithmeticOp = Literal["add", "sub", "mul", "max"]

EVAL_MODULUS = 5
"""A problem is eval-only iff the hash of its canonical form is divisible by this: about 1 in 5 problems."""

_ENUMERATE_LIMIT = 200_000  # problem spaces up to this size are enumerated exactly; larger ones are sampled
_OPERAND_NAMES = "abcde"


def _operand_range(op: str, digits: int) -> tuple[int, int]:
    low = 10 ** (digits - 1) if digits > 1 else (2 if op == "mul" else 1)  # "times 1" teaches nothing
    return low, 10**digits - 1


def _canonical(op: str, operands: tuple[int, ...]) -> tuple[int, ...]:
    return operands if op == "sub" else tuple(sorted(operands))  # 7*8 and 8*7 are the same problem


def _in_eval(op: str, operands: tuple[int, ...]) -> bool:
    return _question_in_eval(f"{op}:{','.join(map(str, _canonical(op, operands)))}")


def _question_in_eval(question: str) -> bool:
    digest = hashlib.blake2b(question.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % EVAL_MODULUS == 0


def _valid(op: str, operands: tuple[int, ...]) -> bool:
    return op != "max" or operands[0] != operands[1]  # "larger: 31 or 31" has no answer


@lru_cache(maxsize=4)
def _enumerate_split(op: str, digits: int, count: int, split: str) -> tuple[tuple[int, ...], ...]:
    low, high = _operand_range(op, digits)
    want_eval = split == "eval"
    return tuple(
        ops
        for ops in itertools.product(range(low, high + 1), repeat=count)
        if _valid(op, ops) and _in_eval(op, ops) == want_eval
    )


class ArithmeticParams(TaskParams):
    op: ArithmeticOp = Field("add", description="add, sub (a - b), mul, or max (which of two numbers is larger).")
    digits: int = Field(2, ge=1, le=6, description="Digits per operand (1-digit mul uses 2..9, others 1..9).")
    operands: int = Field(2, ge=2, le=5, description="Number of operands; only add and mul take more than 2.")
    answer_format: AnswerFormat = Field("free", description=f"number_only appends {NUMBER_ONLY_SUFFIX!r}.")
    question_template: str | None = Field(
        None,
        description="Overrides the question, e.g. 'Compute {a} plus {b}.'. Fields: a..e (the operands) and "
        "expression ('47 + 38', '7 times 8', '31 or 57').",
    )

    @model_validator(mode="after")
    def _check(self) -> ArithmeticParams:
        if self.operands != 2 and self.op not in ("add", "mul"):
            raise ValueError(f"operands={self.operands} is only supported for op add and mul; set operands: 2")
        if self.question_template is not None:
            allowed = set(_OPERAND_NAMES[: self.operands]) | {"expression"}
            try:
                fields = [f for _, f, _, _ in string.Formatter().parse(self.question_template) if f is not None]
            except ValueError as e:
                raise ValueError(f"question_template is not a valid format string: {e}") from None
            bad = [f for f in fields if f not in allowed]
            if bad:
                raise ValueError(
                    f"question_template uses unknown field(s) {', '.join(map(repr, bad))}; "
                    f"available: {', '.join(sorted(allowed))}"
                )
        return self


class ArithmeticTask(Task):
    """Procedurally generated integer arithmetic: "What is 47 + 38?", "What is 7 times 8?",
    "Which number is larger: 31 or 57?".

    The reward is 1.0 iff the last number in the completion equals the answer (see :func:`extract_last_number`);
    for ``max`` the completion must also not name the smaller number ("17 is larger than 72" scores 0).
    A problem belongs to the eval split iff a hash of its canonical form (operands sorted for the symmetric ops) is
    divisible by :data:`EVAL_MODULUS`, so the two splits are disjoint for every seed and every size, and "7 times 8"
    never sits in train while "8 times 7" sits in eval.
    """

    name: ClassVar[str] = "arithmetic"
    Params: ClassVar[type[TaskParams]] = ArithmeticParams
    params: ArithmeticParams

    @property
    def _count(self) -> int:
        return self.params.operands if self.params.op in ("add", "mul") else 2

    def space_size(self) -> int:
        """Number of distinct questions (both splits) these parameters can produce."""
        low, high = _operand_range(self.params.op, self.params.digits)
        n = high - low + 1
        return n * (n - 1) if self.params.op == "max" else n**self._count

    def _describe(self) -> str:
        p = self.params
        extra = f", operands={p.operands}" if p.op in ("add", "mul") else ""
        return f"arithmetic task (op={p.op}, digits={p.digits}{extra})"

    def _too_small(self, split: str, size: int, available: int, exact: bool) -> DataError:
        how_many = f"{available}" if exact else f"about {available}"
        return DataError(
            f"{self._describe()}: the {split} split has only {how_many} distinct problems, but size={size} was "
            f"requested. Lower the size, or raise digits (or operands for add/mul)."
        )

    def _sample(self, split: str, size: int, seed: int) -> list[tuple[int, ...]]:
        p = self.params
        rng = random.Random(f"opd_plugins.arithmetic:{p.op}:{p.digits}:{self._count}:{split}:{seed}")
        total = self.space_size()
        if total <= _ENUMERATE_LIMIT:
            pool = list(_enumerate_split(p.op, p.digits, self._count, split))
            if size > len(pool):
                raise self._too_small(split, size, len(pool), exact=True)
            rng.shuffle(pool)  # shuffling the whole pool keeps smaller sizes a prefix of larger ones
            return pool[:size]
        estimate = total // EVAL_MODULUS if split == "eval" else total - total // EVAL_MODULUS
        if size > estimate:
            raise self._too_small(split, size, estimate, exact=False)
        low, high = _operand_range(p.op, p.digits)
        want_eval = split == "eval"
        seen: set[tuple[int, ...]] = set()
        chosen: list[tuple[int, ...]] = []
        for _ in range(50 * size + 1000):
            if len(chosen) == size:
                break
            ops = tuple(rng.randint(low, high) for _ in range(self._count))
            if ops in seen or not _valid(p.op, ops) or _in_eval(p.op, ops) != want_eval:
                continue
            seen.add(ops)
            chosen.append(ops)
        if len(chosen) < size:
            raise self._too_small(split, size, estimate, exact=False)
        return chosen

    def _question(self, operands: tuple[int, ...]) -> tuple[str, int]:
        op = self.params.op
        if op == "add":
            expression, answer = " + ".join(map(str, operands)), sum(operands)
        elif op == "sub":
            expression, answer = f"{operands[0]} - {operands[1]}", operands[0] - operands[1]
        elif op == "mul":
            expression, answer = " times ".join(map(str, operands)), 1
            for x in operands:
                answer *= x
        else:
            expression, answer = f"{operands[0]} or {operands[1]}", max(operands)
        if self.params.question_template is not None:
            fields = dict(zip(_OPERAND_NAMES, operands, strict=False), expression=expression)
            question = self.params.question_template.format(**fields)
        elif op == "max":
            question = f"Which number is larger: {expression}?"
        else:
            question = f"What is {expression}?"
        if self.params.answer_format == "number_only":
            question = f"{question} {NUMBER_ONLY_SUFFIX}"
        return question, answer

    def build(self, split: Split, size: int, seed: int) -> datasets.Dataset:
        self._check_split_and_size(split, size)
        rows = []
        for operands in self._sample(split, size, seed):
            question, answer = self._question(operands)
            rows.append(self._row(question, str(answer), {"op": self.params.op, "operands": list(operands)}))
        return rows_to_dataset(rows)

    def score(self, completion: str, answer: str, metadata: str | Mapping[str, Any] | None = None) -> float:
        got, want = _as_decimal(extract_last_number(completion)), _as_decimal(answer)
        if got is None or want is None or got != want:
            return 0.0
        if self.params.op == "max":
            # "17 is larger than 72" ends with the right number but answers wrongly: a completion that names the
            # smaller number anywhere is not an answer to "which is larger".
            operands = decode_metadata(metadata).get("operands") or []
            others = {_as_decimal(str(x)) for x in operands} - {want}
            if others & {_as_decimal(m) for m in _NUMBER_RE.findall(completion)}:
                return 0.0
        return 1.0


# --------------------------------------------------------------------------------------------------------------------
# reasoning_gym
# --------------------------------------------------------------------------------------------------------------------

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

    @classmethod
    def check_params(cls, params: TaskParams) -> list[str]:
        assert isinstance(params, ReasoningGymParams)
        registry = _reasoning_gym_registry()
        if params.dataset not in registry:
            close = difflib.get_close_matches(params.dataset, list(registry), n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            return [
                f"params.dataset: unknown reasoning-gym dataset {params.dataset!r}.{hint} "
                f"({len(registry)} available, e.g. {', '.join(sorted(registry)[:8])}, ...)"
            ]
        reserved = sorted({"seed", "size"} & set(params.config))
        if reserved:
            return [f"params.config: {', '.join(reserved)} are set by the task from the split; remove them"]
        _, config_cls = registry[params.dataset]
        try:
            config = config_cls(**params.config)
            if hasattr(config, "validate"):
                config.validate()
        except TypeError as e:
            fields = getattr(config_cls, "__dataclass_fields__", {})
            valid = ", ".join(f for f in fields if f not in ("seed", "size"))
            return [f"params.config: {e} (valid keys for {params.dataset}: {valid})"]
        except (AssertionError, ValueError) as e:
            return [f"params.config: invalid config for {params.dataset}: {e}"]
        return []

    def _ensure_valid(self) -> None:
        problems = self.check_params(self.params)
        if problems:
            raise DataError(f"reasoning_gym task: {'; '.join(problems)}")

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
                question = f"{question} {NUMBER_ONLY_SUFFIX if _is_number(answer) else ANSWER_ONLY_SUFFIX}"
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
        tagged = _ANSWER_TAG_RE.findall(completion)
        text = tagged[-1] if tagged else completion
        if _is_number(reference):
            number = extract_last_number(text)
            if number is None:
                return []
            return [reference if _as_decimal(number) == _as_decimal(reference) else number]
        reference_lines = reference.strip("\n").splitlines()
        if len(reference_lines) > 1:
            lines = text.strip("\n").rstrip().splitlines()[-len(reference_lines) :]
            if not lines:
                return []
            lines[0] = _ANSWER_PREFIX_RE.sub("", lines[0].lstrip("*` \t"))
            return ["\n".join(lines)]
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            return []
        line = _ANSWER_PREFIX_RE.sub("", lines[-1].strip("*`'\" \t")).strip("*`'\" \t")
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


# --------------------------------------------------------------------------------------------------------------------
# registry, validation, rewards
# --------------------------------------------------------------------------------------------------------------------

class NumericAnswerTask(Task):
    """Scores dataset rows whose reference answer ends with a number (GSM8K's ``... #### 72``, ``42``, ``3.5``).

    It generates no prompts: use it as ``data.task`` next to ``data.dataset``. Correct when the last number in
    the completion equals the last number in the reference answer.
    """

    name = "numeric_answer"

    def build(self, split: Split, size: int, seed: int) -> datasets.Dataset:
        raise DataError(
            "task 'numeric_answer' only scores rows: give it together with data.dataset (rows from a file or the hub)"
        )

    def score(self, completion: str, answer: str, metadata: str | Mapping[str, Any] | None = None) -> float:
        got, want = _as_decimal(extract_last_number(completion)), _as_decimal(extract_last_number(str(answer)))
        return 1.0 if got is not None and want is not None and got == want else 0.0


TASKS: dict[str, type[Task]] = {
    ArithmeticTask.name: ArithmeticTask, ReasoningGymTask.name: ReasoningGymTask, NumericAnswerTask.name: NumericAnswerTask,
}


def _unknown_task(name: str, tasks: Mapping[str, type[Task]]) -> str:
    close = difflib.get_close_matches(name, list(tasks), n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    return f"unknown task {name!r}.{hint} registered: {', '.join(sorted(tasks))}"


def _format_error(error: Mapping[str, Any], fields: Sequence[str]) -> str:
    loc = ".".join(str(part) for part in error["loc"])
    path = f"params.{loc}" if loc else "params"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(error["loc"][-1]), list(fields), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"{path}: unknown parameter.{hint} valid: {', '.join(fields)}"
    if error["type"] not in ("missing", "value_error"):
        message += f" [got {error.get('input')!r}]"
    return f"{path}: {message}"


def validate_task_params(
    name: str, params: Mapping[str, Any] | None, tasks: Mapping[str, type[Task]] | None = None
) -> list[str]:
    """Every problem with ``{name, params}`` as readable strings ("params.digits: ..."); builds nothing."""
    tasks = TASKS if tasks is None else tasks
    if name not in tasks:
        return [_unknown_task(name, tasks)]
    if params is not None and not isinstance(params, Mapping):
        return [f"params: must be a mapping, got {type(params).__name__}"]
    cls = tasks[name]
    try:
        parsed = cls.Params.model_validate(dict(params or {}))
    except ValidationError as e:
        fields = list(cls.Params.model_fields)
        return [_format_error(err, fields) for err in e.errors()]
    return cls.check_params(parsed)


def get_task(name: str, params: Mapping[str, Any] | None = None, tasks: Mapping[str, type[Task]] | None = None) -> Task:
    """The task registered as ``name``, built from ``params``; :class:`DataError` lists every problem."""
    tasks = TASKS if tasks is None else tasks
    problems = validate_task_params(name, params, tasks)
    if len(problems) == 1:
        raise DataError(f"task {name!r}: {problems[0]}")
    if problems:
        raise DataError(f"task {name!r} has {len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems))
    return tasks[name](dict(params or {}))


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
