"""benchmarks/gpu/fp8_rollout.py --cpu-smoke: the GPU benchmark's code path, end to end on a tiny CPU model."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_fp8_rollout_benchmark_cpu_smoke(tmp_path):
    out = tmp_path / "fp8.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "fp8_rollout.py"), "--cpu-smoke",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    assert header.split() == ["model", "arm", "kernel", "batch", "tok/s", "vs_bf16", "sync_ms", "weights_gib",
                              "peak_gib", "err_vs_bf16", "err_vs_dequant"]
    table = [line.split() for line in lines[lines.index(header) + 1:] if line.startswith("tiny")]
    assert {(r[1], r[3]) for r in table} == {(arm, b) for arm in ("bf16", "fp8_per_block", "fp8_per_channel")
                                             for b in ("1", "2")}

    result = json.loads(out.read_text())
    rows = result["rows"]
    assert len(rows) == 6 and not result["skipped"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["weights_gib"] > 0
        if r["arm"] == "bf16":
            assert r["vs_bf16"] == 1.0
        else:  # on CPU the FP8 copy runs the dequant path: exactly fake quantization, a few % off bf16
            assert r["kernel"] == "dequant" and r["err_vs_dequant"] == 0.0 and 0 < r["err_vs_bf16"] < 0.2
            assert r["sync_ms"] > 0
    weights = {r["arm"]: r["weights_gib"] for r in rows}
    assert weights["fp8_per_block"] < weights["bf16"] and weights["fp8_per_channel"] < weights["bf16"]
    assert result["models"]["tiny"]["arms"]["fp8_per_block"]["skipped"] == ["lm_head"]
