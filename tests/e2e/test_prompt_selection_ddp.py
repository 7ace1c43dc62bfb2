"""``variance`` prompt selection on 2 CPU processes (DDP, gloo): every rank draws the same prompt chunks, observes the
same gathered rewards and ends in the same state, which is the state and the chunks of one process training the same
global batches. Completions come from a rollout that depends only on the prompt (``test_fixed_rollout``), so the two
runs see the same rewards."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]


def _recipe(tmp_path, name, model_dir, processes):
    recipe = {
        "plugins": ["helpers.fake_plugins_pkg.sharding_probe", "helpers.fake_plugins_pkg.selection_probe"],
        "model": {"name_or_path": str(model_dir)},
        "data": {"task": {"name": "test_varied_reward", "params": {"digits": 2}}, "train_size": 8, "eval_size": 4},
        "rollout": {"name": "test_fixed_rollout"},
        "prompt_selection": {"name": "variance"},
        "objective": {"policy_gradient": 1.0},
        "trainer": {"args": {"max_steps": 6, "per_device_train_batch_size": 8 // processes, "num_generations": 4,
                             "max_completion_length": 6, "learning_rate": 1.0e-3, "save_strategy": "no"}},
        "seed": 0,
        "evaluation": {"num_prompts": 4, "max_new_tokens": 4},
        "output_dir": str(tmp_path / name),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _launch(tmp_path, recipe, processes):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests"),
           "OPD_TEST_SELECTION_PROBE": str(tmp_path / f"probe-{recipe.stem}")}
    cmd = [sys.executable, "-m", "opd_plugins", "train", str(recipe)]
    if processes > 1:
        # the shipped multi-process config on CPU processes; without the test's FSDP switch accelerate runs DDP
        settings = yaml.safe_load((ROOT / "recipes" / "accelerate" / "fsdp2.yaml").read_text())
        settings.update(num_processes=processes, use_cpu=True, mixed_precision="no")
        config = tmp_path / "cpu.yaml"
        config.write_text(yaml.safe_dump(settings))
        with socket.socket() as sock:  # a free rendezvous port for this launch
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--main_process_port", str(port), "-m", "opd_plugins", "train", str(recipe)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return [json.loads(p.read_text()) for p in sorted(tmp_path.glob(f"probe-{recipe.stem}.*"))]


def test_variance_selection_is_the_same_on_every_rank_and_as_one_process(tmp_path, opd_tiny_model_dir):
    (one,) = _launch(tmp_path, _recipe(tmp_path, "one", opd_tiny_model_dir, 1), 1)
    assert one["world"] == 1
    ranks = _launch(tmp_path, _recipe(tmp_path, "two", opd_tiny_model_dir, 2), 2)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    first, second = ranks
    assert len(first["observed"]) == 6  # once per generation batch, with the whole (gathered) batch
    assert all(len(o["indices"]) == 2 and len(o["rewards"]) == 2 for o in first["observed"])
    rewards = [x for o in first["observed"] for row in o["rewards"] for x in row]
    assert len(set(rewards)) > 1  # the rewards vary, so the selection's statistics do
    for key in ("drawn", "observed", "state"):
        assert first[key] == second[key], key
    assert first["drawn"][:6] == one["drawn"][:6]
    assert first["observed"] == one["observed"] and first["state"] == one["state"]
