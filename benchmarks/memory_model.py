"""Per-GPU memory of a recipe under each accelerate engine: a model (an estimate), computed from the model configs.

Nothing is downloaded and no GPU is needed: the Qwen3 configs are written out below (their parameter counts are
checked against ``transformers.Qwen3ForCausalLM`` built on the ``meta`` device, ``--verify``), the recipe settings
come from the YAML, and every term is one of the small functions below, each with its formula in its docstring
(docs/memory_model.md cites them). For each recipe × engine × number of GPUs it prints one row: every component in
GiB, the total and the smallest GPU of ``--gpu-sizes`` it fits in with ``--headroom`` of the card left free.

    python benchmarks/memory_model.py [--recipes recipes/qwen3/*.yaml] [--gpus 1 8 16] [--prompt-len 256]
                                      [--engines ddp fsdp2 ...] [--set trainer.args.KEY=VALUE ...]
                                      [--markdown] [--json PATH] [--verify] [--calibrate]

Engines: ``ddp`` (plain data parallel), ``fsdp2`` / ``fsdp2_offload`` (FSDP2 full shard, without / with CPU
offload), ``zero2``, ``zero3`` / ``zero3_offload`` (DeepSpeed; offload = optimizer and parameters to CPU). An
engine the project refuses for a recipe is still listed, with its number and a note.

Peak: ``total = max(train, gen)`` with ``resident = weights + lora + optim + ref + teacher + scores``,
``train = resident + grads + gather + acts + logits`` and ``gen = resident + gen+`` (``gen_extra``: what the
generation / teacher-scoring step adds; for SODA the one-time snapshot, before training: whole bf16 weights +
its KV cache). Left out: the CUDA context (~0.5-1 GiB), allocator fragmentation, NCCL buffers, vLLM (colocated KV cache
and weights), and the CPU side of offloading.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GiB = 2 ** 30
ENGINES = ("ddp", "fsdp2", "fsdp2_offload", "zero2", "zero3", "zero3_offload")
SHARDED = ("fsdp2", "fsdp2_offload", "zero3", "zero3_offload")
GPU_SIZES_GIB = (24, 40, 48, 80, 96, 141)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2, "8bit": 1, "4bit": 0.5}
FULL_VOCAB_DIVERGENCES = ("forward_kl", "jsd", "skew_kl", "tv")  # FullVocabDivergence subclasses: requires "full"
PREFERENCE_TRAINERS = ("soda",)  # trainer.name: soda = preference pairs, then TRL's DPOTrainer
PREFERENCE_DIVERGENCES = ("dpo",)  # the earlier form of a SODA recipe: divergence: {name: dpo}
TRL_FUSED_TOKENS, TRL_FUSED_VOCAB = 4096, 32768  # trl.kernels.chunked_logprob TOKEN_CHUNK_SIZE × vocabulary tile
COLUMNS = ("weights", "lora", "grads", "optim", "gather", "ref", "teacher", "scores", "acts", "logits", "gen_extra")


# ---------------------------------------------------------------------------------------------------------------
# Model configs (Hugging Face config.json values) and parameter counts
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool

    @property
    def q_dim(self) -> int:
        """a·d: width of the query projection (heads × head_dim)."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """kv·d: width of the key and of the value projection (KV heads × head_dim)."""
        return self.num_key_value_heads * self.head_dim


MODEL_CONFIGS: dict[str, ModelConfig] = {
    "Qwen/Qwen3-0.6B": ModelConfig("Qwen/Qwen3-0.6B", 1024, 28, 16, 8, 128, 3072, 151936, True),
    "Qwen/Qwen3-1.7B": ModelConfig("Qwen/Qwen3-1.7B", 2048, 28, 16, 8, 128, 6144, 151936, True),
    "Qwen/Qwen3-8B": ModelConfig("Qwen/Qwen3-8B", 4096, 36, 32, 8, 128, 12288, 151936, False),
}


def embedding_params(m: ModelConfig) -> int:
    """Token embedding: V·H."""
    return m.vocab_size * m.hidden_size


def lm_head_params(m: ModelConfig) -> int:
    """Output layer: V·H, or 0 when tied to the embedding (tie_word_embeddings)."""
    return 0 if m.tie_word_embeddings else m.vocab_size * m.hidden_size


def attention_params(m: ModelConfig) -> int:
    """Qwen3 attention (no biases): q H·ad + k H·kvd + v H·kvd + o ad·H + q_norm d + k_norm d."""
    return 2 * m.hidden_size * m.q_dim + 2 * m.hidden_size * m.kv_dim + 2 * m.head_dim


def mlp_params(m: ModelConfig) -> int:
    """SwiGLU MLP (gate, up, down; no biases): 3·H·I."""
    return 3 * m.hidden_size * m.intermediate_size


def layer_params(m: ModelConfig) -> int:
    """One decoder layer: attention + MLP + two RMSNorm weights (2·H)."""
    return attention_params(m) + mlp_params(m) + 2 * m.hidden_size


def total_params(m: ModelConfig) -> int:
    """Whole model: V·H (embedding) + L·layer + H (final norm) + V·H if the lm head is not tied."""
    return embedding_params(m) + m.num_hidden_layers * layer_params(m) + m.hidden_size + lm_head_params(m)


def lora_target_linears(m: ModelConfig) -> list[tuple[str, int, int]]:
    """The Linear layers of one decoder layer as ``(name, in_features, out_features)``: what PEFT's ``all-linear``
    targets (every Linear but the output layer)."""
    H, I = m.hidden_size, m.intermediate_size
    return [("q_proj", H, m.q_dim), ("k_proj", H, m.kv_dim), ("v_proj", H, m.kv_dim), ("o_proj", m.q_dim, H),
            ("gate_proj", H, I), ("up_proj", H, I), ("down_proj", I, H)]


def lora_params(m: ModelConfig, r: int, target_modules: Any = "all-linear") -> int:
    """LoRA adapter: L · Σ over the target linears of r·(in + out) (A is r×in, B is out×r)."""
    targets = lora_target_linears(m)
    if target_modules != "all-linear":
        names = {target_modules} if isinstance(target_modules, str) else set(target_modules)
        targets = [t for t in targets if t[0] in names]
    return m.num_hidden_layers * sum(r * (i + o) for _, i, o in targets)


def transformers_config(m: ModelConfig, **overrides: Any) -> Any:
    """The ``transformers.Qwen3Config`` with these shapes (``overrides`` replace fields, e.g. for a tiny copy)."""
    from transformers import Qwen3Config

    kw = dict(hidden_size=m.hidden_size, num_hidden_layers=m.num_hidden_layers,
              num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_key_value_heads,
              head_dim=m.head_dim, intermediate_size=m.intermediate_size, vocab_size=m.vocab_size,
              tie_word_embeddings=m.tie_word_embeddings, attention_bias=False)
    kw.update(overrides)
    return Qwen3Config(**kw)


def meta_param_count(m: ModelConfig) -> int:
    """``sum(p.numel())`` of ``Qwen3ForCausalLM`` built on the meta device (no memory, no download)."""
    import torch
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(transformers_config(m))
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Student weights, gradients and optimizer state per engine (bytes per GPU)
# ---------------------------------------------------------------------------------------------------------------


def trainable_dtype_bytes(engine: str, model_dtype_bytes: float, lora: bool, mixed_bf16: bool) -> float:
    """Bytes of one trainable parameter as the engine keeps it (its gradient and AdamW m, v have the same dtype
    under ddp and fsdp2):

    * ddp: LoRA adapters 4 (PEFT's ``autocast_adapter_dtype=True`` makes them fp32 on a bf16 model); full
      fine-tuning the loaded dtype (2 for bf16: HF Trainer keeps bf16 params, no fp32 master);
    * fsdp2: 4 under mixed precision (accelerate's ``fsdp2_prepare_model`` upcasts trainable params to fp32,
      ``MixedPrecisionPolicy(param_dtype=bf16)`` casts for compute), else the loaded dtype;
    * zero2/zero3: 2 under bf16 (DeepSpeed casts the module to bf16; TRL passes ``autocast_adapter_dtype=False``
      under ZeRO-3), with an fp32 master copy in the optimizer state.
    """
    if engine.startswith("zero"):
        return 2 if mixed_bf16 else model_dtype_bytes
    if engine.startswith("fsdp2"):
        return 4 if mixed_bf16 else model_dtype_bytes
    return 4 if lora else model_dtype_bytes


def student_weight_bytes(engine: str, n_frozen: int, n_trainable: int, n_gpus: int, model_dtype_bytes: float,
                         lora: bool, mixed_bf16: bool) -> tuple[float, float]:
    """Resident student weights per GPU as ``(base, adapter)``; ``n_frozen`` = the frozen base (LoRA) or 0,
    ``n_trainable`` = all params (full) or the adapter, b = :func:`trainable_dtype_bytes`, p = loaded dtype:

    * ddp, zero2: base n_frozen·p, trainable n_trainable·b (whole copies on every GPU);
    * fsdp2, zero3: the same divided by N (full shard); the unsharded layers in use are :func:`gather_bytes`;
    * fsdp2_offload, zero3_offload: 0 (sharded params live in CPU memory).
    """
    b = trainable_dtype_bytes(engine, model_dtype_bytes, lora, mixed_bf16)
    p = 2 if engine.startswith("zero") and mixed_bf16 else model_dtype_bytes
    if engine.endswith("_offload"):
        return 0.0, 0.0
    share = 1 / n_gpus if engine in SHARDED else 1.0
    frozen, trainable = n_frozen * p * share, n_trainable * b * share
    return (frozen, trainable) if lora else (frozen + trainable, 0.0)


def gradient_bytes(engine: str, n_trainable: int, n_gpus: int, model_dtype_bytes: float, lora: bool,
                   mixed_bf16: bool) -> float:
    """Gradients of the trainable params per GPU (b = :func:`trainable_dtype_bytes`):

    * ddp: n·b, plus another n·b for DDP's all-reduce buckets when N > 1 (``gradient_as_bucket_view=False``, as
      HF Trainer builds ``DistributedDataParallelKwargs``); a single process is not wrapped in DDP;
    * fsdp2: n·4/N (sharded fp32 grads after the reduce-scatter); zero2, zero3: n·2/N (bf16 partitions);
    * offload: 0 on the GPU (reduced into CPU memory).
    """
    b = trainable_dtype_bytes(engine, model_dtype_bytes, lora, mixed_bf16)
    if engine.endswith("_offload"):
        return 0.0
    if engine == "ddp":
        return n_trainable * b * (2 if n_gpus > 1 else 1)
    return n_trainable * b / n_gpus


def optimizer_bytes(engine: str, n_trainable: int, n_gpus: int, model_dtype_bytes: float, lora: bool,
                    mixed_bf16: bool) -> float:
    """AdamW state per GPU (``adamw_torch_fused``: m and v in the param dtype; DeepSpeed: fp32):

    * ddp: n·2b (m, v in the param dtype: 4 bytes/param for a bf16 full fine-tune, no fp32 master;
      8 for fp32 LoRA adapters);
    * fsdp2: n·8/N (fp32 m, v of the fp32 sharded params, which double as the master copy);
    * zero2, zero3: n·12/N under bf16 (fp32 master 4 + m 4 + v 4, partitioned), n·8/N without;
    * offload: 0 on the GPU.
    """
    b = trainable_dtype_bytes(engine, model_dtype_bytes, lora, mixed_bf16)
    if engine.endswith("_offload"):
        return 0.0
    if engine == "ddp":
        return n_trainable * 2 * b
    if engine == "fsdp2":
        return n_trainable * 8 / n_gpus
    return n_trainable * (12 if mixed_bf16 else 8) / n_gpus


def gather_bytes(engine: str, m: ModelConfig, lora: bool) -> float:
    """Unsharded working set of a sharded engine during forward/backward (bf16, 2 bytes):

    * fsdp2(_offload): the root unit (embedding, untied lm head, final norm: FSDP2 keeps the root unsharded
      from forward to backward) + 2 decoder layers (the current one and the prefetched next), plus, when
      training all params, their unsharded bf16 gradients before the reduce-scatter (root + 1 layer);
    * zero3(_offload): max(embedding, 2 layers) of params + 1 layer of unsharded bf16 gradients (full FT);
    * ddp, zero2: 0 (params are whole).
    """
    root = embedding_params(m) + lm_head_params(m) + m.hidden_size
    layer = layer_params(m)
    if engine.startswith("fsdp2"):
        return 2 * (root + 2 * layer) + (0 if lora else 2 * (root + layer))
    if engine.startswith("zero3"):
        return 2 * max(embedding_params(m), 2 * layer) + (0 if lora else 2 * layer)
    return 0.0


def generation_gather_bytes(engine: str, m: ModelConfig, n_gpus: int) -> float:
    """Params gathered for HF ``generate``: zero3 with TRL's ``ds3_gather_for_generation=True`` gathers the whole
    model, 2·Ψ·(1 − 1/N) beyond the resident shard (2·Ψ with offload); fsdp2 summons the root only and gathers
    layer by layer (:func:`gather_bytes`' params part); ddp, zero2: 0."""
    psi = total_params(m)
    if engine == "zero3":
        return 2 * psi * (1 - 1 / n_gpus)
    if engine == "zero3_offload":
        return 2 * psi
    if engine.startswith("fsdp2"):
        return 2 * (embedding_params(m) + lm_head_params(m) + m.hidden_size + 2 * layer_params(m))
    return 0.0


# ---------------------------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------------------------


def layer_activation_bytes_per_token(m: ModelConfig, seq_len: int, *, lora_r: int = 0, adapter_cast: bool = False,
                                     padded: bool = True) -> float:
    """Bytes one Qwen3 decoder layer saves for backward per token (bf16 compute, SDPA's fused kernels: no
    (S, S) score matrix), counted op by op from transformers' Qwen3 code and checked exactly with saved-tensor
    hooks (tests/unit/test_memory_model.py). With H, ad = q_dim, kvd = kv_dim, I, a heads, kv KV heads, r:

    * full fine-tuning: 16H + 10·ad + 10·kvd + 8I + 8a + 4kv + 8 (each RMSNorm keeps its fp32 input, 1/rms and
      the bf16 normalized input of the weight product; the q/k norms alike; SDPA keeps q, k, v, its output and
      the fp32 log-sum-exp; SwiGLU keeps gate, act(gate), up and their product);
    * LoRA, bf16 adapters (DeepSpeed): 12H + 8·ad + 8·kvd + 8I + 14r + 8a + 4kv + 8 (frozen norm weights need
      nothing for their product; each of the 7 adapters keeps its r-wide A output);
    * LoRA, fp32 adapters under bf16 autocast (ddp, fsdp2: ``adapter_cast``): 18H + 10·ad + 8·kvd + 8I + 14r +
      8a + 4kv + 8 (each adapter keeps its own bf16 copy of its input, 5H + ad + I, while the frozen base linears
      keep none) — plus the per-layer bf16 weight casts, :func:`activation_bytes`;
    * ``padded`` (a batch with a padding mask, as GRPO/DPO batches are): transformers expands k, v to a heads
      (``repeat_kv``, + 4·(ad − kvd)) and SDPA keeps the bf16 additive mask, (B, 1, S, S) per layer (+ 2·S).
    """
    H, ad, kvd, I = m.hidden_size, m.q_dim, m.kv_dim, m.intermediate_size
    a, kv = m.num_attention_heads, m.num_key_value_heads
    if not lora_r:
        b = 16 * H + 10 * ad + 10 * kvd + 8 * I
    elif adapter_cast:
        b = 18 * H + 10 * ad + 8 * kvd + 8 * I + 14 * lora_r
    else:
        b = 12 * H + 8 * ad + 8 * kvd + 8 * I + 14 * lora_r
    b += 8 * a + 4 * kv + 8
    if padded:
        b += 4 * (ad - kvd) + 2 * seq_len
    return b


def korthikanti_layer_bytes_per_token(m: ModelConfig, seq_len: int, flash: bool = True) -> float:
    """Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 1), per
    token: 34·H + 5·a·S bytes (fp16, GPT block with a 4H GELU MLP and dropout); the 5·a·S term (attention scores,
    softmax and its dropout mask) is absent with flash/SDPA attention (``flash``)."""
    return 34 * m.hidden_size + (0 if flash else 5 * m.num_attention_heads * seq_len)


def activation_bytes(m: ModelConfig, batch: int, seq_len: int, *, gradient_checkpointing: bool,
                     per_token_layer: float, lora: bool, layer_cast_bytes: float = 0) -> float:
    """Activations of one micro-batch (B sequences of S tokens), with A = per-token bytes of one layer
    (:func:`layer_activation_bytes_per_token` or :func:`korthikanti_layer_bytes_per_token`):

    * with gradient checkpointing (one checkpoint per decoder layer): L·B·S·2H (the bf16 hidden state saved at
      each layer boundary) + B·S·A (one layer's activations, recomputed in backward);
    * without: L·B·S·A;

    plus the final norm B·S·(8H + 4) (full) or B·S·(4H + 4) (LoRA: frozen weight), two bf16 B·S·H gradient
    buffers of the residual stream during backward (B·S·4H), and ``layer_cast_bytes`` for every layer whose
    activations are held (all L, or 1 with checkpointing): autocast's bf16 copies of fp32 LoRA weights,
    2·r·Σ(in + out) per layer.
    """
    H, L, tokens = m.hidden_size, m.num_hidden_layers, batch * seq_len
    held = 1 if gradient_checkpointing else L
    body = held * (tokens * per_token_layer + layer_cast_bytes) + (L * tokens * 2 * H if gradient_checkpointing else 0)
    final_norm = tokens * ((4 if lora else 8) * H + 4)
    return body + final_norm + tokens * 4 * H


# ---------------------------------------------------------------------------------------------------------------
# Logits
# ---------------------------------------------------------------------------------------------------------------


def full_logits_bytes(batch: int, completion_len: int, vocab: int) -> float:
    """Student logits when the divergence reads them (estimator full, top-k; not fused): 20·B·T·V bytes = five
    fp32 (B, T, V) tensors at the backward peak: the fp32 logits (kept by the chunked divergence), the
    log-softmax output (kept for the sampled-token log-probs), the divergence's fp32 logit gradient, the
    log-softmax path's gradient and their sum. Measured: peak RSS of that code path on CPU = 5.0 × 4·B·T·V."""
    return 20 * batch * completion_len * vocab


def trl_fused_logits_bytes(m: ModelConfig, tokens: int, lm_head_trainable: bool) -> float:
    """TRL's fused LM head (GRPO's sampled-token log-probs, DPO): one fp32 [min(N, 4096) × 32768] logit tile
    + the fp32 gradient of the hidden states N·H·4 + the fp32 lm-head gradient V·H·4 when it is trained; the
    (N, V) logits never exist."""
    tile = min(tokens, TRL_FUSED_TOKENS) * min(m.vocab_size, TRL_FUSED_VOCAB) * 4
    return tile + tokens * m.hidden_size * 4 + (m.vocab_size * m.hidden_size * 4 if lm_head_trainable else 0)


def project_fused_logits_bytes(m: ModelConfig, tokens: int, chunk: int, lm_head_trainable: bool) -> float:
    """The project's ``fused_lm_head: true`` (``FusedLinearDivergence``): ~18·chunk·V (the chunk's bf16 logits, fp32
    log-probs and two fp32 gradients) + an fp32 copy of the lm head V·H·4 + its fp32 gradient V·H·4 when trained
    + the hidden-state gradient N·H·2."""
    V, H = m.vocab_size, m.hidden_size
    return 18 * min(chunk, tokens) * V + 4 * V * H + (4 * V * H if lm_head_trainable else 0) + 2 * tokens * H


# ---------------------------------------------------------------------------------------------------------------
# Teacher: weights, scores, scoring transient; generation KV cache
# ---------------------------------------------------------------------------------------------------------------


def teacher_weight_bytes(m: ModelConfig, dtype_bytes: float, engine: str, n_gpus: int, shard: bool = False) -> float:
    """A separate teacher model: Ψ_t·dtype bytes, a full copy on every GPU (the ``hf_model`` teacher is
    ``model.to(device)``, never wrapped by accelerate, so no engine shards it); with ``shard`` (a hypothetical
    ZeRO-3/FSDP2 inference wrapping, as TRL's GKD does for its teacher) Ψ_t·dtype/N under zero3*/fsdp2*."""
    full = total_params(m) * dtype_bytes
    return full / n_gpus if shard and engine in SHARDED else full


LOSS_TIME_TEACHERS = ("hf_model", "self_context")
"""Teachers that score any rows at any time (``Teacher.scores_any_rows``): with a full-vocabulary divergence they
score each micro-batch in the loss (``teacher_scoring: auto``)."""


def full_vocab_scores_bytes(gen_batch: int, completion_len: int, vocab: int) -> int:
    """Full-vocabulary teacher log-probs for a whole generation batch: B_gen·T·V·4 (fp32)."""
    return gen_batch * completion_len * vocab * 4


def topk_scores_bytes(gen_batch: int, completion_len: int, k: int) -> int:
    """Top-k teacher scores: B_gen·T·k·(8 + 4) (int64 ids + fp32 log-probs) + B_gen·T·4 (their mass)."""
    return gen_batch * completion_len * (k * 12 + 4)


def sampled_scores_bytes(gen_batch: int, completion_len: int) -> int:
    """Per-token teacher tensors always held: token log-probs, entropy and mask, 3·B_gen·T·4 (fp32)."""
    return 3 * gen_batch * completion_len * 4


def scoring_transient_bytes(m: ModelConfig, chunk: int, seq_len: int, completion_len: int) -> float:
    """``score_with_causal_lm`` on ``chunk`` rows at a time (no grad), beyond the log-probs it keeps: 4·c·T·V
    (the chunk's bf16 logits beside their fp32 copy, which becomes the log-probs in place, a row at a time;
    measured on CPU: peak RSS = kept + 4.0·c·T·V) + the forward's KV cache c·S·L·2·kvd·2 (``use_cache`` is on by
    default) + one layer's no-grad temporaries c·S·(6H + 6I)."""
    c = chunk
    logits = 4 * c * completion_len * m.vocab_size
    return logits + kv_cache_bytes(m, c, seq_len) + c * seq_len * (6 * m.hidden_size + 6 * m.intermediate_size)


def hidden_scoring_transient_bytes(m: ModelConfig, chunk: int, seq_len: int, head_chunk: int) -> float:
    """``score_with_causal_lm`` with ``head_chunk`` (a ``fused_lm_head`` divergence): the teacher's forward on
    ``chunk`` rows without logits (KV cache + one layer's no-grad temporaries, as above) and its scores computed
    from the final hidden states ``head_chunk`` tokens at a time: ~12·head_chunk·V (a chunk's fp32 logits, their
    log-softmax and its exp)."""
    c = chunk
    return kv_cache_bytes(m, c, seq_len) + c * seq_len * (6 * m.hidden_size + 6 * m.intermediate_size) + \
        12 * head_chunk * m.vocab_size


def factored_scores_bytes(batch: int, completion_len: int, teacher: ModelConfig, dtype_bytes: float) -> float:
    """The teacher's full vocabulary in factored form (``TeacherScores.hidden`` + its lm head, which it already
    holds): its final hidden states B·T·H_t in its dtype."""
    return batch * completion_len * teacher.hidden_size * dtype_bytes


def generation_step_bytes(main_scores: float, generate: float, scoring: float, chunk: int, completion_len: int,
                          vocab: int) -> float:
    """What the generation step adds on top of the resident set (which already holds the previous generation
    batch: TRL replaces ``_buffered_inputs`` only once the new batch is scored and shuffled), the largest of:

    * generating: ``generate`` (KV cache + params gathered for generation);
    * scoring: the new log-probs so far + the chunk's transient (``scoring``, :func:`scoring_transient_bytes`);
    * ``torch.cat`` of the chunks: 2·main (the chunk list and its concatenation; measured on CPU); TRL's
      ``shuffle_sequence_dict`` then copies the batch once more (2·main).
    """
    cat = 2 * main_scores
    return max(generate, scoring, cat)


def kv_cache_bytes(m: ModelConfig, batch: int, seq_len: int) -> float:
    """bf16 KV cache of HF ``generate`` / a forward with ``use_cache``: B·S·L·2·kvd·2."""
    return batch * seq_len * m.num_hidden_layers * 2 * m.kv_dim * 2


def fits_in(total_bytes: float, sizes_gib: tuple[float, ...] = GPU_SIZES_GIB, headroom: float = 0.10) -> float | None:
    """The smallest GPU (GiB) with total ≤ (1 − headroom)·capacity, or None."""
    for size in sorted(sizes_gib):
        if total_bytes <= (1 - headroom) * size * GiB:
            return size
    return None


# ---------------------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RecipeSettings:
    path: str
    name: str
    model: ModelConfig
    model_dtype: str
    lora_r: int  # 0 = full fine-tune
    lora_targets: Any
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    steps_per_generation: int
    generation_batch_size: int | None  # GRPO: global, per generation; SODA: prompts per snapshot batch
    num_generations: int
    max_completion_length: int
    gradient_checkpointing: bool
    bf16: bool
    teacher: str
    teacher_model: ModelConfig | None
    teacher_dtype: str
    teacher_chunk: int
    teacher_weights: str  # self_context: live / initial / ema
    divergence: str
    want: str  # sampled / topk / full / preference
    top_k: int
    fused_lm_head: bool
    fused_chunk: int
    max_length: int  # DPO
    prompt_len: int
    teacher_scoring: str = "auto"  # trainer.args.teacher_scoring: auto / generation / loss

    @property
    def teacher_at_loss(self) -> bool:
        """Full-vocabulary scores computed per micro-batch in the loss (OPDConfig.teacher_scoring)."""
        return (self.want == "full" and self.teacher in LOSS_TIME_TEACHERS
                and self.teacher_scoring in ("auto", "loss"))

    @property
    def preference(self) -> bool:
        return self.want == "preference"


def _model_config(name: str, where: str) -> ModelConfig:
    if name not in MODEL_CONFIGS:
        raise SystemExit(f"{where}: no config for {name!r} in benchmarks/memory_model.py (known: "
                         f"{', '.join(MODEL_CONFIGS)}); add its config.json values to MODEL_CONFIGS")
    return MODEL_CONFIGS[name]


def apply_overrides(recipe: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` with a dotted KEY (``trainer.args.per_device_train_batch_size=2``), VALUE parsed as YAML."""
    import yaml

    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        *parents, leaf = key.split(".")
        node = recipe
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    return recipe


def read_recipe(path: str, prompt_len: int = 256, overrides: list[str] | None = None) -> RecipeSettings:
    """The settings the memory model needs, from a recipe YAML (``yaml.safe_load``; TRL defaults where unset)."""
    import yaml

    with open(path) as f:
        r = apply_overrides(yaml.safe_load(f), overrides or [])
    model = r.get("model") or {}
    args = (r.get("trainer") or {}).get("args") or {}
    lora = model.get("lora")
    teacher = r.get("teacher") or {}
    tparams = teacher.get("params") or {}
    div = r.get("divergence") or {}
    dparams = div.get("params") or {}
    dname = div.get("name", "")
    tname = teacher.get("name", "")
    trainer_name = (r.get("trainer") or {}).get("name", "opd")
    if trainer_name in PREFERENCE_TRAINERS or dname in PREFERENCE_DIVERGENCES:
        want = "preference"
    elif dname in FULL_VOCAB_DIVERGENCES:
        want = "full"
    elif dname == "topk_kl":
        want = "topk"
    elif dname == "reverse_kl":
        want = "full" if dparams.get("estimator", "sampled") == "full" else "sampled"
    else:
        want = "sampled"
    ga = int(args.get("gradient_accumulation_steps", 1))
    student = _model_config(model.get("name_or_path", ""), path)
    teacher_model = None
    if tname == "hf_model":
        teacher_model = _model_config(tparams.get("model", ""), f"{path}: teacher")
    return RecipeSettings(
        path=path, name=Path(path).stem, model=student, model_dtype=model.get("dtype", "float32"),
        lora_r=int(lora["r"]) if lora else 0, lora_targets=(lora or {}).get("target_modules", "all-linear"),
        per_device_train_batch_size=int(args.get("per_device_train_batch_size", 8)),
        gradient_accumulation_steps=ga,
        steps_per_generation=int(args.get("steps_per_generation") or ga),
        generation_batch_size=args.get("generation_batch_size"),
        num_generations=int(args.get("num_generations", 8)),
        max_completion_length=int(args.get("max_completion_length", 256)),
        gradient_checkpointing=bool(args.get("gradient_checkpointing", False)),
        bf16=bool(args.get("bf16", False)),
        teacher=tname, teacher_model=teacher_model, teacher_dtype=str(tparams.get("quantization") or
                                                                     tparams.get("dtype", "float32")),
        teacher_chunk=int(tparams.get("chunk_size", 8)), teacher_weights=str(tparams.get("weights", "live")),
        divergence=dname, want=want, top_k=int(tparams.get("top_k", 0)) or 1,
        fused_lm_head=bool(dparams.get("fused_lm_head", False)), fused_chunk=int(dparams.get("chunk_size", 256) or 256),
        max_length=int(args.get("max_length", 1024)), prompt_len=prompt_len,
        teacher_scoring=str(args.get("teacher_scoring", "auto")),
    )


# ---------------------------------------------------------------------------------------------------------------
# One row
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    recipe: str
    engine: str
    gpus: int
    components: dict[str, float]  # bytes
    train: float
    gen: float
    total: float
    peak_phase: str
    fits: float | None
    notes: list[str] = field(default_factory=list)


def gen_batch_per_device(s: RecipeSettings, n_gpus: int) -> int:
    """B_gen: completions one GPU generates and scores at once = per_device_train_batch_size ×
    steps_per_generation (default gradient_accumulation_steps), or generation_batch_size / N when set."""
    if s.generation_batch_size and not s.preference:
        return max(1, int(s.generation_batch_size) // n_gpus)
    return s.per_device_train_batch_size * s.steps_per_generation


def estimate(s: RecipeSettings, engine: str, n_gpus: int, *, headroom: float = 0.10,
             sizes: tuple[float, ...] = GPU_SIZES_GIB, activations: str = "qwen3", padded: bool = True,
             shard_teacher: bool = False) -> Row:
    """Every component (bytes per GPU) of recipe ``s`` on ``n_gpus`` GPUs under ``engine``; see the module
    docstring for how they add up."""
    m = s.model
    lora = s.lora_r > 0
    p = DTYPE_BYTES.get(s.model_dtype, 4)
    mixed = s.bf16
    psi = total_params(m)
    n_adapter = lora_params(m, s.lora_r, s.lora_targets) if lora else 0
    n_train, n_frozen = (n_adapter, psi) if lora else (psi, 0)
    notes: list[str] = []
    c: dict[str, float] = dict.fromkeys(COLUMNS, 0.0)
    loss_scoring = 0.0  # teacher scores of one micro-batch, computed in the loss (teacher_scoring)
    c["weights"], c["lora"] = student_weight_bytes(engine, n_frozen, n_train, n_gpus, p, lora, mixed)
    c["grads"] = gradient_bytes(engine, n_train, n_gpus, p, lora, mixed)
    c["optim"] = optimizer_bytes(engine, n_train, n_gpus, p, lora, mixed)
    c["gather"] = gather_bytes(engine, m, lora)
    adapter_cast = lora and not engine.startswith("zero")  # fp32 adapters under autocast (ddp, fsdp2)

    P, T = s.prompt_len, s.max_completion_length
    if s.preference:
        # DPO: [chosen; rejected] → 2B sequences per micro-batch; reference = adapter disabled (LoRA) or a frozen
        # copy (TRL: prepare_deepspeed → sharded under ZeRO-3, prepare_fsdp → sharded under FSDP, else whole).
        seq = min(s.max_length, P + T)
        batch = 2 * s.per_device_train_batch_size
        if not lora:
            ref = psi * (2 if mixed else p)
            c["ref"] = ref / n_gpus if engine in SHARDED else ref
        c["logits"] = trl_fused_logits_bytes(m, batch * T, lm_head_trainable=not lora)
        # the one-time snapshot (before the trainer exists): generation_batch_size prompts, one sample each
        snap = int(s.generation_batch_size or 32)
        c["gen_extra"] = kv_cache_bytes(m, snap, P + T)
        notes.append("text teacher served elsewhere; gen = the one-time snapshot, before training")
    else:
        seq = P + T
        batch = s.per_device_train_batch_size
        bgen = gen_batch_per_device(s, n_gpus)
        lm_head_trainable = not lora
        # a fused divergence takes a local teacher's head: the teacher never forms logits, the kernel computes its
        # log-probs a chunk at a time beside the student's (~8·chunk·V more: its fp32 logits and log-probs)
        teacher_head = s.want == "full" and s.fused_lm_head and s.teacher in LOSS_TIME_TEACHERS
        if s.want == "full" and s.fused_lm_head:
            c["logits"] = project_fused_logits_bytes(m, batch * T, s.fused_chunk, lm_head_trainable)
            if teacher_head and s.teacher_at_loss:
                c["logits"] += 8 * min(s.fused_chunk, batch * T) * m.vocab_size
            if engine in SHARDED:
                notes.append("refused: fused_lm_head needs an unsharded lm head")
        elif s.want in ("full", "topk"):
            c["logits"] = full_logits_bytes(batch, T, m.vocab_size)
        else:
            c["logits"] = trl_fused_logits_bytes(m, batch * T, lm_head_trainable)
        main = {"full": full_vocab_scores_bytes(bgen, T, m.vocab_size),
                "topk": topk_scores_bytes(bgen, T, s.top_k)}.get(s.want, 0)
        if s.teacher_at_loss:  # scored per micro-batch in the loss: (micro-batch, T, V) while it trains
            main = 0
            notes.append("teacher scored per micro-batch in the loss")
        c["scores"] = main + sampled_scores_bytes(bgen, T)
        scorer = m
        if s.teacher == "hf_model" and s.teacher_model is not None:
            scorer = s.teacher_model
            c["teacher"] = teacher_weight_bytes(scorer, DTYPE_BYTES.get(s.teacher_dtype, 4), engine, n_gpus,
                                                shard_teacher)
        elif s.teacher == "self_context" and s.teacher_weights in ("initial", "ema") and (
                not lora or s.teacher_weights == "ema"):
            # a copy of the trainable weights swapped in to score (initial: their dtype; ema: fp32)
            per = 4 if s.teacher_weights == "ema" else trainable_dtype_bytes("ddp", p, lora, mixed)
            c["ref"] = n_train * per
            if engine in SHARDED:
                notes.append(f"refused: self_context weights: {s.teacher_weights} needs unsharded params")
        # the generation step: generate, then score with the teacher (beside the previous buffered batch)
        generate = kv_cache_bytes(m, bgen, seq) + generation_gather_bytes(engine, m, n_gpus)
        if teacher_head:
            scoring = main + hidden_scoring_transient_bytes(scorer, s.teacher_chunk, seq, s.fused_chunk)
        else:
            scoring = main + scoring_transient_bytes(scorer, s.teacher_chunk, seq, T) if s.teacher else 0
        c["gen_extra"] = generation_step_bytes(main, generate, scoring, s.teacher_chunk, T, scorer.vocab_size)
        if s.teacher_at_loss:  # the micro-batch's scores stay through the backward; scoring them precedes the
            # student's forward, so its transient and the student's logits path do not overlap
            if teacher_head:
                kept = factored_scores_bytes(batch, T, scorer, DTYPE_BYTES.get(s.teacher_dtype, 4)
                                             if s.teacher == "hf_model" else p)
                transient = hidden_scoring_transient_bytes(scorer, min(s.teacher_chunk, batch), seq, s.fused_chunk)
                notes.append("teacher gives its hidden states and lm head (fused_lm_head)")
            else:
                kept = full_vocab_scores_bytes(batch, T, scorer.vocab_size)
                transient = scoring_transient_bytes(scorer, min(s.teacher_chunk, batch), seq, T)
            loss_scoring = kept + max(transient - c["logits"], 0)
            c["scores"] += loss_scoring
    if activations == "korthikanti":
        per_token = korthikanti_layer_bytes_per_token(m, seq)
    else:
        per_token = layer_activation_bytes_per_token(m, seq, lora_r=s.lora_r, adapter_cast=adapter_cast,
                                                     padded=padded)
    casts = 2 * n_adapter / m.num_hidden_layers if adapter_cast else 0
    c["acts"] = activation_bytes(m, batch, seq, gradient_checkpointing=s.gradient_checkpointing,
                                 per_token_layer=per_token, lora=lora, layer_cast_bytes=casts)
    # loss_scoring is in "scores" but held only while a micro-batch trains
    resident = sum(c[k] for k in ("weights", "lora", "optim", "ref", "teacher", "scores")) - loss_scoring
    train = resident + loss_scoring + c["grads"] + c["gather"] + c["acts"] + c["logits"]
    if s.preference:  # the snapshot runs before the trainer: whole bf16 weights + its KV cache
        gen = psi * (2 if mixed else p) + c["gen_extra"]
    else:
        gen = resident + c["gen_extra"]
    total = max(train, gen)
    if engine == "ddp" and n_gpus == 1:
        notes.append("1 process: no DDP wrapper")
    return Row(recipe=s.name, engine=engine, gpus=n_gpus, components=c, train=train, gen=gen, total=total,
               peak_phase="train" if train >= gen else "gen", fits=fits_in(total, sizes, headroom), notes=notes)


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def _gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def _gpus_label(n: int, per_node: int) -> str:
    return f"{n} ({n // per_node}x{per_node})" if n > per_node and n % per_node == 0 else str(n)


HEADER = ("recipe", "engine", "gpus", *COLUMNS[:-1], "gen+", "train", "gen", "total", "fits")


def table_cells(rows: list[Row], per_node: int = 8) -> list[list[str]]:
    out = []
    for r in rows:
        fits = f"{r.fits:g}" if r.fits is not None else "none"
        if any(n.startswith("refused") for n in r.notes):
            fits += " (refused)"
        out.append([r.recipe, r.engine, _gpus_label(r.gpus, per_node), *(_gib(r.components[k]) for k in COLUMNS),
                    _gib(r.train), _gib(r.gen), _gib(r.total), fits])
    return out


def format_plain(rows: list[Row], per_node: int = 8) -> str:
    cells = [list(HEADER)] + table_cells(rows, per_node)
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: list[Row], per_node: int = 8) -> str:
    align = "|".join("---" if i < 3 else "---:" for i in range(len(HEADER)))
    lines = ["| " + " | ".join(HEADER) + " |", "|" + align + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_cells(rows, per_node)]
    return "\n".join(lines)


def _rss_mib() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _calibration_child(kind: str) -> None:
    """One CPU measurement (own process, so no shared high-water mark); prints peak RSS over the inputs / unit.

    * ``logits``: the student's full-vocabulary loss path (bf16 lm-head matmul, fp32 copy, log-softmax + gather,
      ``full_vocab_divergence`` with chunk 256, backward), in units of 4·B·T·V → :func:`full_logits_bytes`' 5;
    * ``score1`` / ``score4``: ``score_with_causal_lm(want="full")`` of a tiny Qwen3 on 1 / 4 chunks of 2 rows,
      minus the kept log-probs (1×, resp. 2× at the concatenation), in units of c·T·V bytes →
      :func:`scoring_transient_bytes`' 4 and :func:`generation_step_bytes`' 0.
    """
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _util import peak_rss_mib

    torch.manual_seed(0)
    V, T = 32768, 512
    if kind == "logits":
        from opd_plugins.divergences.chunked import full_vocab_divergence

        def make(B, T_, V_, H):
            return (torch.randn(B, T_, H, dtype=torch.bfloat16, requires_grad=True),
                    (torch.randn(V_, H, dtype=torch.bfloat16) * 0.1).requires_grad_(),
                    torch.log_softmax(torch.randn(B, T_, V_), -1), torch.randint(0, V_, (B, T_)))

        def step(hidden, weight, t_logps, ids):
            logits = (hidden @ weight.T).float() / 1.0
            lp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            (full_vocab_divergence(logits, t_logps, "reverse_kl", 0.0, 256).sum() + 0.0 * lp.sum()).backward()

        step(*make(2, 3, 16, 8))
        B = 4
        inputs = make(B, T, V, 64)
        base = _rss_mib()
        step(*inputs)
        print(json.dumps({"kind": kind, "ratio": (peak_rss_mib() - base) / (4 * B * T * V / 2 ** 20)}))
        return
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opd_plugins.teachers.base import score_with_causal_lm

    cfg = Qwen3Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                      intermediate_size=128, vocab_size=V)
    model = Qwen3ForCausalLM(cfg).to(torch.bfloat16).eval()
    P, chunk = 16, 2
    rows = chunk * (1 if kind == "score1" else 4)

    def make(r, t):
        ids = torch.randint(0, V, (r, P + t))
        return ids, torch.ones_like(ids), ids[:, P:], torch.ones(r, t)

    score_with_causal_lm(model, *make(2, 4), want="full", chunk_size=1)
    inputs = make(rows, T)
    base = _rss_mib()
    score_with_causal_lm(model, *inputs, want="full", chunk_size=chunk)
    kept = rows * T * V * 4 / 2 ** 20
    extra = peak_rss_mib() - base - kept * (1 if kind == "score1" else 2)
    print(json.dumps({"kind": kind, "ratio": extra / (chunk * T * V / 2 ** 20)}))


def calibrate() -> dict[str, float]:
    """Run the CPU calibrations (:func:`_calibration_child`) and return their ratios."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = {}
    for kind in ("logits", "score1", "score4"):
        res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--calibration-child", kind],
                             capture_output=True, text=True, env=env, check=True)
        out[kind] = json.loads(res.stdout.strip().splitlines()[-1])["ratio"]
    return out


def verify_configs() -> list[str]:
    """Compare :func:`total_params` with the meta-device model for every config; returns the mismatches."""
    bad = []
    for name, m in MODEL_CONFIGS.items():
        ours, theirs = total_params(m), meta_param_count(m)
        print(f"{name}: formula {ours:,} / meta model {theirs:,} params" + ("" if ours == theirs else "  MISMATCH"))
        if ours != theirs:
            bad.append(name)
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=None, help="recipe YAMLs (default: recipes/qwen3/*.yaml)")
    ap.add_argument("--gpus", nargs="+", type=int, default=[1, 8, 16], help="GPU counts (default 1 8 16)")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="for the label only: 16 = 2x8")
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--prompt-len", type=int, default=256,
                    help="prompt tokens (default 256: a GSM8K question in the Qwen3 chat template)")
    ap.add_argument("--headroom", type=float, default=0.10, help="fraction of the card left free (default 0.10)")
    ap.add_argument("--gpu-sizes", nargs="+", type=float, default=list(GPU_SIZES_GIB), help="GiB")
    ap.add_argument("--activations", choices=("qwen3", "korthikanti"), default="qwen3",
                    help="per-layer activation count: Qwen3 op by op (default) or Korthikanti et al.'s 34·H")
    ap.add_argument("--unpadded", action="store_true",
                    help="batches without a padding mask (k, v stay at KV heads, no (S, S) mask); default: padded")
    ap.add_argument("--shard-teacher", action="store_true",
                    help="model the hf_model teacher as sharded 1/N under zero3*/fsdp2* (the project does not)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe setting in every recipe, e.g. trainer.args.per_device_train_batch_size=2 "
                         "or divergence.params.fused_lm_head=true (repeatable)")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--json", metavar="PATH", help="also write the rows (bytes) as JSON")
    ap.add_argument("--verify", action="store_true", help="check the parameter formulas against meta-device models")
    ap.add_argument("--calibrate", action="store_true",
                    help="measure on CPU the logits (model: 5) and teacher-scoring (12, 4) multipliers, then exit")
    ap.add_argument("--calibration-child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.calibration_child:
        _calibration_child(a.calibration_child)
        return 0
    if a.calibrate:
        r = calibrate()
        print(f"student logits path: peak {r['logits']:.2f} x 4*B*T*V (model: 20*B*T*V bytes = 5.00 x)")
        print(f"teacher scoring, 1 chunk: {r['score1']:.2f} x c*T*V beyond the kept log-probs (model: 4)")
        print(f"teacher scoring, concatenation: {r['score4']:.2f} x c*T*V beyond 2 x the log-probs (model: 0)")
        return 0
    if a.verify and verify_configs():
        return 1
    root = Path(__file__).resolve().parents[1]
    paths = a.recipes or sorted(glob.glob(str(root / "recipes" / "qwen3" / "*.yaml")))
    if not paths:
        ap.error("no recipes")
    rows = []
    for path in paths:
        s = read_recipe(path, a.prompt_len, a.overrides)
        for engine in a.engines:
            for n in a.gpus:
                rows.append(estimate(s, engine, n, headroom=a.headroom, sizes=tuple(a.gpu_sizes),
                                     activations=a.activations, padded=not a.unpadded,
                                     shard_teacher=a.shard_teacher))
    print((format_markdown if a.markdown else format_plain)(rows, a.gpus_per_node))
    notes = sorted({n for r in rows for n in r.notes})
    if notes:
        print("\nnotes: " + "; ".join(notes))
    print(f"\nGiB per GPU; total = max(train, gen); fits = smallest of {', '.join(f'{g:g}' for g in a.gpu_sizes)} "
          f"GiB with total <= {1 - a.headroom:.0%} of it; prompt {a.prompt_len} tokens; activations: "
          f"{a.activations}. Not counted: CUDA context (~0.5-1 GiB), fragmentation, NCCL buffers, vLLM.")
    if a.json:
        payload = {"settings": {k: v for k, v in vars(a).items() if k != "json"},
                   "rows": [asdict(r) for r in rows]}
        Path(a.json).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
