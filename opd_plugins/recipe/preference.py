"""Validation of preference recipes (``trainer.name: soda``): the rules half of SODA; the run is in
:mod:`opd_plugins.runs.soda`.

A SODA recipe has a text teacher (a teacher whose capabilities include ``text`` and which has ``generate``) and
``trainer.args`` that go to TRL's ``DPOConfig`` (``beta``, ``loss_type``, ``label_smoothing``, ``learning_rate``,
...), plus the keys of :class:`Sampling`, which say how the student's one-time snapshot is sampled.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from opd_plugins.errors import Problem
from opd_plugins.recipe.trainer_args import (
    RANGES,
    cached_field_names,
    cached_fields,
    name_problems,
    value_problems,
    versions_key,
)

# The pairwise loss types of TRL 1.16's DPOTrainer (each a branch of DPOTrainer._compute_loss; a unit test checks
# they still are). Left out: 'sft' (no preference term on its own).
LossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)


class Sampling(BaseModel):
    """How the student snapshot is sampled: ``trainer.args`` keys a SODA recipe adds to DPOConfig's own (the same
    names OPD recipes use)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    max_completion_length: int = Field(256, gt=0, description="Most tokens per student response.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of the snapshot (0 = greedy).")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = no top-k truncation.")
    generation_batch_size: int = Field(32, gt=0, description="Prompts per generation batch while building pairs.")


SAMPLING_ARGS = tuple(Sampling.model_fields)
_SAMPLING_FIELDS = {name: {"types": [info.annotation.__name__], "choices": None, "default": info.default}
                    for name, info in Sampling.model_fields.items()}


def _dpo_config() -> type:
    from trl import DPOConfig

    return DPOConfig


def dpo_arg_names() -> set[str]:
    """Every TRL ``DPOConfig`` field name (cached per version in the user cache: ``validate`` stays fast)."""
    return cached_field_names(f"dpo_args-{versions_key('trl', 'transformers')}", _dpo_config)


def grpo_arg_names() -> set[str]:
    """Every TRL ``GRPOConfig`` field name (the on-policy trainer's options), cached likewise."""

    def load() -> type:
        from trl import GRPOConfig

        return GRPOConfig

    return cached_field_names(f"grpo_args-{versions_key('trl', 'transformers')}", load)


def is_text_teacher(teacher: Any) -> bool:
    """A teacher that returns response text (SODA's black-box teacher): ``text`` in its capabilities."""
    return "text" in set(getattr(teacher, "capabilities", ()))


def arg_problems(args: dict[str, Any]) -> list[Problem]:
    """``trainer.args`` of a SODA recipe: DPOConfig fields or the snapshot's :class:`Sampling` keys, with valid
    values for the DPO loss."""
    fields = cached_fields(f"dpo_args-{versions_key('trl', 'transformers')}", _dpo_config)
    names = set(fields)

    def explain(key: str) -> str:
        why = (f"{key} is an on-policy (GRPO/OPD) option, and SODA has no rollouts: pairs are built once"
               if key in grpo_arg_names() else "unknown trainer argument")
        return f"not an argument of TRL's DPOConfig, which trains this recipe (trainer soda): {why}"

    problems = name_problems(args, names, explain=explain, allowed=SAMPLING_ARGS)
    try:
        Sampling.model_validate(args)
    except ValidationError as exc:
        for err in exc.errors():
            problems.append(Problem(f"trainer.args.{err['loc'][0]}", f"{err['msg']} [got {err.get('input')!r}]"))
    flagged = {p.path for p in problems}
    ranges = {**{k: v for k, v in RANGES.items() if k != "beta"},  # beta: the DPO check below
              "temperature": (lambda v: v >= 0, ">= 0 (0 = greedy)")}
    problems += value_problems({k: v for k, v in args.items() if f"trainer.args.{k}" not in flagged},
                               {**fields, **_SAMPLING_FIELDS}, ranges=ranges)
    loss_types = args.get("loss_type", "sigmoid")
    loss_types = loss_types if isinstance(loss_types, list) else [loss_types]
    bad = [t for t in loss_types if t not in LOSS_TYPES]
    if bad:
        problems.append(Problem("trainer.args.loss_type", f"unknown DPO loss type {bad[0]!r}; the pairwise types "
                                f"are {', '.join(LOSS_TYPES)}"))
    smoothing = args.get("label_smoothing", 0.0)
    if isinstance(smoothing, (int, float)):
        if "robust" in loss_types and not 0 <= smoothing < 0.5:
            problems.append(Problem("trainer.args.label_smoothing", "loss_type: robust needs label_smoothing in "
                                    "[0, 0.5) (the probability a pair's preference is flipped)"))
        if "exo_pair" in loss_types and smoothing == 0:
            problems.append(Problem("trainer.args.label_smoothing", "loss_type: exo_pair needs label_smoothing > 0 "
                                    "(the EXO paper recommends 1e-3)"))
    beta = args.get("beta", 0.1)
    if isinstance(beta, (int, float)) and not beta > 0:
        problems.append(Problem("trainer.args.beta", f"beta must be > 0 (the pull towards the initial policy) "
                                f"[got {beta!r}]"))
    return problems


def recipe_problems(ctx: Any) -> list[Problem]:
    """A SODA recipe needs a text teacher."""
    s = ctx.sections
    if s.teacher is None:
        if "teacher" in ctx.invalid:
            return []
        return [Problem("teacher", "required key is missing: trainer 'soda' trains on (teacher response, student "
                        "snapshot) pairs, so the recipe needs a text teacher: teacher: {name: blackbox_text, params: "
                        "{source: ...}} (docs/soda.md)")]
    teacher = ctx.built.get("teacher")
    if teacher is not None and not is_text_teacher(teacher):
        return [Problem("teacher.name", (
            f"teacher {s.teacher.name!r} scores tokens ({', '.join(sorted(teacher.capabilities))}) but returns no "
            "response text, and trainer 'soda' trains on the teacher's responses; set teacher.name: blackbox_text "
            "(e.g. source: local_model with the same checkpoint), or train token-level distillation with "
            "trainer.name: opd"))]
    if teacher is not None and not callable(getattr(teacher, "generate", None)):
        return [Problem("teacher.name", f"teacher {s.teacher.name!r} declares the 'text' capability but has no "
                        "generate(prompts, rows) method")]
    return []


def legacy_rewrite(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Rewrite the form of earlier releases, ``divergence: {name: dpo, params: {...}}`` with no ``trainer.name``,
    into ``trainer: {name: soda, args: {...}}``; returns the recipe mapping and a note for the user."""
    divergence = raw.get("divergence")
    trainer = raw.get("trainer") if isinstance(raw.get("trainer"), dict) else {}
    if not (isinstance(divergence, dict) and divergence.get("name") == "dpo") or "name" in (trainer or {}):
        return raw, []
    out = dict(raw)
    params = dict(divergence.get("params") or {})
    out.pop("divergence")
    new_trainer = dict(trainer or {})
    new_trainer["name"] = "soda"
    new_trainer["args"] = {**dict(new_trainer.get("args") or {}), **params}
    out["trainer"] = new_trainer
    moved = f" with trainer.args {', '.join(params)}" if params else ""
    return out, [f"divergence: {{name: dpo}} is now trainer: {{name: soda}} (SODA is its own trainer); read as "
                 f"trainer.name: soda{moved}. Update the recipe: this rewrite goes away in the next release"]


__all__ = ["LOSS_TYPES", "SAMPLING_ARGS", "Sampling", "arg_problems", "dpo_arg_names", "is_text_teacher",
           "legacy_rewrite", "recipe_problems"]
