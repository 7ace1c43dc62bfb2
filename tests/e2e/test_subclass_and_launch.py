"""Supported uses beyond recipes: subclassing the trainer, 2-process launch, wandb logging, bad inputs at train."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]


def test_documented_subclass_example_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("subclass_trainer", ROOT / "examples" / "subclass_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trainer = module.main(str(tmp_path / "run"))
    assert trainer.state.global_step == 2
    logged = [h for h in trainer.state.log_history if "custom/length_bonus" in h]
    assert len(logged) == 2 and all(h["custom/length_bonus"] >= 0 for h in logged)
    assert any("opd/divergence" in h for h in trainer.state.log_history)


def _tiny_recipe(tmp_path, model_dir, **extra):
    recipe = {
        "model": {"name_or_path": str(model_dir), "lora": {"r": 4}},
        "data": {"task": {"name": "arithmetic", "params": {"digits": 2}}, "train_size": 32, "eval_size": 8},
        "trainer": {"args": {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 4,
                             "max_completion_length": 6, "save_strategy": "no"}},
        "teacher": {"name": "self_context"},
        "divergence": {"name": "reverse_kl"},
        "objective": {"policy_gradient": 1.0, "divergence": 0.5},
        "evaluation": {"num_prompts": 4, "max_new_tokens": 4},
        "output_dir": str(tmp_path / "run"),
    }
    recipe.update(extra)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}


def test_two_process_run_with_torchrun(tmp_path, opd_tiny_model_dir):
    path = _tiny_recipe(tmp_path, opd_tiny_model_dir)
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "opd_plugins", "train", str(path)],
        capture_output=True, text=True, env=_env(), timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "eval_summary.json").read_text())
    assert summary["steps"] == 2
    info = [json.loads(line) for line in (tmp_path / "run" / "run_info.json").read_text().splitlines()]
    assert len(info) == 1  # written once per start, by the main process
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in metrics if "loss" in m]) == 2  # logged once, by the main process


def test_report_to_wandb_offline(tmp_path, opd_tiny_model_dir):
    import wandb  # noqa: F401  (in the "test" extra)
    path = _tiny_recipe(tmp_path, opd_tiny_model_dir)
    env = {**_env(), "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    out = subprocess.run([sys.executable, "-m", "opd_plugins", "train", str(path), "trainer.args.report_to=wandb"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_vocab_mismatch_is_a_clear_error_before_training(tmp_path, opd_tiny_model_dir):
    from opd_plugins.testing import build_tokenizer, save_tiny_model

    other = save_tiny_model(tmp_path / "other", tokenizer=build_tokenizer(vocab_size=300))
    path = _tiny_recipe(tmp_path, opd_tiny_model_dir, teacher={"name": "hf_model", "params": {"model": str(other)}})
    out = subprocess.run([sys.executable, "-m", "opd_plugins", "train", str(path)], capture_output=True, text=True,
                         env=_env(), timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and str(other) in out.stderr and str(opd_tiny_model_dir) in out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_teacher_column_fails_before_anything_is_written(tmp_path, opd_tiny_model_dir):
    path = _tiny_recipe(tmp_path, opd_tiny_model_dir, teacher={"name": "self_context",
                                                               "params": {"template": "{prompt} {proof}"}})
    out = subprocess.run([sys.executable, "-m", "opd_plugins", "train", str(path)], capture_output=True, text=True,
                         env=_env(), timeout=600)
    # tasks write a worked `solution` column; `proof` is one no task writes
    assert out.returncode == 2 and "proof" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_gpu_only_option_refused_by_train_not_by_validate(tmp_path, opd_tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    path = _tiny_recipe(tmp_path, opd_tiny_model_dir)
    val = subprocess.run([sys.executable, "-m", "opd_plugins", "validate", str(path), "trainer.args.bf16=true"],
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert val.returncode == 0 and "needs a GPU" in val.stderr
    out = subprocess.run([sys.executable, "-m", "opd_plugins", "train", str(path), "trainer.args.bf16=true"],
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 2 and "bf16: true needs a GPU" in out.stderr and not (tmp_path / "run").exists()
