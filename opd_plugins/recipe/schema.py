"""The recipe schema. Every level forbids unknown keys; component params are validated by the component."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from opd_plugins.components import ComponentSpec, Strict, as_schedule_spec
from opd_plugins.correction import CorrectionSpec

SLOT_KINDS: dict[str, str] = {
    "teacher": "teacher",
    "divergence": "divergence",
    "advantage": "advantage",
    "sampler": "sampler",
    "rollout": "rollout",
}
"""Single-component recipe slots and the component kind each takes (``token_weighting`` is a list)."""


_coefficient = as_schedule_spec  # the name older plugins imported


class ObjectiveSpec(Strict):
    """Weights of the loss terms, each a number or a schedule ``{name, params}``.

    ``loss = policy_gradient(t) · PG + divergence(t) · D``; ``divergence_reward(t)`` adds the divergence's
    per-token reward to the advantages (OPD as RL).
    """

    policy_gradient: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="constant", params={"value": 1.0}))
    divergence: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="constant", params={"value": 0.0}))
    divergence_reward: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="constant", params={"value": 0.0}))

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


class TaskSpec(Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


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
    name: Literal["opd"] = "opd"
    args: dict[str, Any] = Field(default_factory=dict, description="Passed to OPDConfig (a TRL GRPOConfig).")


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
    rollout: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="hf_generate"))
    token_weighting: list[ComponentSpec] = Field(default_factory=list)
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    correction: CorrectionSpec = Field(default_factory=CorrectionSpec, description=(
        "Rollout-mismatch correction: a preset (tis, mis, icepop, none), {preset: ..., <field overrides>}, or "
        "{mode, clip_max, clip_min}. See docs/correction.md."))
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    output_dir: str
    seed: int = 0
    _source: str = PrivateAttr("<recipe>")

    @property
    def source(self) -> str:
        """Where the recipe was read from (a file path, or ``<recipe>``)."""
        return self._source
