"""``self_context``: the student's own weights with privileged context (on-policy self-distillation)."""

from __future__ import annotations

import copy
import string
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator

from opd_plugins.components import ComponentParams
from opd_plugins.errors import DataError
from opd_plugins.teachers.base import Capability, Teacher, TeacherBatch, TeacherScores, score_with_causal_lm


class SelfContextTeacher(Teacher):
    """The student itself, stop-gradient, with privileged context inserted into the prompt (OPSD).

    The teacher prompt is the student's last user message rewritten by ``template``, whose fields are
    ``{prompt}`` (the original message) and any dataset column (``{hint}``, ``{answer}``, ``{solution}``...).
    The completion the student sampled is then scored under that richer context. ``weights`` chooses the
    teacher's weights: ``live`` (the current policy, no gradient), or ``initial`` (frozen at the start: the
    LoRA adapter disabled, or a frozen copy for full fine-tuning).
    Paper: Zhao et al., "Self-Distilled Reasoner: On-Policy Self-Distillation" (OPSD),
    https://github.com/siyan-zhao/OPSD
    """

    name: ClassVar[str] = "self_context"
    capabilities: ClassVar[frozenset[str]] = frozenset({"sampled", "topk", "full"})

    class Params(ComponentParams):
        template: str = Field("{prompt}\n\n{hint}", description="Teacher's version of the last user message.")
        weights: Literal["live", "initial"] = Field("live", description="Current policy, or frozen initial weights.")
        temperature: float | None = Field(None, gt=0, description="Scoring temperature (default: the sampling temperature).")
        top_k: int = Field(0, ge=0, description="Also return the teacher's top-k per token.")
        chunk_size: int = Field(8, ge=1, description="Rows scored per forward pass.")
        allow_nonfinite: bool = Field(False, description="Mask and count NaN/inf teacher log-probs instead of failing.")

        @field_validator("template")
        @classmethod
        def _check_template(cls, v: str) -> str:
            fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
            if "prompt" not in fields:
                raise ValueError("template must contain {prompt} (the student's message)")
            if any(not f.isidentifier() for f in fields):
                raise ValueError(f"template fields must be plain column names, got {fields}")
            return v

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.trainer: Any = None
        self._frozen: torch.nn.Module | None = None
        self.temperature = 1.0

    def required_columns(self) -> tuple[str, ...]:
        return tuple(
            f for _, f, _, _ in string.Formatter().parse(self.params.template) if f is not None and f != "prompt"
        )

    def setup(self, trainer: Any) -> None:
        self.trainer = trainer
        self.temperature = self.params.temperature or trainer.temperature
        if self.params.weights == "initial" and not _is_peft(trainer.accelerator.unwrap_model(trainer.model)):
            # Full fine-tuning: keep a frozen copy of the starting weights.
            self._frozen = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model)).eval().requires_grad_(False)

    # -- prompts -----------------------------------------------------------------------------------------------
    def teacher_prompt(self, prompt: Any, row: dict[str, Any]) -> Any:
        """The privileged version of one prompt (conversational or plain text)."""
        def render(text: str) -> str:
            fields = {k: v for k, v in row.items() if isinstance(v, (str, int, float))}
            fields["prompt"] = text
            missing = [c for c in self.required_columns() if c not in fields]
            if missing:
                raise DataError(
                    f"teacher self_context: template {self.params.template!r} needs column(s) {missing}, "
                    f"but the dataset rows have {sorted(k for k in row if k != 'prompt')}"
                )
            return self.params.template.format(**fields)

        if isinstance(prompt, str):
            return render(prompt)
        messages = copy.deepcopy(prompt)
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] = render(messages[last_user]["content"])
        return messages

    def _tokenize(self, prompts: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.trainer.processing_class
        texts = [
            p if isinstance(p, str)
            else tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False, **self.trainer.chat_template_kwargs)
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
        if self.trainer is None:
            raise RuntimeError("self_context teacher used before setup()")
        rows = batch.rows or [{} for _ in batch.prompts]
        t_prompts = [self.teacher_prompt(p, r) for p, r in zip(batch.prompts, rows, strict=True)]
        p_ids, p_mask = self._tokenize(t_prompts)
        dev = batch.completion_ids.device
        ids = torch.cat([p_ids.to(dev), batch.completion_ids], 1)
        mask = torch.cat([p_mask.to(dev), batch.completion_mask], 1)
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        kwargs = dict(want=want, temperature=self.temperature, top_k=self.params.top_k, chunk_size=self.params.chunk_size)
        was_training = model.training
        model.eval()  # no dropout in the teacher's view
        try:
            if self.params.weights == "initial" and self._frozen is None:
                with model.disable_adapter():
                    return score_with_causal_lm(model, ids, mask, batch.completion_ids, batch.completion_mask, **kwargs)
            target = self._frozen if self._frozen is not None else model
            return score_with_causal_lm(target, ids, mask, batch.completion_ids, batch.completion_mask, **kwargs)
        finally:
            model.train(was_training)


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
