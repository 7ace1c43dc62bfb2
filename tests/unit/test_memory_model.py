"""benchmarks/memory_model.py: its formulas against the real models (meta-device parameter counts, PEFT's LoRA
count, saved-tensor bytes of a tiny Qwen3), the engines' sharding rules, and an end-to-end run on the recipes."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "memory_model.py"
RECIPES = sorted((ROOT / "recipes" / "qwen3").glob("*.yaml"))


def _load():
    spec = importlib.util.spec_from_file_location("opd_memory_model", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


mm = _load()
TINY = mm.ModelConfig("tiny", hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, intermediate_size=160, vocab_size=64, tie_word_embeddings=True)


@pytest.mark.parametrize("name", sorted(mm.MODEL_CONFIGS))
def test_parameter_count_equals_meta_model(name):
    m = mm.MODEL_CONFIGS[name]
    assert mm.total_params(m) == mm.meta_param_count(m)


def test_parameter_counts_are_the_published_sizes():
    counts = {n: mm.total_params(m) for n, m in mm.MODEL_CONFIGS.items()}
    assert counts == {"Qwen/Qwen3-0.6B": 596_049_920, "Qwen/Qwen3-1.7B": 1_720_574_976,
                      "Qwen/Qwen3-8B": 8_190_735_360}


def _tiny_model(cfg=TINY, **overrides):
    import torch
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(mm.transformers_config(cfg, **overrides))


@pytest.mark.parametrize("untied", [False, True])
def test_tiny_parameter_count(untied):
    cfg = mm.ModelConfig(**{**TINY.__dict__, "tie_word_embeddings": not untied})
    assert mm.total_params(cfg) == sum(p.numel() for p in _tiny_model(cfg).parameters())


@pytest.mark.parametrize("r", [4, 16])
def test_lora_all_linear_count_equals_peft(r):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_tiny_model(), LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == mm.lora_params(TINY, r)
    assert trainable == TINY.num_hidden_layers * sum(r * (i + o) for _, i, o in mm.lora_target_linears(TINY))


def test_lora_subset_of_modules_equals_peft():
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = get_peft_model(_tiny_model(), LoraConfig(r=8, target_modules=targets))
    assert peft_model.get_nb_trainable_parameters()[0] == mm.lora_params(TINY, 8, targets)


def test_lora_count_of_the_recipes_student_on_meta():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3ForCausalLM

    m = mm.MODEL_CONFIGS["Qwen/Qwen3-1.7B"]
    with torch.device("meta"):
        model = Qwen3ForCausalLM(mm.transformers_config(m))
    peft_model = get_peft_model(model, LoraConfig(r=64, lora_alpha=128, target_modules="all-linear"))
    assert peft_model.get_nb_trainable_parameters()[0] == mm.lora_params(m, 64) == 69_730_304


# -- activations: the op-by-op count equals the bytes autograd saves (a tiny Qwen3 on CPU) -----------------------


def _saved_bytes(layers, *, padded, lora_r=0, fp32_adapters=False, autocast=False, batch=2, seq=32):
    """Bytes of the distinct non-parameter storages the decoder body saves for backward."""
    import torch

    model = _tiny_model(num_hidden_layers=layers, attn_implementation="sdpa").to(torch.bfloat16)
    if lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear"),
                               autocast_adapter_dtype=fp32_adapters)
        model.enable_input_require_grads()
        body = model.base_model.model.model
    else:
        body = model.model
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, TINY.vocab_size, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :5] = 0
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        body(input_ids=ids, attention_mask=mask if padded else None)
    return sum(seen.values())


def _per_layer(**kw):
    return _saved_bytes(2, **kw) - _saved_bytes(1, **kw)


@pytest.mark.parametrize("padded", [False, True])
def test_layer_activations_full_finetune_exact(padded):
    tokens = 2 * 32
    expected = tokens * mm.layer_activation_bytes_per_token(TINY, 32, padded=padded)
    assert _per_layer(padded=padded) == expected


def test_layer_activations_lora_bf16_adapters_exact():
    tokens = 2 * 32
    expected = tokens * mm.layer_activation_bytes_per_token(TINY, 32, lora_r=8, padded=True)
    assert _per_layer(padded=True, lora_r=8) == expected


def test_layer_activations_lora_fp32_adapters_under_autocast_exact():
    tokens = 2 * 32
    casts = 2 * mm.lora_params(TINY, 8) / TINY.num_hidden_layers  # autocast's bf16 copies of the adapter weights
    expected = tokens * mm.layer_activation_bytes_per_token(TINY, 32, lora_r=8, adapter_cast=True) + casts
    assert _per_layer(padded=True, lora_r=8, fp32_adapters=True, autocast=True) == expected


def test_gradient_checkpointing_keeps_the_layer_inputs():
    m = mm.MODEL_CONFIGS["Qwen/Qwen3-1.7B"]
    per_token = mm.layer_activation_bytes_per_token(m, 1280)
    with_gc = mm.activation_bytes(m, 8, 1280, gradient_checkpointing=True, per_token_layer=per_token, lora=False)
    without = mm.activation_bytes(m, 8, 1280, gradient_checkpointing=False, per_token_layer=per_token, lora=False)
    tokens, H, L = 8 * 1280, m.hidden_size, m.num_hidden_layers
    extra = tokens * (8 * H + 4) + tokens * 4 * H
    assert with_gc == L * tokens * 2 * H + tokens * per_token + extra
    assert without == L * tokens * per_token + extra
    assert mm.korthikanti_layer_bytes_per_token(m, 1280) == 34 * H
    assert mm.korthikanti_layer_bytes_per_token(m, 1280, flash=False) == 34 * H + 5 * 16 * 1280


# -- engines -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def settings():
    return {p.stem: mm.read_recipe(str(p)) for p in RECIPES}


def test_zero3_weight_share_is_total_over_n():
    psi = mm.total_params(mm.MODEL_CONFIGS["Qwen/Qwen3-1.7B"])
    for n in (1, 2, 8, 16):
        weights, adapter = mm.student_weight_bytes("zero3", 0, psi, n, 2, lora=False, mixed_bf16=True)
        assert weights == psi * 2 / n and adapter == 0
        assert mm.gradient_bytes("zero3", psi, n, 2, lora=False, mixed_bf16=True) == psi * 2 / n
        assert mm.optimizer_bytes("zero3", psi, n, 2, lora=False, mixed_bf16=True) == psi * 12 / n


def test_zero3_rows_shard_the_student(settings):
    s = settings["opd_1p7b_from_8b_full"]
    psi = mm.total_params(s.model)
    for n in (1, 8, 16):
        row = mm.estimate(s, "zero3", n)
        assert row.components["weights"] == pytest.approx(psi * 2 / n)
        assert row.components["optim"] == pytest.approx(psi * 12 / n)


def test_ddp_per_gpu_is_independent_of_n(settings):
    for s in settings.values():
        one, eight, sixteen = (mm.estimate(s, "ddp", n) for n in (1, 8, 16))
        assert eight.components == sixteen.components and eight.total == sixteen.total
        for key in ("weights", "lora", "optim", "teacher", "scores", "acts", "logits"):
            assert one.components[key] == eight.components[key]
        # one process is not wrapped in DDP: no all-reduce buckets
        assert one.components["grads"] * 2 == eight.components["grads"]


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_cpu_offload_moves_optimizer_state_off_the_gpu(settings, engine):
    for s in settings.values():
        for n in (1, 8):
            on, off = mm.estimate(s, engine, n), mm.estimate(s, engine + "_offload", n)
            assert on.components["optim"] > 0
            assert off.components["optim"] == 0 and off.components["grads"] == 0 and off.components["weights"] == 0
            assert off.train < on.train


def test_full_finetune_precision_per_engine():
    psi = 1000
    # ddp, bf16 model: bf16 params, bf16 grads, bf16 AdamW m and v, no master copy
    assert mm.student_weight_bytes("ddp", 0, psi, 1, 2, False, True) == (2 * psi, 0)
    assert mm.optimizer_bytes("ddp", psi, 1, 2, False, True) == 4 * psi
    # fsdp2 upcasts the trainable params to fp32 (master), fp32 m and v
    assert mm.student_weight_bytes("fsdp2", 0, psi, 1, 2, False, True) == (4 * psi, 0)
    assert mm.optimizer_bytes("fsdp2", psi, 1, 2, False, True) == 8 * psi
    # DeepSpeed: bf16 params, fp32 master + m + v in the optimizer
    assert mm.student_weight_bytes("zero2", 0, psi, 8, 2, False, True) == (2 * psi, 0)
    assert mm.optimizer_bytes("zero2", psi, 8, 2, False, True) == 12 * psi / 8
    # LoRA under ddp: PEFT's fp32 adapters
    assert mm.student_weight_bytes("ddp", psi, 10, 1, 2, True, True) == (2 * psi, 40)
    assert mm.optimizer_bytes("ddp", 10, 1, 2, True, True) == 80


# -- teacher scores --------------------------------------------------------------------------------------------------


def test_full_vocabulary_scores_are_b_gen_t_v_fp32():
    assert mm.full_vocab_scores_bytes(32, 1024, 151936) == 32 * 1024 * 151936 * 4
    assert mm.topk_scores_bytes(32, 1024, 20) == 32 * 1024 * (20 * 12 + 4)
    assert mm.sampled_scores_bytes(32, 1024) == 3 * 32 * 1024 * 4


def test_recipe_rows_hold_one_generation_batch_of_scores_only_when_scored_at_generation(settings):
    s = settings["opd_1p7b_from_8b_full"]
    assert s.want == "full" and s.steps_per_generation == s.gradient_accumulation_steps == 4
    b_gen = s.per_device_train_batch_size * s.steps_per_generation
    assert mm.gen_batch_per_device(s, 8) == b_gen == 32
    T, V = s.max_completion_length, s.model.vocab_size
    generation = dataclasses.replace(s, teacher_scoring="generation")
    row = mm.estimate(generation, "ddp", 8)
    assert row.components["scores"] - mm.sampled_scores_bytes(b_gen, T) == b_gen * T * V * 4
    assert row.components["gen_extra"] >= 2 * b_gen * T * V * 4
    # auto: hf_model scores each micro-batch in the loss, so one micro-batch's scores, held while it trains
    assert s.teacher_at_loss and not generation.teacher_at_loss
    auto = mm.estimate(s, "ddp", 8)
    micro = s.per_device_train_batch_size * T * V * 4
    assert micro <= auto.components["scores"] - mm.sampled_scores_bytes(b_gen, T) < 2 * micro
    assert auto.gen < row.gen - 2 * b_gen * T * V * 4 and auto.train < row.train


def test_a_fused_divergence_takes_the_teachers_head_so_no_micro_batch_of_teacher_log_probs(settings):
    s = dataclasses.replace(settings["opd_1p7b_from_8b_full"], fused_lm_head=True)
    T, V, B = s.max_completion_length, s.model.vocab_size, s.per_device_train_batch_size
    row, plain = mm.estimate(s, "ddp", 8), mm.estimate(settings["opd_1p7b_from_8b_full"], "ddp", 8)
    b_gen = mm.gen_batch_per_device(s, 8)
    kept = row.components["scores"] - mm.sampled_scores_bytes(b_gen, T)
    hidden = B * T * s.teacher_model.hidden_size * 2  # bf16 teacher: its (B, T, H_t) final hidden states
    assert hidden <= kept < B * T * V * 4 / 10
    assert any("hidden states and lm head" in n for n in row.notes)
    assert row.train < plain.train
    # a generation-time teacher keeps its (B_gen, T, V) log-probs as before
    generation = mm.estimate(dataclasses.replace(s, teacher_scoring="generation"), "ddp", 8)
    assert generation.components["scores"] - mm.sampled_scores_bytes(b_gen, T) == b_gen * T * V * 4


def test_teacher_weights_full_copy_unless_sharded(settings):
    s = settings["opd_1p7b_from_8b_lora"]
    full = mm.total_params(mm.MODEL_CONFIGS["Qwen/Qwen3-8B"]) * 2
    for engine in mm.ENGINES:
        assert mm.estimate(s, engine, 8).components["teacher"] == full
    assert mm.estimate(s, "zero3", 8, shard_teacher=True).components["teacher"] == full / 8
    assert mm.estimate(s, "zero2", 8, shard_teacher=True).components["teacher"] == full


def test_recipe_settings(settings):
    assert set(settings) == {p.stem for p in RECIPES}
    soda = settings["soda_1p7b_from_8b"]
    assert soda.preference and soda.lora_r == 64
    assert mm.estimate(soda, "ddp", 1).components["ref"] == 0  # LoRA: the reference is the adapter disabled
    self_full = settings["self_distill_1p7b_full"]
    assert self_full.teacher == "self_context" and self_full.teacher_weights == "initial"
    assert mm.estimate(self_full, "ddp", 1).components["ref"] == mm.total_params(self_full.model) * 2
    assert any(n.startswith("refused") for n in mm.estimate(self_full, "zero3", 8).notes)
    assert not any(n.startswith("refused") for n in mm.estimate(settings["self_distill_1p7b_lora"], "zero3", 8).notes)


@pytest.mark.parametrize("form", ["trainer_name", "divergence"])
def test_soda_recipe_forms(tmp_path, form):
    """``trainer: {name: soda}`` and the earlier ``divergence: {name: dpo}`` are both DPO recipes."""
    import yaml

    recipe = {"model": {"name_or_path": "Qwen/Qwen3-1.7B", "dtype": "bfloat16", "lora": None},
              "trainer": {"args": {"per_device_train_batch_size": 4, "max_length": 2048, "bf16": True}},
              "teacher": {"name": "blackbox_text", "params": {}}}
    if form == "trainer_name":
        recipe["trainer"]["name"] = "soda"
    else:
        recipe["divergence"] = {"name": "dpo", "params": {"beta": 0.1}}
    path = tmp_path / "soda.yaml"
    path.write_text(yaml.safe_dump(recipe))
    s = mm.read_recipe(str(path))
    assert s.preference
    psi = mm.total_params(s.model)
    # full fine-tune: the reference is a frozen bf16 copy, sharded by TRL under ZeRO-3 / FSDP, whole otherwise
    assert mm.estimate(s, "ddp", 8).components["ref"] == psi * 2
    assert mm.estimate(s, "zero3", 8).components["ref"] == psi * 2 / 8
    assert mm.estimate(s, "ddp", 8).components["scores"] == 0


def test_overrides():
    s = mm.read_recipe(str(RECIPES[0]), overrides=["trainer.args.per_device_train_batch_size=2",
                                                   "divergence.params.fused_lm_head=true"])
    assert s.per_device_train_batch_size == 2 and s.fused_lm_head
    assert mm.estimate(s, "ddp", 1).components["logits"] < mm.full_logits_bytes(2, s.max_completion_length,
                                                                                  s.model.vocab_size)


def test_fits_in_leaves_headroom():
    assert mm.fits_in(72 * mm.GiB) == 80
    assert mm.fits_in(72.1 * mm.GiB) == 96
    assert mm.fits_in(80 * mm.GiB, headroom=0.0) == 80
    assert mm.fits_in(500 * mm.GiB) is None


# -- end to end --------------------------------------------------------------------------------------------------------


def _run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_script_prints_one_row_per_recipe_engine_gpus(tmp_path):
    out = _run("--recipes", *map(str, RECIPES), "--gpus", "1", "8", "16", "--json", str(tmp_path / "rows.json"))
    lines = out.splitlines()
    header = lines[0].split()
    assert header[:3] == ["recipe", "engine", "gpus"] and header[-2:] == ["total", "fits"]
    for col in ("weights", "lora", "grads", "optim", "teacher", "scores", "acts", "logits"):
        assert col in header
    rows = [line for line in lines[2:] if line.split() and line.split()[0] in {p.stem for p in RECIPES}]
    assert len(rows) == len(RECIPES) * len(mm.ENGINES) * 3
    assert sum("16 (2x8)" in r for r in rows) == len(RECIPES) * len(mm.ENGINES)
    data = json.loads((tmp_path / "rows.json").read_text())
    assert len(data["rows"]) == len(rows)
    assert {r["engine"] for r in data["rows"]} == set(mm.ENGINES)


def test_cpu_calibrations_match_the_multipliers():
    """The logits and teacher-scoring multipliers the model uses are what the code paths hold (peak RSS, CPU)."""
    ratios = mm.calibrate()
    assert ratios["logits"] == pytest.approx(5.0, abs=0.3)
    assert ratios["score1"] == pytest.approx(4.0, abs=0.6)
    assert ratios["score4"] == pytest.approx(0.0, abs=0.6)


def test_script_markdown_and_default_recipes():
    out = _run("--markdown", "--gpus", "8")
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0].startswith("| recipe | engine | gpus |") and set(table[1]) <= set("|-:")
    assert len(table) == 2 + len(RECIPES) * len(mm.ENGINES)
