"""``self_context``: the student's own weights with privileged context (on-policy self-distillation)."""

from __future__ import annotations

import copy
import math
import string
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from opd_plugins.components import ComponentParams, ComponentSpec, as_schedule_spec
from opd_plugins.context import SetupContext
from opd_plugins.errors import DataError, OPDError
from opd_plugins.reveal import reveal_prefix
from opd_plugins.teachers._shadow_weights import ShadowWeights, is_peft
from opd_plugins.teachers.base import (
    Capability,
    Teacher,
    TeacherBatch,
    TeacherScores,
    score_with_causal_lm,
)

DEFAULT_EMA_DECAY = 0.99


def _template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


class SelfContextTeacher(Teacher):
    """The student itself, stop-gradient, with privileged context inserted into the prompt (OPSD).

    The teacher prompt is the student's last user message rewritten by ``template``, whose fields are
    ``{prompt}`` (the original message) and any dataset column (``{hint}``, ``{answer}``, ``{solution}``...).
    The completion the student sampled is then scored under that richer context. ``weights`` chooses the
    teacher's weights: ``live`` (the current policy, no gradient), ``initial`` (frozen at the start: the LoRA
    adapter disabled, or a copy of the starting weights for full fine-tuning), or ``ema`` (an exponential moving average of the
    student's trainable parameters, updated after every optimizer step: θ_ema ← d·θ_ema + (1−d)·θ).
    ``reveal_column`` with a ``reveal`` schedule shows the teacher only the first fraction (in whitespace-separated
    words) of that column's text, the fraction following training progress (ATESD's reveal ratio).
    Paper: Zhao et al., "Self-Distilled Reasoner: On-Policy Self-Distillation" (OPSD),
    https://github.com/siyan-zhao/OPSD
    """

    name: ClassVar[str] = "self_context"
    capabilities: ClassVar[frozenset[str]] = frozenset({"sampled", "topk", "full"})
    scores_any_rows: ClassVar[bool] = True

    class Params(ComponentParams):
        template: str = Field("{prompt}\n\n{hint}", description="Teacher's version of the last user message.")
        weights: Literal["live", "initial", "ema"] = Field(
            "live", description="Current policy, frozen initial weights, or an EMA of the trainable parameters.")
        ema_decay: float | None = Field(
            None, gt=0, lt=1, description=f"EMA decay d (weights: ema only; default {DEFAULT_EMA_DECAY}).")
        reveal_column: str | None = Field(
            None, description="Template field (a dataset column) of which only a prefix is revealed.")
        reveal: ComponentSpec | None = Field(
            None, validate_default=True,
            description="Fraction of reveal_column's words shown: a schedule {name, params} or a number.")
        temperature: float | None = Field(None, gt=0, description="Scoring temperature (default: the sampling temperature).")
        top_k: int = Field(0, ge=0, description="Also return the teacher's top-k per token.")
        chunk_size: int = Field(8, ge=1, description="Rows scored per forward pass.")
        allow_nonfinite: bool = Field(False, description="Mask and count NaN/inf teacher log-probs instead of failing.")

        @field_validator("template")
        @classmethod
        def _check_template(cls, v: str) -> str:
            fields = _template_fields(v)
            if "prompt" not in fields:
                raise ValueError("template must contain {prompt} (the student's message)")
            if any(not f.isidentifier() for f in fields):
                raise ValueError(f"template fields must be plain column names, got {fields}")
            return v

        @field_validator("ema_decay")
        @classmethod
        def _check_ema_decay(cls, v: float | None, info: ValidationInfo) -> float | None:
            weights = info.data.get("weights")
            if v is not None and weights is not None and weights != "ema":
                raise ValueError(f"ema_decay applies only to weights: ema, but weights is {weights!r}; "
                                 "remove ema_decay or set weights: ema")
            return v

        @field_validator("reveal_column")
        @classmethod
        def _check_reveal_column(cls, v: str | None, info: ValidationInfo) -> str | None:
            template = info.data.get("template")
            if v is None or template is None:
                return v
            if v == "prompt":
                raise ValueError("reveal_column cannot be 'prompt' (the student's own message); name a privileged column")
            if v not in _template_fields(template):
                raise ValueError(f"reveal_column {v!r} is not a field of template {template!r}; add {{{v}}} to the template")
            return v

        _coerce_reveal = field_validator("reveal", mode="before")(classmethod(lambda cls, v: as_schedule_spec(v)))

        @field_validator("reveal")
        @classmethod
        def _check_reveal(cls, v: ComponentSpec | None, info: ValidationInfo) -> ComponentSpec | None:
            if "reveal_column" not in info.data:  # reveal_column itself is invalid (reported there)
                return v
            column = info.data["reveal_column"]
            if v is not None and column is None:
                raise ValueError("reveal is set but reveal_column is not: name the template field to reveal")
            if v is None and column is not None:
                raise ValueError(f"reveal_column {column!r} is set, so give reveal: a schedule {{name, params}} or a "
                                 "number in [0, 1]")
            return v

    nested_slots: ClassVar[dict[str, str]] = {"reveal": "schedule"}

    def __init__(self, params: Params | None = None, nested: dict[str, Any] | None = None) -> None:
        super().__init__(params, nested)
        self.ctx: SetupContext | None = None
        self.shadow: ShadowWeights | None = None  # swapped in to score: the EMA, or the initial weights
        self._schedule: Any = self.nested.get("reveal")
        self._pending: dict[str, Any] | None = None  # EMA state loaded before setup() (the model is not known yet)
        self.temperature = 1.0

    @property
    def ema_decay(self) -> float:
        return self.params.ema_decay if self.params.ema_decay is not None else DEFAULT_EMA_DECAY

    def required_columns(self) -> tuple[str, ...]:
        cols = [f for f in _template_fields(self.params.template) if f != "prompt"]
        if self.params.reveal_column is not None:
            cols.append(self.params.reveal_column)
        return tuple(dict.fromkeys(cols))

    def engine_problems(self, sharding: str, *, lora: bool) -> list[tuple[str, str]]:
        """The teacher's weights live beside the student's parameters and are copied in to score. FSDP2 shards both
        alike (``initial`` works there); DeepSpeed ZeRO-3 partitions parameters outside its own forward, and an
        EMA's sharded averages are not gathered into checkpoints yet."""
        weights = self.params.weights
        if not (weights == "ema" and sharding in ("fsdp", "deepspeed_zero3")
                or weights == "initial" and not lora and sharding == "deepspeed_zero3"):
            return []
        engine = "DeepSpeed ZeRO-3" if sharding == "deepspeed_zero3" else "FSDP"
        alternatives = ("LoRA (the initial teacher is the base with the adapter off), weights: live, ZeRO-2 or FSDP2"
                        if weights == "initial" else "weights: initial (FSDP2, or LoRA), weights: live, or DDP / ZeRO-2")
        what = "on a full fine-tune " if weights == "initial" else ""
        return [("weights", f"teacher self_context: weights: {weights} {what}is not supported under {engine}, because "
                            "each rank holds only a shard of the parameters"
                            f"{' and an EMA of sharded weights is not checkpointed' if weights == 'ema' else ''}; "
                            f"use {alternatives}")]

    def setup(self, ctx: SetupContext) -> None:
        """Bind to the run's student. With ``weights: ema`` the average starts at the current trainable parameters
        and is updated after every optimizer step (``ctx.on_optimizer_step``; without it, call :meth:`update_ema`)."""
        self.ctx = ctx
        self.temperature = self.params.temperature or ctx.temperature
        model = ctx.model
        who = "teacher self_context"
        for _, message in self.engine_problems(ctx.sharding, lora=is_peft(model)):
            raise OPDError(message)
        if self.params.weights == "initial" and not is_peft(model):
            # Full fine-tuning: a copy of the starting trainable weights, swapped in to score. (Not a deepcopy of
            # the model: TRL patches ``model.forward`` with a closure over the live model, which a copy would keep.)
            self.shadow = ShadowWeights(model, who=who)
        if self.params.weights == "ema":
            self.shadow = ShadowWeights(model, ema_decay=self.ema_decay, who=who)
            if ctx.on_optimizer_step is not None:
                ctx.on_optimizer_step(self.update_ema)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.load_state_dict(pending)

    def update_ema(self) -> None:
        """θ_ema ← d·θ_ema + (1−d)·θ over the trainable parameters (called after every optimizer step)."""
        if self.params.weights != "ema" or self.shadow is None:
            raise RuntimeError("self_context: update_ema() needs weights: ema and setup()")
        self.shadow.update()

    # -- reveal ------------------------------------------------------------------------------------------------
    def reveal_ratio(self) -> float | None:
        """The fraction of ``reveal_column`` shown now (the schedule at the trainer's step, clamped to [0, 1]),
        or None without a reveal schedule."""
        if self._schedule is None:
            return None
        step, max_steps = self.ctx.progress() if self.ctx is not None else (0, 0)
        r = float(self._schedule.value(step, max_steps))
        if not math.isfinite(r):
            raise OPDError(f"teacher self_context: reveal schedule {self.params.reveal.name!r} gave {r} at step {step}")
        return min(max(r, 0.0), 1.0)

    # -- prompts -----------------------------------------------------------------------------------------------
    def teacher_prompt(self, prompt: Any, row: dict[str, Any], reveal_ratio: float | None = None) -> Any:
        """The privileged version of one prompt (conversational or plain text). With a reveal schedule only the
        first ``reveal_ratio`` (default: the current one) of ``reveal_column``'s words are shown."""
        column = self.params.reveal_column
        if column is not None and reveal_ratio is None:
            reveal_ratio = self.reveal_ratio()

        def render(text: str) -> str:
            fields = {k: v for k, v in row.items() if isinstance(v, (str, int, float))}
            fields["prompt"] = text
            missing = [c for c in self.required_columns() if c not in fields]
            if missing:
                raise DataError(
                    f"teacher self_context: template {self.params.template!r} needs column(s) {missing}, "
                    f"but the dataset rows have {sorted(k for k in row if k != 'prompt')}"
                )
            if column is not None:
                fields[column] = reveal_prefix(str(fields[column]), reveal_ratio)
            return self.params.template.format(**fields)

        if isinstance(prompt, str):
            return render(prompt)
        messages = copy.deepcopy(prompt)
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] = render(messages[last_user]["content"])
        return messages

    def _tokenize(self, prompts: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.ctx.tokenizer
        texts = [
            p if isinstance(p, str)
            else tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False, **self.ctx.chat_template_kwargs)
            for p in prompts
        ]
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(i) for i in ids)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        return input_ids, mask

    # -- scoring -----------------------------------------------------------------------------------------------
    def score(self, batch: TeacherBatch, want: Capability = "sampled") -> TeacherScores:
        if self.ctx is None:
            raise RuntimeError("self_context teacher used before setup()")
        ratio = self.reveal_ratio()
        if ratio is not None:
            self.ctx.log("teacher/reveal_ratio", ratio)
        rows = batch.rows or [{} for _ in batch.prompts]
        t_prompts = [self.teacher_prompt(p, r, ratio) for p, r in zip(batch.prompts, rows, strict=True)]
        p_ids, p_mask = self._tokenize(t_prompts)
        dev = batch.completion_ids.device
        ids = torch.cat([p_ids.to(dev), batch.completion_ids], 1)
        mask = torch.cat([p_mask.to(dev), batch.completion_mask], 1)
        model = self.ctx.model
        kwargs = {"want": want, "temperature": self.temperature, "top_k": self.params.top_k,
                  "chunk_size": self.params.chunk_size, "head_chunk": batch.head_chunk,
                  "full_as_hidden": batch.full_as_hidden}
        was_training = model.training
        model.eval()  # no dropout in the teacher's view
        try:
            if self.params.weights == "initial" and self.shadow is None:
                with model.disable_adapter():
                    return score_with_causal_lm(model, ids, mask, batch.completion_ids, batch.completion_mask, **kwargs)
            if self.shadow is not None:  # the teacher's weights are swapped back out after scoring: a head is copied
                with self.shadow.swapped_in():
                    return score_with_causal_lm(model, ids, mask, batch.completion_ids, batch.completion_mask,
                                                transient_head=True, **kwargs)
            return score_with_causal_lm(model, ids, mask, batch.completion_ids, batch.completion_mask, **kwargs)
        finally:
            model.train(was_training)

    # -- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """With ``weights: ema``: ``ema.<parameter name>`` (the live fp32 averages, not copies, as in torch) and
        ``ema_updates``; the reveal schedule's state under ``reveal.``."""
        if self._pending is not None:
            return dict(self._pending)
        state: dict[str, Any] = super().state_dict()
        if self.params.weights == "ema" and self.shadow is not None:
            state.update({f"ema.{n}": t for n, t in self.shadow.tensors.items()})
            state["ema_updates"] = self.shadow.updates
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        ema = {k[len("ema."):]: v for k, v in state.items() if k.startswith("ema.")}
        own = {k for k in state if k.startswith("ema.") or k == "ema_updates"}
        if own and self.params.weights != "ema":
            raise ValueError(f"checkpoint holds an EMA teacher, but this teacher has weights: {self.params.weights}")
        rest = {k: v for k, v in state.items() if k not in own}
        if any(k.startswith("reveal.") for k in rest) and self._schedule is None:
            raise ValueError("checkpoint holds reveal-schedule state, but this teacher has no reveal schedule")
        try:
            super().load_state_dict(rest)
        except ValueError as exc:
            raise ValueError(f"self_context state: {exc}") from None
        if own:
            if self.shadow is None:  # not set up yet: applied (and checked against the model) by setup()
                self._pending = {k: state[k] for k in own}
                return
            self.shadow.load(ema, int(state.get("ema_updates", 0)))
