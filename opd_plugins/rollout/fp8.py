"""``fp8``: sample from an FP8 (e4m3) policy — a private FP8 copy (``rollout_only``) or one precision flow for
training and rollout (``unified``, Jet-RL) — and report the behaviour log-probs of what it sampled."""

from __future__ import annotations

import time
import warnings
from typing import Any, ClassVar, Literal

from pydantic import Field
from torch import nn

from opd_plugins.components import ComponentParams
from opd_plugins.context import Rollouts, Sampling, SetupContext
from opd_plugins.errors import OPDError, did_you_mean
from opd_plugins.rollout import _fp8
from opd_plugins.rollout._private_copy import (adapter_free_name, check_text_only, effective_state,
                                               generate_with_logprobs, is_peft, private_copy)
from opd_plugins.rollout.base import RolloutBackend


class FP8Rollout(RolloutBackend):
    """Rollouts from the policy with its linear weights in FP8 (e4m3), with the behaviour log-probs of every sampled
    token, so the correction (``correction:``) and the ``correction/*`` metrics see the real train/rollout mismatch.

    ``flow: rollout_only`` (the common baseline; verl, NeMo-RL, slime): train in high precision and sample from a
    private copy whose eligible ``nn.Linear`` layers are :class:`~._fp8.FP8Linear` (real ``torch._scaled_mm`` FP8
    matmuls on Hopper/Ada GPUs, the weight dequantized into the compute dtype on CPU and older GPUs: the same
    numbers). The copy is re-quantized from the live weights at a weight sync: every optimizer step, or every
    ``sync_every`` steps (the rollouts then report the older policy version, seen in ``rollout/staleness``). With
    LoRA the copy is the merged model: ``W + ΔW`` is quantized.

    ``flow: unified`` (Jet-RL, https://arxiv.org/abs/2601.14243): the training forward itself runs on the quantized
    weights — each eligible layer of the student becomes a :class:`~._fp8.FakeQuantLinear` (fake quantization,
    straight-through gradient into the high-precision master weights, re-quantized once per weight version) — and
    the rollout samples from that same student, so the policy that is trained is the policy that sampled (mismatch
    0 up to float noise). With LoRA the frozen base layers are quantized and the adapters stay in high precision,
    in the training forward and the rollout alike. The student is the quantized network for every component that
    runs it: a ``self_context`` teacher scores with it too (the policy under privileged context, in the policy's
    precision), and evaluation measures it. Checkpoints hold the high-precision master weights.

    Formats: ``per_block`` (one float32 scale per ``block`` tile, 128x128 as vLLM's ``fp8_per_block`` and verl) or
    ``per_channel`` (one scale per output row). A layer a block does not divide gets its own scale for each partial
    edge tile (a warning lists them; on GPU such a layer runs the dequant path, not the blockwise kernel).
    ``skip`` names layers kept in high precision by suffix (``lm_head`` by default); layers with a side below
    ``min_features`` are skipped too. Paper and numbers: docs/fp8.md. Text-only; one process or DDP.
    """

    name: ClassVar[str] = "fp8"
    reports_behaviour_logps: ClassVar[bool] = True
    precision: ClassVar[str] = "fp8_e4m3"

    class Params(ComponentParams):
        flow: Literal["rollout_only", "unified"] = Field(
            "rollout_only", description="rollout_only: FP8 copy for sampling only; unified: train and sample on the "
                                        "same FP8 weights (straight-through gradient).")
        format: Literal["per_block", "per_channel"] = Field("per_block", description="Weight scaling.")
        block: tuple[int, int] = Field((128, 128), description="per_block tile (rows, cols).")
        sync_every: int = Field(1, ge=1, description="rollout_only: re-quantize every this many optimizer steps.")
        skip: list[str] = Field(["lm_head"], description="Linear layers kept in high precision (name suffixes).")
        min_features: int = Field(16, ge=1, description="Linear layers with a side below this are not quantized.")
        kernel: Literal["auto", "dequant"] = Field(
            "auto", description="rollout_only: auto = FP8 matmuls where the GPU has them; dequant = weight-only.")

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.behaviour_model: Any = None  # rollout_only: the FP8 copy
        self.version: int | None = None  # the optimizer step the FP8 weights were quantized from
        self.quantized: list[str] = []
        self.skipped: dict[str, str] = {}
        self._ctx: SetupContext | None = None
        self._student: Any = None  # unified: the module tree whose layers were made FakeQuantLinear

    @classmethod
    def example_params(cls) -> Params:
        return cls.Params(block=(32, 32))

    # ------------------------------------------------------------------------------------------------------
    def problems(self) -> list[tuple[str, str]]:
        p, out = self.params, []
        if min(p.block) < 1:
            out.append(("block", f"block sizes must be positive, got {list(p.block)}"))
        if p.format == "per_channel" and tuple(p.block) != (128, 128):
            out.append(("block", "block applies to format: per_block only; remove it (per_channel has one scale "
                                 "per output row)"))
        if p.flow == "unified":
            if p.sync_every != 1:
                out.append(("sync_every", "flow: unified samples from the training weights themselves, so there is "
                                          "nothing to sync; remove sync_every (or use flow: rollout_only)"))
            if "lm_head" not in p.skip:
                out.append(("skip", "flow: unified must keep lm_head in high precision, because TRL's GRPO "
                                    "trainer (and fused_lm_head divergences) compute the training log-probs from "
                                    "lm_head.weight directly, bypassing the layer: the trained head would not be "
                                    "the sampled one. Add lm_head to skip"))
            if p.kernel != "auto":
                out.append(("kernel", "kernel applies to flow: rollout_only (unified fake-quantizes the training "
                                      "weights); remove it"))
        return out

    def _check(self, ctx: SetupContext) -> None:
        problems = self.problems()
        if problems:
            raise OPDError("rollout 'fp8': " + "; ".join(f"params.{k}: {m}" for k, m in problems))
        for _, message in self.engine_problems(ctx.sharding, lora=False):
            raise OPDError(message)

    def engine_problems(self, sharding: str, *, lora: bool) -> list[tuple[str, str]]:
        if sharding in ("fsdp", "deepspeed_zero3"):
            return [("", f"rollout 'fp8' quantizes whole weight matrices, so it does not support {sharding}, whose "
                         "weights are sharded; use it on one process or with DDP (recipes/accelerate/ddp.yaml), or "
                         "FP8 rollouts from a vLLM server (rollout: vllm, docs/fp8.md)")]
        return []

    def _plan(self, model: Any) -> dict[str, Any]:
        """The live model's Linear layers to quantize, by their name in the merged (adapter-free) model."""
        p = self.params
        if is_peft(model):  # names as in the merged model; the adapters themselves are never quantized
            named = [(adapter_free_name(n), m) for n, m in model.get_base_model().named_modules()]
            named = [(n, m) for n, m in named if n is not None]
        else:
            named = list(model.named_modules())
        eligible, skipped = _fp8.plan_linears(named, p.skip, p.min_features)
        names = [n for n, m in named if isinstance(m, nn.Linear)]
        for entry in p.skip:
            if not any(n == entry or n.endswith("." + entry) for n in names):
                hint = did_you_mean(entry, sorted({n.rpartition(".")[2] for n in names}))
                raise OPDError(f"rollout 'fp8': params.skip: {entry!r} matches no Linear layer of the model{hint}")
        if not eligible:
            listed = "; ".join(f"{n} ({r})" for n, r in list(skipped.items())[:8]) or "the model has no nn.Linear"
            raise OPDError(f"rollout 'fp8': no Linear layer of the model can be quantized to FP8: {listed}. "
                           "Lower params.min_features or shorten params.skip")
        self.skipped = skipped
        if p.format == "per_block":
            partial = [f"{n} {tuple(m.weight.shape)}" for n, m in eligible.items()
                       if not _fp8.divides(m.weight.shape, p.block)]
            if partial:
                warnings.warn(
                    f"rollout 'fp8': {len(partial)} of {len(eligible)} layers are not multiples of the "
                    f"{p.block[0]}x{p.block[1]} block (e.g. {', '.join(partial[:3])}): their partial edge tiles get "
                    "their own scale (the numbers stay exact per tile); on GPU these layers run the dequant path, "
                    "not the blockwise FP8 kernel", stacklevel=3)
        return eligible

    def setup(self, ctx: SetupContext) -> None:
        self._check(ctx)
        self._ctx = ctx
        p = self.params
        eligible = self._plan(ctx.model)
        if p.flow == "unified":
            self.quantized = _fp8.fake_quantize_linears_(eligible, p.format, p.block)
            self._student = ctx.model
            self.version = ctx.step
            return
        self.behaviour_model = build_fp8_copy(ctx.model, p)
        self.quantized = sorted(n for n, m in self.behaviour_model.named_modules() if isinstance(m, _fp8.FP8Linear))
        self.version = ctx.step

    def sync_weights(self, model: Any, version: int) -> None:
        """rollout_only: re-quantize the FP8 copy from ``model`` when ``sync_every`` steps have passed since the
        last quantization (the first sync always quantizes). unified: nothing to copy."""
        version = int(version)
        if self.params.flow == "unified":
            self.version = version
            return
        if self.behaviour_model is None:
            self.behaviour_model = build_fp8_copy(model, self.params)
        elif self.version is not None and version - self.version < self.params.sync_every:
            return
        else:
            t = time.perf_counter()
            _fp8.requantize_from_state(self.behaviour_model, effective_state(model))
            if self._ctx is not None:
                self._ctx.log("fp8/requantize_s", time.perf_counter() - t)
        self.version = version

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> Rollouts:
        ctx = self._ctx
        if ctx is None:
            raise RuntimeError("fp8 rollout used before setup()")
        check_text_only(sampling, self.name)
        if self.params.flow == "unified":
            self.version = sampling.step
            model = ctx.model
        else:
            if self.version is None or sampling.step - self.version >= self.params.sync_every:
                self.sync_weights(ctx.model, sampling.step)
            model = self.behaviour_model
        completion_ids, logprobs = generate_with_logprobs(model, ctx, prompt_ids, temperature=float(ctx.temperature),
                                                          who=self.name)
        return Rollouts(completion_ids, logprobs, int(self.version))

    def close(self) -> None:
        """unified: give the student back its plain ``nn.Linear`` layers (the master weights were never changed)."""
        if self._student is not None:
            _fp8.restore_linears_(self._student)
            self._student = None


def build_fp8_copy(model: Any, params: FP8Rollout.Params) -> Any:
    """The ``rollout_only`` generation copy of ``model``: :func:`~._private_copy.private_copy` (LoRA merged) with
    every eligible Linear layer converted to an :class:`~._fp8.FP8Linear` (``params``: format, block, skip,
    min_features, kernel). The GPU throughput benchmark builds its FP8 arms with this too."""
    fp8 = _fp8.convert_to_fp8(private_copy(model, "rollout 'fp8'"), params.format, tuple(params.block),
                              tuple(params.skip), params.min_features)
    for mod in fp8.modules():
        if isinstance(mod, _fp8.FP8Linear):
            mod.kernel_request = params.kernel
            mod.keep_dequantized = mod.weight.device.type == "cpu"  # no FP8 matmul there: spare the re-dequantizing
    return fp8


__all__ = ["FP8Rollout", "build_fp8_copy"]
