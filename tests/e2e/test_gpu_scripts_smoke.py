"""benchmarks/gpu/opd_step.py --cpu-smoke: the GPU benchmark's code path (random models saved, the recipes' own
OPDTrainer built and trained, the memory model's prediction), end to end on tiny configs on CPU."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARMS = ("lora", "lora_fused", "full")


def test_opd_step_benchmark_cpu_smoke(tmp_path):
    out = tmp_path / "opd_step.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "opd_step.py"), "--cpu-smoke",
                           "--workdir", str(tmp_path / "models"), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("arm "))
    assert header.split() == ["arm", "batch", "gen_batch", "prompt", "T", "steps", "step_s", "tok/s", "peak_gib",
                              "reserved_gib", "pred_gib", "meas/pred", "pred_phase"]
    table = [line.split() for line in lines[lines.index(header) + 1:] if line.split()[:1] and line.split()[0] in ARMS]
    assert [r[0] for r in table] == list(ARMS)
    assert all(r[1:6] == ["2", "4", r[3], "8", "1"] for r in table)  # batch, generation batch, T, timed steps

    result = json.loads(out.read_text())
    assert not result["skipped"] and [r["arm"] for r in result["rows"]] == list(ARMS)
    assert set(result["models"]) == {"tiny-student", "tiny-teacher"}
    assert all(m["params_b"] > 0 for m in result["models"].values())
    for r in result["rows"]:
        assert "error" not in r and "skipped" not in r, r
        assert r["steps"] == 1 and len(r["step_times_s"]) == 2 and r["prompt"] == result["prompt_len"] > 0
        for key in ("step_s", "tokens_per_s", "peak_gib", "pred_gib", "pred_train_gib", "pred_gen_gib", "ratio",
                    "setup_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["arm"], key, r[key])
        parts = r["pred_components_gib"]
        assert parts["teacher"] > 0 and parts["logits"] > 0 and parts["weights"] > 0
        assert (parts["lora"] > 0) == r["arm"].startswith("lora")
