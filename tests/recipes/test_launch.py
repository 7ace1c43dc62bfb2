"""A recipe checked against the distributed launch it will run under: the engine and world size read from
accelerate's per-process environment or from an accelerate config, components and ``trainer.args`` that
contradict them refused before any model loads, with the alternative named."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opd_plugins.errors import RecipeError
from opd_plugins.recipe import load_recipe
from opd_plugins.recipe.launch import Launch, launch_from_accelerate_config, launch_from_env

ROOT = Path(__file__).parents[2]
CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
EXPECTED = {"single_gpu": ("none", 1), "ddp": ("ddp", 8), "fsdp2": ("fsdp", 8), "fsdp2_offload": ("fsdp", 8),
            "zero2": ("deepspeed_zero2", 8), "zero3": ("deepspeed_zero3", 8), "two_node_fsdp2": ("fsdp", 16)}


def _accelerate_env(path):
    """The environment `accelerate launch --config_file path` gives each process (accelerate's own code), plus
    the WORLD_SIZE its torchrun adds."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "opd_plugins", "train", "r.yaml"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config.keys())  # as launch_command does
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.num_processes > 1 or args.use_fsdp:
        env = prepare_multi_gpu_env(args)
    else:
        env = {}
    return {**env, "WORLD_SIZE": str(args.num_processes)} if args.num_processes > 1 else env


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_each_shipped_config_maps_to_the_same_launch_from_its_file_and_from_accelerates_environment(path):
    engine, world = EXPECTED[path.stem]
    from_file = launch_from_accelerate_config(path)
    from_env = launch_from_env(_accelerate_env(path))
    assert (from_file.engine, from_file.world_size) == (engine, world)
    assert (from_env.engine, from_env.world_size, from_env.zero_stage, from_env.fsdp_version) == \
        (engine, world, from_file.zero_stage, from_file.fsdp_version)
    assert from_file.sharding == {"fsdp": "fsdp", "deepspeed_zero3": "deepspeed_zero3"}.get(
        engine, "ddp" if world > 1 else "none")


def test_plain_processes_and_torchrun():
    assert launch_from_env({}) == Launch()
    assert launch_from_env({"WORLD_SIZE": "4"}).engine == "ddp"


def _check(recipe, launch, *overrides):
    return load_recipe(ROOT / "recipes" / recipe, list(overrides), device_check=False, launch=launch)


def _problems(recipe, config, *overrides):
    with pytest.raises(RecipeError) as err:
        _check(recipe, launch_from_accelerate_config(ROOT / "recipes" / "accelerate" / f"{config}.yaml"), *overrides)
    return {p.path: p.message for p in err.value.problems}


def test_shipped_qwen3_recipes_are_valid_under_every_engine():
    for config in EXPECTED:
        launch = launch_from_accelerate_config(ROOT / "recipes" / "accelerate" / f"{config}.yaml")
        for recipe in ("qwen3/opd_1p7b_from_8b_lora.yaml", "qwen3/self_distill_1p7b_lora.yaml"):
            _check(recipe, launch)


@pytest.mark.parametrize("recipe, config, overrides, key, words", [
    ("fp8/grpo_smollm2_fp8_cpu.yaml", "fsdp2", [], "rollout", ["fp8", "fsdp", "DDP", "vllm"]),
    ("fp8/grpo_smollm2_fp8_cpu.yaml", "zero3", [], "rollout", ["fp8", "deepspeed_zero3", "DDP"]),
    ("quickstart/self_distill_cpu.yaml", "zero3", ["teacher.params.weights=ema"], "teacher.params.weights",
     ["ema", "ZeRO-3", "weights: live"]),
    ("quickstart/self_distill_cpu.yaml", "fsdp2", ["teacher.params.weights=ema"], "teacher.params.weights",
     ["ema", "FSDP", "weights: initial"]),
    ("quickstart/self_distill_cpu.yaml", "zero3", ["model.lora=null"], "teacher.params.weights",
     ["initial", "full fine-tune", "ZeRO-3", "LoRA"]),
    ("qwen3/opd_1p7b_from_8b_lora.yaml", "zero3", ["divergence.params.fused_lm_head=true"],
     "divergence.params.fused_lm_head", ["fused_lm_head: false", "FSDP2"]),
    ("qwen3/opd_1p7b_from_8b_lora.yaml", "ddp", ["teacher.params.placement=shard"], "teacher.params.placement",
     ["placement: replicate", "ddp"]),
    ("qwen3/opd_1p7b_from_8b_lora.yaml", "ddp", ["trainer.args.fsdp=full_shard"], "trainer.args.fsdp",
     ["accelerate config", "fsdp2.yaml"]),
    ("qwen3/opd_1p7b_from_8b_lora.yaml", "fsdp2", ["trainer.args.deepspeed.zero_optimization.stage=3"],
     "trainer.args.deepspeed", ["runs fsdp", "zero3.yaml"]),
    ("qwen3/opd_1p7b_from_8b_lora.yaml", "zero3", ["trainer.args.deepspeed.zero_optimization.stage=2"],
     "trainer.args.deepspeed", ["stage 2", "ZeRO-3"]),
    ("qwen3/opd_1p7b_from_8b_lora.yaml", "fsdp2", ["trainer.args.fsdp_config.fsdp_version=1"],
     "trainer.args.fsdp_config", ["fsdp_version 1", "FSDP2"]),
    ("qwen3/opd_1p7b_from_8b_lora.yaml", "two_node_fsdp2",
     ["trainer.args.per_device_train_batch_size=1", "trainer.args.num_generations=32",
      "trainer.args.gradient_accumulation_steps=1", "trainer.args.steps_per_generation=null"],
     "trainer.args.num_generations", ["16 processes", "two_node_fsdp2.yaml", "number of processes"]),
])
def test_what_an_engine_cannot_run_is_refused_with_the_alternative(recipe, config, overrides, key, words):
    problems = _problems(recipe, config, *overrides)
    assert key in problems, problems
    assert all(w in problems[key] for w in words), problems[key]


def test_the_same_batch_is_valid_on_two_processes_that_one_process_cannot_divide():
    # 2 completions per process x 2 processes = one group of 4; one process alone would hold half a group
    over = ["trainer.args.per_device_train_batch_size=2", "trainer.args.num_generations=4",
            "trainer.args.gradient_accumulation_steps=1"]
    _check("quickstart/self_distill_cpu.yaml", Launch("ddp", 2), *over)
    with pytest.raises(RecipeError, match="num_generations"):
        _check("quickstart/self_distill_cpu.yaml", Launch(), *over)


def test_train_refuses_before_any_model_loads_from_accelerates_environment(tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart" / "self_distill_cpu.yaml").read_text())
    recipe["teacher"]["params"]["weights"] = "ema"
    recipe["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, **_accelerate_env(ROOT / "recipes" / "accelerate" / "fsdp2.yaml"), "OMP_NUM_THREADS": "1"}
    env["WORLD_SIZE"] = "1"  # one process of the launch, run by hand: validation refuses before anything starts
    out = subprocess.run([sys.executable, "-m", "opd_plugins", "train", str(path)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "teacher.params.weights" in out.stderr and "FSDP" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_a_sharded_teacher_with_quantization_or_its_own_device_is_refused_without_any_launch():
    for extra in ("teacher.params.quantization=4bit", "teacher.params.device=cpu"):
        with pytest.raises(RecipeError) as err:
            _check("qwen3/opd_1p7b_from_8b_lora.yaml", None, "teacher.params.placement=shard", extra)
        msg = str(err.value)
        assert "teacher.params" in msg and "placement: replicate" in msg and extra.split(".")[-1].split("=")[0] in msg


def test_an_unreadable_accelerate_config_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    out = subprocess.run([sys.executable, "-m", "opd_plugins", "validate", str(ROOT / "recipes" / "quickstart" /
                          "self_distill_cpu.yaml"), "--accelerate-config", str(missing)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 2 and str(missing) in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    out = subprocess.run([sys.executable, "-m", "opd_plugins", "validate", str(ROOT / "recipes" / "quickstart" /
                          "self_distill_cpu.yaml"), "--accelerate-config", str(bad)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 2 and "not a mapping" in out.stderr and "Traceback" not in out.stderr
