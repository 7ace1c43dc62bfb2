"""Honest resume (issue 13, items 6-8): metrics rewound to the checkpoint, a torn line survived, a finished run left
alone unless max_steps was raised, a changed recipe refused with the diff unless --allow-recipe-change, and every
start's recipe kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opd_plugins.cli import main

TESTS = Path(__file__).parents[1]


def recipe_file(tmp_path, model_dir, **args):
    out = tmp_path / "run"
    recipe = {
        "plugins": ["helpers.fake_plugins_pkg.killer"],
        "model": {"name_or_path": str(model_dir), "lora": {"r": 4}},
        "data": {"task": {"name": "arithmetic", "params": {"digits": 2}}, "train_size": 32, "eval_size": 4},
        "trainer": {"args": {"max_steps": 4, "per_device_train_batch_size": 4, "num_generations": 4,
                             "max_completion_length": 4, "save_steps": 2, "learning_rate": 1e-3, **args}},
        "sampler": {"name": "counting"},
        "teacher": {"name": "self_context"},
        "divergence": {"name": "reverse_kl"},
        "objective": {"policy_gradient": 1.0, "divergence": 0.5},
        "evaluation": {"num_prompts": 4, "max_new_tokens": 2},
        "output_dir": str(out),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, out


def cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def loss_steps(out: Path) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


@pytest.fixture
def killed_run(tmp_path, opd_tiny_model_dir, monkeypatch):
    """A run SIGKILLed while writing checkpoint-4 (metrics already hold steps 3 and 4), plus a torn metrics line."""
    path, out = recipe_file(tmp_path, opd_tiny_model_dir)
    log = tmp_path / "sampler.log"
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OPD_TEST_SAMPLER_LOG": str(log), "OPD_TEST_KILL_AT_STEP": "4"}
    killed = subprocess.run([sys.executable, "-m", "opd_plugins", "train", str(path)], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert {3, 4} <= set(loss_steps(out))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.1')  # torn: the process died mid-write
    monkeypatch.setenv("OPD_TEST_SAMPLER_LOG", str(log))
    return path, out


def test_resume_story(killed_run, capsys, tmp_path, opd_tiny_model_dir):
    path, out = killed_run
    recipe_before = (out / "recipe.yaml").read_text()

    # 8. a changed recipe is refused, with the diff, and nothing is touched
    code, err = cli(capsys, "train", str(path), "--resume", "trainer.args.learning_rate=5e-4",
                    "divergence.name=forward_kl")
    assert code == 2 and "Traceback" not in err, err
    assert "trainer.args.learning_rate: 0.001 -> 0.0005" in err and 'divergence.name: "reverse_kl" -> "forward_kl"' in err
    assert "--allow-recipe-change" in err
    assert (out / "recipe.yaml").read_text() == recipe_before and not (out / "recipe-2.yaml").exists()
    code, err = cli(capsys, "train", str(path), "--allow-recipe-change")
    assert code == 2 and "only applies with --resume" in err

    # 6. resuming rewinds metrics.jsonl to the checkpoint (step 2) and survives the torn line
    code, err = cli(capsys, "train", str(path), "--resume")
    assert code == 0, err
    steps = loss_steps(out)
    assert steps == sorted(set(steps)) == [1, 2, 3, 4], steps  # every step once, in order
    superseded = [json.loads(line) for line in (out / "metrics_superseded.jsonl").read_text().splitlines()]
    assert {r["superseded_by_resume_from_step"] for r in superseded} == {2}
    assert any(isinstance(r["row"], str) and r["row"].startswith('{"step": 4, "loss": 0.1') for r in superseded)
    assert (out / "curves.png").stat().st_size > 1000
    assert sorted(p.name for p in out.glob("recipe*.yaml")) == ["recipe-1.yaml", "recipe-2.yaml", "recipe.yaml"]

    # 7. a finished run is reported complete and left untouched
    final = {p.name: p.read_bytes() for p in (out / "final").iterdir() if p.is_file()}
    summary = (out / "eval_summary.json").read_text()
    code, err = cli(capsys, "train", str(path), "--resume")
    assert code == 0 and "this run is complete (4 steps trained" in err and "raise trainer.args.max_steps" in err
    assert {p.name: p.read_bytes() for p in (out / "final").iterdir() if p.is_file()} == final
    assert (out / "eval_summary.json").read_text() == summary
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "recipe-3.yaml").exists()

    # ... unless max_steps was raised (not a change of what is trained)
    code, err = cli(capsys, "train", str(path), "--resume", "trainer.args.max_steps=6")
    assert code == 0, err
    assert json.loads((out / "eval_summary.json").read_text())["steps"] == 6
    assert loss_steps(out) == [1, 2, 3, 4, 5, 6]

    # 8. --allow-recipe-change continues with the new settings, and the history keeps each start's recipe
    code, err = cli(capsys, "train", str(path), "--resume", "--allow-recipe-change", "trainer.args.max_steps=7",
                    "trainer.args.learning_rate=5e-4")
    assert code == 0, err
    history = {p.name: yaml.safe_load(p.read_text()) for p in out.glob("recipe-*.yaml")}
    assert sorted(history) == ["recipe-1.yaml", "recipe-2.yaml", "recipe-3.yaml", "recipe-4.yaml"]
    assert history["recipe-1.yaml"]["trainer"]["args"]["learning_rate"] == 1e-3
    assert history["recipe-4.yaml"]["trainer"]["args"]["learning_rate"] == 5e-4
    assert yaml.safe_load((out / "recipe.yaml").read_text()) == history["recipe-4.yaml"]
