"""benchmarks/fp8_mismatch.py ``--part train`` on a tiny saved model: several seeds per arm, per-step lengths, the
mean and standard error over seeds against a naive computation; a bad ``--runs`` or ``--seeds`` refused before
anything loads. Never an accuracy."""

import json
import math
import subprocess
import sys

import pytest
from helpers.benchmarks import ROOT, run

from opd_plugins.testing import save_tiny_model

RUNS = ["hf_generate", "rollout_only/tis", "unified/none"]


def test_train_part_runs_every_arm_for_every_seed(tmp_path, opd_tokenizer):
    model = save_tiny_model(tmp_path / "model", seed=0, tokenizer=opd_tokenizer)
    out = tmp_path / "fp8.json"
    proc = run("fp8_mismatch.py", tmp_path, "--part", "train", "--model", str(model), "--steps", "2",
               "--eval-prompts", "4", "--max-new-tokens", "6", "--seed", "3", "--seeds", "2", "--runs", ",".join(RUNS),
               "--mask-truncated", "--out", str(out))
    train = json.loads(out.read_text())["train"]
    assert train["complete"] is True and train["seeds"] == [3, 4] and train["mask_truncated_completions"] is True
    assert [(r["run"], r["seed"]) for r in train["runs"]] == [(name, s) for name in RUNS for s in (3, 4)]
    for r in train["runs"]:
        assert len(r["lengths_per_step"]) == len(r["rewards_per_step"]) == 2
        assert all(0 < n <= 6 for n in r["lengths_per_step"]) and r["length_last_step"] == r["lengths_per_step"][-1]
        assert (r["mismatch_kl"] is None) == (r["run"] == "hf_generate")
        assert r["n"] == 4 and 0.0 <= r["accuracy_after"] <= 1.0
    assert [e["run"] for e in train["summary"]] == RUNS
    for e in train["summary"]:
        rows = [r for r in train["runs"] if r["run"] == e["run"]]
        for key in ("accuracy_after", "reward_last_half", "length_last_half"):
            values = [r[key] for r in rows]
            mean = sum(values) / 2
            se = math.sqrt(sum((v - mean) ** 2 for v in values) / 1) / math.sqrt(2)
            assert math.isclose(e[key], mean, abs_tol=1e-12) and math.isclose(e[key + "_se"], se, abs_tol=1e-12)
        assert e["accuracy_per_seed"] == [r["accuracy_after"] for r in rows]
    summary = proc.stdout[proc.stdout.index("mean ± SE over 2 seed(s)"):].splitlines()
    assert [line.split()[0] for line in summary[2:2 + len(RUNS)]] == RUNS


@pytest.mark.parametrize("bad, says", [
    (["--runs", "hf_generate,unified/kl"], ["unknown unified/kl", "rollout_only/tis"]),
    (["--seeds", "0"], ["--seeds must be at least 1"]),
])
def test_bad_options_are_refused_before_anything_loads(tmp_path, bad, says):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fp8_mismatch.py"), "--part", "train",
                           "--model", str(tmp_path / "absent"), *bad], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert all(s in proc.stderr for s in says), proc.stderr
    assert "Traceback" not in proc.stderr
