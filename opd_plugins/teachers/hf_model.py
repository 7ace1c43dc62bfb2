"""``hf_model``: a local transformers teacher that shares the student's tokenizer."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from opd_plugins.components import ComponentParams
from opd_plugins.context import SetupContext
from opd_plugins.errors import OPDError
from opd_plugins.teachers.base import Capability, Teacher, TeacherBatch, TeacherScores, score_with_causal_lm


class HFModelTeacher(Teacher):
    """A local Hugging Face causal LM as teacher (standard on-policy distillation).

    The teacher sees exactly the student's prompt and completion, scores every completion token with no
    gradient, and can return sampled-token log-probs, top-k, or the full vocabulary (computed in chunks of
    rows). Its tokenizer must match the student's (the vocabularies are compared before training).
    Paper: Agarwal et al., "On-Policy Distillation of Language Models" (GKD), https://arxiv.org/abs/2306.13649
    """

    name: ClassVar[str] = "hf_model"
    capabilities: ClassVar[frozenset[str]] = frozenset({"sampled", "topk", "full"})
    scores_any_rows: ClassVar[bool] = True

    class Params(ComponentParams):
        model: str = Field(..., description="Local path, hub id, or 'smollm2-135m-instruct'.")
        dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field("float32", description="Teacher weights dtype.")
        device: str | None = Field(None, description="Device for the teacher (default: the trainer's device).")
        placement: Literal["auto", "replicate", "shard"] = Field(
            "auto", description="shard: the teacher sharded with the student's engine (FSDP2 / ZeRO-3, no optimizer "
                                "state); replicate: a whole copy on every rank; auto: shard when the student is.")
        top_k: int = Field(0, ge=0, description="Also return the teacher's top-k per token (0 = only when asked).")
        temperature: float | None = Field(None, gt=0, description="Scoring temperature (default: the sampling temperature).")
        chunk_size: int = Field(8, ge=1, description="Rows scored per forward pass.")
        quantization: Literal["8bit", "4bit"] | None = Field(
            None, description="Load the teacher's weights in 8-bit or 4-bit (NF4) through bitsandbytes: a CUDA GPU "
                              "and the `quant` extra are required. Scores are computed in `dtype` (4-bit: bfloat16 "
                              "when dtype is float32).")
        trust_remote_code: bool = Field(False, description="Allow custom model code from the checkpoint.")
        allow_nonfinite: bool = Field(False, description="Mask and count NaN/inf teacher log-probs instead of failing.")

        @model_validator(mode="after")
        def _shard_alone(self):
            if self.placement == "shard" and (self.quantization or self.device):
                raise ValueError(f"placement: shard cannot be combined with "
                                 f"{'quantization' if self.quantization else 'device'} (a sharded teacher is "
                                 "the student engine's, in its dtype, on its devices); use placement: replicate")
            return self

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.model: torch.nn.Module | None = None
        self.placement = "replicate"
        self.temperature = 1.0
        self.device: torch.device | None = None

    @classmethod
    def example_params(cls) -> Params:
        return cls.Params(model="tiny-teacher")  # the contract suite points this at a tiny local model

    def engine_problems(self, sharding: str, *, lora: bool) -> list[tuple[str, str]]:
        p = self.params
        if p.placement == "shard" and sharding not in ("fsdp", "deepspeed_zero3"):
            return [("placement", f"teacher hf_model: placement: shard shards the teacher with the student's engine, "
                                  f"but the student is not sharded here ({sharding}); launch with an FSDP2 or ZeRO-3 "
                                  "accelerate config (recipes/accelerate/), or use placement: replicate")]
        return []

    def gpu_problems(self) -> list[tuple[str, str]]:
        """Settings that need a CUDA GPU, as ``(param, reason)`` (validation checks them on machines without one)."""
        p, out = self.params, []
        if str(p.device or "").startswith("cuda"):
            out.append(("device", f"device {p.device!r} needs a GPU and none is available here"))
        if p.quantization:
            out.append(("quantization", f"quantization {p.quantization!r} loads the weights through bitsandbytes, "
                        "which needs a CUDA GPU; none is available here (remove it on CPU)"))
        return out

    def setup(self, ctx: SetupContext) -> None:
        from opd_plugins.models import check_vocab_compatible, load_causal_lm, load_tokenizer, resolve_model_path

        p = self.params
        for _, message in self.engine_problems(ctx.sharding, lora=False):
            raise OPDError(message)  # before the teacher loads
        path = resolve_model_path(p.model)
        teacher_tok = load_tokenizer(path, trust_remote_code=p.trust_remote_code)
        self.model = load_causal_lm(path, dtype=p.dtype, trust_remote_code=p.trust_remote_code,
                                    quantization=p.quantization,
                                    device_map={"": str(p.device or ctx.device)} if p.quantization else None)
        student = ctx.model
        check_vocab_compatible(
            ctx.tokenizer, teacher_tok,
            student.config.get_text_config().vocab_size, self.model.config.get_text_config().vocab_size,
            getattr(student.config, "_name_or_path", "student") or "student", p.model,
        )
        self.attach(self.model, device=p.device or ctx.device, temperature=p.temperature or ctx.temperature)
        shard = p.placement == "shard" or (p.placement == "auto" and ctx.shard_frozen is not None and not p.device
                                           and not p.quantization)
        if shard:
            if ctx.shard_frozen is None:
                raise OPDError("teacher hf_model: placement: shard needs the trainer's sharding (ctx.shard_frozen), "
                               "which this setup context does not give; use placement: replicate")
            self.model = ctx.shard_frozen(self.model)
        self.placement = "shard" if shard else "replicate"

    def attach(self, model: torch.nn.Module, *, device: Any = "cpu", temperature: float = 1.0) -> None:
        """Use an already-loaded model as the teacher (frozen, eval mode)."""
        self.device = torch.device(device)
        if getattr(model, "is_quantized", False) or getattr(model, "quantization_method", None):
            self.model = model.eval().requires_grad_(False)  # placed at load time; quantized weights can't move
        else:
            self.model = model.to(self.device).eval().requires_grad_(False)
        self.temperature = temperature

    def score(self, batch: TeacherBatch, want: Capability = "sampled") -> TeacherScores:
        if self.model is None:
            raise RuntimeError("hf_model teacher used before setup()")
        dev = self.device
        ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1).to(dev)
        mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1).to(dev)
        scores = score_with_causal_lm(
            self.model, ids, mask, batch.completion_ids.to(dev), batch.completion_mask.to(dev), want=want,
            temperature=self.temperature, top_k=self.params.top_k, chunk_size=self.params.chunk_size,
            head_chunk=batch.head_chunk, full_as_hidden=batch.full_as_hidden,
        )
        out_dev = batch.completion_ids.device
        for name in TeacherScores.TENSOR_FIELDS:
            t = getattr(scores, name)
            if t is not None:
                setattr(scores, name, t.to(out_dev))
        return scores
