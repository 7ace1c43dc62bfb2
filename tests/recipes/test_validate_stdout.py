"""``opd-plugins validate``'s stdout is its result only, even on a cold cache: building the trainer-argument cache
imports transformers, which prints "[INFO] Running in WANDB offline mode" under ``WANDB_MODE=offline``; that goes
to stderr."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_validate_on_a_cold_cache_prints_only_its_result(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "OPD_PLUGINS_CACHE": str(tmp_path / "cache")}
    recipe = ROOT / "recipes" / "cpu" / "grpo_smollm2_sub.yaml"
    out = subprocess.run([sys.executable, "-m", "opd_plugins", "validate", str(recipe)], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((tmp_path / "cache").glob("trainer_args-*.json")), "the cache was not cold: nothing was built"
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{recipe}: valid ("), out.stdout
    assert "[INFO] Running in WANDB offline mode" in out.stderr  # still shown, where diagnostics go
