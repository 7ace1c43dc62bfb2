"""Training sharded with FSDP2 on 2 CPU processes (gloo), launched with the shipped accelerate config, gives the same
losses as one process; the hf_model teacher is sharded with the student; fused_lm_head works sharded; a resume under
FSDP2 continues exactly.

accelerate enables FSDP only on accelerators: on CPU it silently runs DDP. The test plugin
(``helpers.fake_plugins_pkg.sharding_probe``, with ``OPD_TEST_CPU_FSDP=1``) switches accelerate's state to FSDP when
the launcher asked for it; the FSDP2 plugin, its settings and the wrapping are accelerate's own. A probe records, on
every rank, that the student's and the teacher's parameters really are DTensor shards.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]


def _accelerate_config(tmp_path):
    """recipes/accelerate/fsdp2.yaml as shipped, on 2 CPU processes in fp32."""
    config = yaml.safe_load((ROOT / "recipes" / "accelerate" / "fsdp2.yaml").read_text())
    config.update(num_processes=2, use_cpu=True, mixed_precision="no")
    path = tmp_path / "fsdp2_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _recipe(tmp_path, name, model_dir, *, processes, **extra):
    per_device = 8 // processes  # the same global batch: 2 prompts x 4 completions
    recipe = {
        "plugins": ["helpers.fake_plugins_pkg.sharding_probe"],
        "model": {"name_or_path": str(model_dir)},
        "data": {"task": {"name": "arithmetic", "params": {"digits": 2}}, "train_size": 32, "eval_size": 4},
        "trainer": {"args": {"max_steps": 3, "per_device_train_batch_size": per_device, "num_generations": 4,
                             "max_completion_length": 6, "learning_rate": 1.0e-3, "top_k": 1, "save_strategy": "no"}},
        "seed": 0,
        "evaluation": {"num_prompts": 4, "max_new_tokens": 4},
        "output_dir": str(tmp_path / name),
    }
    for key, value in extra.items():
        if key == "args":
            recipe["trainer"]["args"].update(value)
        else:
            recipe[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _free_port():
    """A port nothing listens on now: each launch gets its own rendezvous (a fixed one can still be held by the
    previous launch's store when the next starts)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(tmp_path, recipe, processes, *extra_args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests"), "OPD_TEST_CPU_FSDP": "1",
           "OPD_TEST_PROBE": str(tmp_path / f"probe-{recipe.stem}")}
    if processes == 1:
        cmd = [sys.executable, "-m", "opd_plugins", "train", str(recipe), *extra_args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(_accelerate_config(tmp_path)), "--main_process_port", str(_free_port()), "-m", "opd_plugins", "train",
               str(recipe), *extra_args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / recipe.stem / "metrics.jsonl").read_text().splitlines()]
    probes = [json.loads(p.read_text()) for p in sorted(tmp_path.glob(f"probe-{recipe.stem}.*"))]
    return [r for r in rows if "loss" in r], probes


def _same(a, b, key, rel=1e-4):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x[key] == pytest.approx(y[key], rel=rel, abs=1e-7), (key, x["step"], x[key], y[key])


def test_fsdp2_opd_with_a_sharded_teacher_and_fused_head_equals_one_process(tmp_path, opd_tiny_model_dir):
    extra = dict(teacher={"name": "hf_model", "params": {"model": str(opd_tiny_model_dir)}},
                 divergence={"name": "forward_kl", "params": {"fused_lm_head": True}},
                 objective={"policy_gradient": 0.0, "divergence": 1.0})
    one, _ = _launch(tmp_path, _recipe(tmp_path, "opd1", opd_tiny_model_dir, processes=1, **extra), 1)
    two, probes = _launch(tmp_path, _recipe(tmp_path, "opd2", opd_tiny_model_dir, processes=2, **extra), 2)
    assert len(one) == 3
    _same(one, two, "loss")
    _same(one, two, "grad_norm")
    assert len(probes) == 2 and all(p["sharding"] == "fsdp" for p in probes)
    assert all(p["student"]["dtensor"] == p["student"]["n"] > 0 for p in probes)  # every parameter sharded
    assert all(p["placement"] == "shard" and p["teacher"]["dtensor"] == p["teacher"]["n"] > 0 for p in probes)


def test_fsdp2_grpo_and_its_resume_equal_one_process(tmp_path, opd_tiny_model_dir):
    extra = dict(rollout={"name": "test_fixed_rollout"}, objective={"policy_gradient": 1.0},
                 args={"max_steps": 4}, data={"task": {"name": "test_varied_reward", "params": {"digits": 2}},
                                              "train_size": 32, "eval_size": 4})
    one, _ = _launch(tmp_path, _recipe(tmp_path, "grpo1", opd_tiny_model_dir, processes=1, **extra), 1)
    assert any(abs(r["loss"]) > 0 for r in one) and any(r["reward_std"] > 0 for r in one)  # a real signal
    saving = {**extra, "args": {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}}
    recipe = _recipe(tmp_path, "grpo2", opd_tiny_model_dir, processes=2, **saving)
    two, _ = _launch(tmp_path, recipe, 2)
    _same(one, two, "loss")
    run = tmp_path / "grpo2"
    assert (run / "checkpoint-2" / "opd_checkpoint_complete").exists()
    assert not list((run / ".staging").glob("checkpoint-*"))  # published atomically: nothing left half-written
    # cut the run back to its checkpoint and resume it under FSDP2: the same last two steps
    for item in ("checkpoint-4", "final"):
        subprocess.run(["rm", "-rf", str(run / item)], check=True)
    resumed, _ = _launch(tmp_path, recipe, 2, "--resume")
    _same([r for r in one if r["step"] > 2], [r for r in resumed if r["step"] > 2], "loss")


def test_fsdp2_self_context_with_initial_weights_on_a_full_fine_tune_equals_one_process(tmp_path, opd_tiny_model_dir):
    # the frozen initial weights are kept as this rank's shard and copied into the sharded student to score
    extra = dict(teacher={"name": "self_context", "params": {"template": "{prompt} = {answer}", "weights": "initial"}},
                 divergence={"name": "reverse_kl"}, objective={"policy_gradient": 0.0, "divergence": 1.0},
                 args={"max_steps": 3, "learning_rate": 5.0e-3})
    one, _ = _launch(tmp_path, _recipe(tmp_path, "sc1", opd_tiny_model_dir, processes=1, **extra), 1)
    two, probes = _launch(tmp_path, _recipe(tmp_path, "sc2", opd_tiny_model_dir, processes=2, **extra), 2)
    assert len(one) == 3 and one[0]["opd/divergence"] > 0
    # the student moved away from its start, so a teacher that were the live weights would differ from step 2 on
    _same(one, two, "loss")
    _same(one, two, "opd/divergence")
    assert all(p["sharding"] == "fsdp" and p["student"]["dtensor"] == p["student"]["n"] > 0 for p in probes)
