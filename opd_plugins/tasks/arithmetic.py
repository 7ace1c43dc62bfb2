"""``arithmetic``: procedurally generated integer arithmetic with a hash-partitioned train/eval split."""

from __future__ import annotations

import hashlib
import itertools
import random
import string
from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from opd_plugins.errors import DataError
from opd_plugins.tasks.answers import NUMBER_ONLY_SUFFIX, NUMBER_RE, as_decimal, decode_metadata, extract_last_number
from opd_plugins.tasks.base import AnswerFormat, Split, Task, TaskParams, rows_to_dataset

if TYPE_CHECKING:
    import datasets

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



def worked_solution(op: str, operands: tuple[int, ...]) -> str:
    """A short step-by-step solution ending in "The answer is N.": tens then ones for ``add`` / ``sub`` with two
    operands (a running total with more), partial products for ``mul``, a comparison for ``max``."""
    steps: list[str] = []
    if op in ("add", "sub") and len(operands) == 2:
        a, b = operands
        sign = "+" if op == "add" else "-"
        tens, ones = (abs(b) // 10) * 10, abs(b) % 10
        mid = a + tens if op == "add" else a - tens
        steps = [f"{a} {sign} {tens} = {mid}.", f"{mid} {sign} {ones} = {mid + ones if op == 'add' else mid - ones}."]
        answer = a + b if op == "add" else a - b
    elif op == "add":
        total = operands[0]
        for x in operands[1:]:
            steps.append(f"{total} + {x} = {total + x}.")
            total += x
        answer = total
    elif op == "mul":
        total = operands[0]
        for x in operands[1:]:
            tens, ones = (x // 10) * 10, x % 10
            if tens and ones:
                steps.append(f"{total} times {tens} = {total * tens}. {total} times {ones} = {total * ones}. "
                             f"{total * tens} + {total * ones} = {total * x}.")
            else:
                steps.append(f"{total} times {x} = {total * x}.")
            total *= x
        answer = total
    else:
        a, b = operands[0], operands[1]
        answer = max(a, b)
        steps = [f"{answer} is larger than {min(a, b)}."]
    return " ".join([*steps, f"The answer is {answer}."])

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
            rows.append(self._row(question, str(answer), {"op": self.params.op, "operands": list(operands)},
                                  solution=worked_solution(self.params.op, operands)))
        return rows_to_dataset(rows)

    def score(self, completion: str, answer: str, metadata: str | Mapping[str, Any] | None = None) -> float:
        got, want = as_decimal(extract_last_number(completion)), as_decimal(answer)
        if got is None or want is None or got != want:
            return 0.0
        if self.params.op == "max":
            # "17 is larger than 72" ends with the right number but answers wrongly: a completion that names the
            # smaller number anywhere is not an answer to "which is larger".
            operands = decode_metadata(metadata).get("operands") or []
            others = {as_decimal(str(x)) for x in operands} - {want}
            if others & {as_decimal(m) for m in NUMBER_RE.findall(completion)}:
                return 0.0
        return 1.0
