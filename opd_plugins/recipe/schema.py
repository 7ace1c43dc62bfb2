"""The recipe schema. Every level forbids unknown keys; component params are validated by the component."""

from __future__ import annotations

import string
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from opd_plugins.components import ComponentSpec, Strict, as_schedule_spec
from opd_plugins.correction import CorrectionSpec
from opd_plugins.diagnostics import DiagnosticsSpec

SLOT_KINDS: dict[str, str] = {
    "teacher": "teacher",
    "divergence": "divergence",
    "advantage": "advantage",
    "sampler": "sampler",
    "prompt_selection": "prompt_selection",
    "rollout": "rollout",
}
"""Single-component recipe slots and the component kind each takes (``token_weighting`` is a list)."""


_coefficient = as_schedule_spec  # the name older plugins imported

DEFAULT_HINT_TEMPLATE = "(Hint: the correct answer is {answer}.)"
"""How a ``hint`` column is built from ``answer`` when a dataset or task has none."""


class DatasetSource(BaseModel):
    """Where a dataset comes from and how its columns map onto the framework's.

    ``path`` is a hub id (``openai/gsm8k``), a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file, or a local
    directory (data files, or a ``Dataset.save_to_disk`` directory).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="Hub dataset id, or a local file or directory.")
    name: str | None = Field(None, description="Hub dataset configuration name (e.g. 'main' for gsm8k).")
    split: str = Field("train", description="Split to load.")
    data_files: str | list[str] | None = Field(None, description="Files to load from the hub repo or directory.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="framework column -> dataset column, e.g. {prompt: question}."
    )
    system_prompt: str | None = Field(None, description="System message prepended to every prompt.")
    hint_template: str = Field(
        DEFAULT_HINT_TEMPLATE, description="Builds `hint` when the dataset has none; fields are the row's columns."
    )
    limit: int | None = Field(None, ge=1, description="Keep only the first N rows.")

    @field_validator("hint_template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        except ValueError as e:
            raise ValueError(f"not a valid format string: {e}") from None
        if any(not f or f.isdigit() for f in fields):
            raise ValueError("use named fields such as {answer}, not positional {} fields")
        return value

    def describe(self) -> str:
        """How the source is named in error messages."""
        extra = "".join(f" {k}={v}" for k, v in (("name", self.name), ("split", self.split)) if v)
        return f"dataset {self.path!r}{extra}"




class ObjectiveSpec(Strict):
    """Weights of the loss terms, each a number or a schedule ``{name, params}``.

    ``loss = policy_gradient(t) · PG + divergence(t) · D``; ``divergence_reward(t)`` adds the divergence's
    per-token reward to the advantages (OPD as RL), or its reward-to-go with ``divergence_reward_to_go``.
    """

    policy_gradient: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="constant", params={"value": 1.0}))
    divergence: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="constant", params={"value": 0.0}))
    divergence_reward: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="constant", params={"value": 0.0}))
    divergence_reward_to_go: bool = Field(False, description=(
        "Add the reward-to-go Σ_{t'≥t} d_t' of the divergence's per-token reward instead of d_t: the policy "
        "gradient of the sequence-level divergence rather than OPD's per-position one (docs/components.md)."))

    _coerce = field_validator("policy_gradient", "divergence", "divergence_reward", mode="before")(
        classmethod(lambda cls, v: as_schedule_spec(v))
    )


class LoraSpec(Strict):
    r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class ModelSpec(Strict):
    name_or_path: str = Field(..., description="Local path, hub id, or 'smollm2-135m-instruct'.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    trust_remote_code: bool = False
    lora: LoraSpec | None = Field(None, description="LoRA settings; null for a full fine-tune.")


TaskSpec = ComponentSpec  # a task is a component (kind ``task``)


class DataSpec(Strict):
    task: TaskSpec | None = Field(None, description="A built-in task: generates prompts, or only scores `dataset` rows.")
    dataset: dict[str, Any] | None = Field(None, description="A hub or local dataset (see docs/tasks_and_data.md).")
    eval_dataset: dict[str, Any] | None = None
    train_size: int = Field(256, gt=0, description="Prompts generated for a built-in task.")
    eval_size: int = Field(100, ge=0, description="Held-out prompts for a built-in task.")
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        if self.task is None and self.dataset is None:
            raise ValueError("give data.task (a built-in task), data.dataset (rows from a file or the hub), or both "
                             "(the task then only scores the dataset's rows)")
        return self


class EvaluationSpec(Strict):
    """Held-out accuracy without privileged context, before and after training."""

    enabled: bool = True
    num_prompts: int = Field(100, gt=0)
    temperature: float = Field(0.0, ge=0, description="0 = greedy.")
    samples_per_prompt: int = Field(1, gt=0)
    max_new_tokens: int | None = Field(None, gt=0, description="Default: trainer max_completion_length.")
    batch_size: int = Field(32, gt=0)


class TrainerSpec(Strict):
    name: str = Field("opd", description="A registered trainer variant: opd (on-policy), soda (preference pairs).")
    args: dict[str, Any] = Field(default_factory=dict, description="Passed to the variant's config: OPDConfig (a TRL "
                                 "GRPOConfig) for opd, TRL's DPOConfig for soda.")


def check_output_dir(value: str) -> str:
    """``value`` with ``~`` expanded; ``ValueError`` for a path that cannot be a run directory: empty, the
    filesystem root, the home directory, or one holding a NUL byte. (``--overwrite`` deletes the run directory.)"""
    import os

    text = value.strip()
    if not text:
        raise ValueError("output_dir is empty; name the run directory, e.g. output_dir: runs/my_run")
    if "\0" in text:
        raise ValueError("output_dir contains a NUL byte")
    path = os.path.expanduser(text)
    real = os.path.realpath(path)
    if real == os.path.realpath(os.sep) or os.path.dirname(real) == real:
        raise ValueError(f"output_dir {value!r} is the filesystem root; name a directory of its own, e.g. runs/my_run")
    if real == os.path.realpath(os.path.expanduser("~")):
        raise ValueError(f"output_dir {value!r} is your home directory; name a directory of its own, e.g. "
                         "~/runs/my_run")
    return path


class Recipe(Strict):
    """A whole training recipe."""

    description: str | None = None
    plugins: list[str] = Field(default_factory=list)
    model: ModelSpec
    data: DataSpec
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    teacher: ComponentSpec | None = None
    divergence: ComponentSpec | None = None
    advantage: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="grpo"))
    sampler: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="none"))
    prompt_selection: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="uniform"), description=(
        "Which dataset prompts each generation batch is drawn from (docs/prompt_selection.md)."))
    rollout: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="hf_generate"))
    token_weighting: list[ComponentSpec] = Field(default_factory=list)
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    correction: CorrectionSpec = Field(default_factory=CorrectionSpec, description=(
        "Rollout-mismatch correction: a preset (tis, mis, icepop, none), {preset: ..., <field overrides>}, or "
        "{mode, clip_max, clip_min}. See docs/correction.md."))
    diagnostics: DiagnosticsSpec = Field(default_factory=DiagnosticsSpec, description=(
        "The diag/* metrics: {every, topk}; every > 0 adds the gradient cosine of the two loss terms. See "
        "docs/components.md#diagnostics."))
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    output_dir: str = Field(description="The run directory (created; `~` is expanded).")
    seed: int = 0
    _source: str = PrivateAttr("<recipe>")
    _components: dict[str, Any] | None = PrivateAttr(None)
    _notes: list[str] = PrivateAttr(default_factory=list)

    @field_validator("output_dir")
    @classmethod
    def _check_output_dir(cls, value: str) -> str:
        return check_output_dir(value)

    @property
    def source(self) -> str:
        """Where the recipe was read from (a file path, or ``<recipe>``)."""
        return self._source

    @property
    def notes(self) -> list[str]:
        """What validation told the user without refusing the recipe (e.g. an older form that was rewritten)."""
        return list(self._notes)

    @property
    def components(self) -> dict[str, Any] | None:
        """The components validation built (slot -> component), until a run takes them (:meth:`take_components`)."""
        return self._components

    def take_components(self) -> dict[str, Any] | None:
        """The components validation built, handed over once: the run that takes them owns their state; a second
        run of the same recipe object builds its own."""
        built, self._components = self._components, None
        return built
