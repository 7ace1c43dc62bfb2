"""Every recipe under recipes/ (searched recursively) validates; CPU recipes train 2 steps end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opd_plugins.recipe import load_recipe
from opd_plugins.recipe.loader import device_problems

ROOT = Path(__file__).parents[2]
RECIPES = [p for p in sorted((ROOT / "recipes").rglob("*.yaml")) + sorted((ROOT / "recipes").rglob("*.yml"))
           if "accelerate" not in p.relative_to(ROOT / "recipes").parts]  # accelerate configs: their own tests


def test_recipes_found():
    assert len(RECIPES) >= 6
    assert ROOT / "recipes" / "quickstart" / "self_distill_cpu.yaml" in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_recipe_validates(path):
    recipe, pm = load_recipe(path, device_check=False)
    text = path.read_text()
    assert text.startswith("# What:"), "a recipe starts with a '# What:' comment saying what it does and how to launch it"
    assert "Launch" in text.split("\n\n")[0] or "launch" in text.lower()


CPU_RECIPES = [p for p in RECIPES if "qwen3" not in p.parts]


@pytest.mark.parametrize("path", CPU_RECIPES, ids=[str(p.relative_to(ROOT)) for p in CPU_RECIPES])
def test_cpu_recipe_trains_two_steps(path, tmp_path):
    recipe, _ = load_recipe(path, device_check=False)
    assert not device_problems(recipe)
    overrides = [
        f"output_dir={tmp_path / 'run'}", "trainer.args.max_steps=2", "trainer.args.save_steps=1",
        "trainer.args.per_device_train_batch_size=4", "trainer.args.max_completion_length=12",
        "evaluation.num_prompts=4", "evaluation.max_new_tokens=8",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "opd_plugins", "train", str(path), *overrides],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "eval_summary.json").read_text())
    assert summary["steps"] == 2 and summary["before"]["n"] == 4 and summary["after"]["n"] == 4
    assert "Held-out accuracy without privileged context" in out.stderr + out.stdout
    assert (tmp_path / "run" / "checkpoint-2" / "opd_checkpoint_complete").exists()
