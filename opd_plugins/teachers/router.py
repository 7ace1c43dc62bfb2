"""``router``: different teachers for different rows, chosen by a dataset column (multi-teacher OPD)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from opd_plugins.components import ComponentParams, ComponentSpec
from opd_plugins.context import SetupContext
from opd_plugins.errors import DataError, OPDError
from opd_plugins.teachers.base import CAPABILITY_ORDER, Capability, Teacher, TeacherBatch, TeacherScores


class RouterTeacher(Teacher):
    """Routes each row to a teacher chosen by a dataset column, in one run (multi-teacher distillation).

    ``teachers`` maps a column value (e.g. ``data_source: math``) to a teacher ``{name, params}``; rows whose
    value is not listed go to ``default`` (or are an error when there is none). Each sub-teacher scores only
    its rows; the scores are merged back in row order. A divergence may ask only for what every routed teacher
    provides. Background: MOPD / multi-teacher OPD (TRL issue 6151, verl's per-source teachers).
    """

    name: ClassVar[str] = "router"
    capabilities: ClassVar[frozenset[str]] = frozenset({"sampled", "topk", "full"})

    class Params(ComponentParams):
        column: str = Field("data_source", description="Dataset column whose value picks the teacher.")
        teachers: dict[str, ComponentSpec] = Field(..., min_length=1, description="Column value -> teacher {name, params}.")
        default: str | None = Field(None, description="Key of `teachers` used for rows with an unlisted value.")

        @model_validator(mode="after")
        def _default_is_a_route(self) -> "RouterTeacher.Params":
            if self.default is not None and self.default not in self.teachers:
                raise ValueError(f"default {self.default!r} is not a key of teachers ({sorted(self.teachers)})")
            return self

    nested_slots: ClassVar[dict[str, str]] = {"teachers": "teacher"}

    def __init__(self, params: Params | None = None, nested: dict[str, Any] | None = None) -> None:
        super().__init__(params, nested)
        self.routes: dict[str, Teacher] = dict(self.nested.get("teachers") or {})
        # A divergence may ask only for what every routed teacher provides (checked at validation).
        self.capabilities = frozenset.intersection(*(frozenset(t.capabilities) for t in self.routes.values()))

    @classmethod
    def example_params(cls) -> Params:
        """Rows routed by their ``answer`` (the contract suite's batch has answers 3, 5, 7): one to a local model,
        one to the student with privileged context, the rest to the default."""
        return cls.Params(column="answer", teachers={
            "3": ComponentSpec(name="hf_model", params={"model": "tiny-teacher"}),
            "5": ComponentSpec(name="self_context", params={"template": "{prompt}"}),
        }, default="3")

    def problems(self) -> list[tuple[str, str]]:
        return [(f"teachers.{key}.name", "a router cannot route to another router")
                for key, teacher in self.routes.items() if isinstance(teacher, RouterTeacher)]

    def required_columns(self) -> tuple[str, ...]:
        cols = [self.params.column]
        for t in self.routes.values():
            cols += list(t.required_columns())
        return tuple(dict.fromkeys(cols))

    def setup(self, ctx: SetupContext) -> None:
        for teacher in self.routes.values():
            teacher.setup(ctx)

    def _route(self, row: dict[str, Any]) -> str:
        value = row.get(self.params.column)
        if value is None and self.params.column not in row:
            raise DataError(f"teacher router: rows have no column {self.params.column!r} (columns: {sorted(row)})")
        key = str(value)
        if key in self.routes:
            return key
        if self.params.default is not None:
            return self.params.default
        raise DataError(f"teacher router: no teacher for {self.params.column}={value!r}; routes: {sorted(self.routes)} "
                        "(set `default` to route unlisted values)")

    def score(self, batch: TeacherBatch, want: Capability = "sampled") -> TeacherScores:
        if not self.routes:
            raise RuntimeError("router teacher used before setup()")
        rows = batch.rows or [{} for _ in range(batch.completion_ids.shape[0])]
        keys = [self._route(r) for r in rows]
        parts: dict[str, tuple[list[int], TeacherScores]] = {}
        for key in dict.fromkeys(keys):
            idx = [i for i, k in enumerate(keys) if k == key]
            sel = torch.tensor(idx)
            sub = TeacherBatch(batch.prompt_ids[sel], batch.prompt_mask[sel], batch.completion_ids[sel],
                               batch.completion_mask[sel], prompts=[batch.prompts[i] for i in idx] if batch.prompts else [],
                               rows=[rows[i] for i in idx])
            scores = self.routes[key].score(sub, want)
            if CAPABILITY_ORDER[scores.capability] < CAPABILITY_ORDER[want]:
                raise OPDError(f"teacher router: route {key!r} returned {scores.capability!r} scores, {want!r} needed")
            parts[key] = (idx, scores)
        return _merge(parts, batch.completion_ids.shape[0])


def _merge(parts: dict[str, tuple[list[int], TeacherScores]], n: int) -> TeacherScores:
    fields: dict[str, torch.Tensor | None] = {}
    for name in TeacherScores.TENSOR_FIELDS:
        pieces = [(idx, getattr(s, name)) for idx, s in parts.values()]
        if any(t is None for _, t in pieces):
            fields[name] = None  # only what every route returned survives the merge
            continue
        first = pieces[0][1]
        width = max(t.shape[-1] for _, t in pieces) if first.dim() == 3 else None
        shape = (n, *first.shape[1:]) if width is None else (n, first.shape[1], width)
        out = torch.zeros(shape, dtype=first.dtype, device=first.device)
        for idx, t in pieces:
            if width is not None and t.shape[-1] != width:
                fields[name] = None
                break
            out[torch.tensor(idx, device=first.device)] = t
        else:
            fields[name] = out
    return TeacherScores(**fields)
