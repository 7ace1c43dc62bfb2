"""The arms benchmarks (benchmarks/efficiency.py, benchmarks/samplers.py) in tests: their modules importable, their
``--quick`` smoke mode run in a subprocess, and the checks every arm of their JSON must pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # `import _arms`, `import efficiency` as the scripts do


def run(script: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> <args>`` in ``tmp_path``, single-threaded; fails the test on a non-zero exit."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def quick(script: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    """Run ``--quick`` and return the process and its complete JSON report."""
    out = tmp_path / f"{Path(script).stem}.json"
    proc = run(script, tmp_path, "--quick", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["complete"] is True and report["benchmark"] == Path(script).stem
    assert {"settings", "arms", "table", "initial", "png"} <= set(report)
    assert Path(report["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return proc, report


def check_arms(report: dict[str, Any], arms: list[str]) -> None:
    """Every arm ran, to the same budget (training stops at the first generation batch that reaches it), with the
    same checkpoints, the one at 0 tokens shared."""
    budget, evals = report["settings"]["budget"], report["settings"]["evals"]
    assert report["settings"]["targets"] == [-(-budget * k // evals) for k in range(1, evals + 1)]  # ceil(k·B/E)
    assert list(report["arms"]) == arms and [row["arm"] for row in report["table"]] == arms
    for name, arm in report["arms"].items():
        for run_ in arm["runs"]:
            assert budget <= run_["tokens"] < budget + run_["batch_max_tokens"], name
            assert run_["budget_reached"] and run_["generation_batches"] == run_["steps"]
            points = run_["checkpoints"]
            assert [p["k"] for p in points] == list(range(evals + 1))
            assert points[0] == {**report["initial"], "k": 0, "target": 0, "tokens": 0, "step": 0}
            assert all(p["tokens"] >= p["target"] for p in points)
            assert all(a["tokens"] <= b["tokens"] and a["step"] <= b["step"] for a, b in zip(points, points[1:]))
            assert points[-1]["tokens"] == run_["tokens"] and points[-1]["n"] == report["settings"]["eval_n"]
        assert set(arm["summary"]) >= {"curve", "final", "se_over", "tokens_used"}


def table_rows(stdout: str) -> tuple[list[str], list[str]]:
    """The first printed markdown table's header cells and its rows' first cells (the arms)."""
    lines = []
    for line in stdout.splitlines():
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            break
    lines = [line for line in lines if line.startswith("| ")]  # not the |---| rule
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    return header, [line.split("|")[1].strip() for line in lines[1:]]
