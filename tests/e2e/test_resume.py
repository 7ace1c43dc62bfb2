"""Resume: a run SIGKILLed while writing a checkpoint resumes from the last complete one, with component state."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

TESTS = Path(__file__).parents[1]


def run_cli(args, env_extra, cwd):
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env_extra}
    return subprocess.run([sys.executable, "-m", "opd_plugins", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_sigkill_during_checkpoint_then_resume(tmp_path, opd_tiny_model_dir):
    out = tmp_path / "run"
    recipe = {
        "plugins": ["helpers.fake_plugins_pkg.killer"],
        "model": {"name_or_path": str(opd_tiny_model_dir), "lora": {"r": 4}},
        "data": {"task": {"name": "arithmetic", "params": {"digits": 2}}, "train_size": 64, "eval_size": 8},
        "trainer": {"args": {"max_steps": 6, "per_device_train_batch_size": 4, "num_generations": 4,
                             "max_completion_length": 6, "save_steps": 2, "learning_rate": 1e-3}},
        "sampler": {"name": "counting"},
        "teacher": {"name": "self_context"},
        "divergence": {"name": "reverse_kl"},
        "objective": {"policy_gradient": 1.0, "divergence": 0.5},
        "evaluation": {"num_prompts": 4, "max_new_tokens": 4},
        "output_dir": str(out),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    log = tmp_path / "sampler.log"
    env = {"OPD_TEST_SAMPLER_LOG": str(log)}

    killed = run_cli(["train", str(path)], {**env, "OPD_TEST_KILL_AT_STEP": "4"}, tmp_path)
    assert killed.returncode == -9, killed.stderr[-3000:]
    published = sorted(p.name for p in out.glob("checkpoint-*"))
    assert published == ["checkpoint-2"]  # checkpoint-4 was being written: never published
    assert (out / "checkpoint-2" / "opd_checkpoint_complete").exists()
    assert json.loads((out / "checkpoint-2" / "opd_components.json").read_text())["sampler"] == {"calls": 2}
    ckpt2 = {p.name: p.read_bytes() for p in (out / "checkpoint-2").iterdir() if p.is_file()}

    again = run_cli(["train", str(path)], env, tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr

    resumed = run_cli(["train", str(path), "--resume"], env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert {p.name: p.read_bytes() for p in (out / "checkpoint-2").iterdir() if p.is_file()} == ckpt2
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    # the sampler's call count continued from the checkpoint (3, 4 after resuming at step 2... up to 6)
    lines = log.read_text().split()
    assert json.loads((out / "checkpoint-6" / "opd_components.json").read_text())["sampler"] == {"calls": 6}
    assert lines[-2:] == ["5", "6"]
    summary = json.loads((out / "eval_summary.json").read_text())
    assert summary["steps"] == 6 and "before" in summary and "after" in summary
    assert (out / "curves.png").stat().st_size > 1000
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {m["step"] for m in metrics if "loss" in m} >= {1, 2, 3, 5, 6}
