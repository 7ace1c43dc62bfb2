"""Read a run directory (see :mod:`opd_plugins.run`) into a :class:`RunData`, without modifying anything in it.

Reading is forgiving where a real run can leave untidy files: a resumed run logs some steps twice (the last value
logged for a step wins), a killed run can leave a torn last line in ``metrics.jsonl`` (skipped), and any of the
files may be missing (the report says so). Only a path that is not a run directory at all is an error.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd_plugins.errors import OPDError

CHECKPOINT_MARKER = "opd_checkpoint_complete"
# Keys of the one dict the trainer logs at the end of training (not a step's metrics).
SUMMARY_KEYS = frozenset({"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos",
                          "train_loss"})
NOT_METRICS = frozenset({"step", "time"})


@dataclass
class Checkpoint:
    step: int
    path: Path
    mtime: float
    complete: bool


@dataclass
class Timings:
    train_seconds: float | None = None
    steps: int | None = None
    seconds_per_step: float | None = None  # median over consecutive logged steps
    logged_span_seconds: float | None = None  # last minus first logged time
    train_runtime: float | None = None  # what the trainer reported at the end of its last start


@dataclass
class RunData:
    name: str
    path: Path
    recipe: dict[str, Any] = field(default_factory=dict)
    recipe_text: str = ""
    recipe_source: str | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)  # one row per step, sorted by step
    train_summary: dict[str, Any] = field(default_factory=dict)
    eval_before: dict[str, Any] | None = None
    eval_after: dict[str, Any] | None = None
    checkpoints: list[Checkpoint] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)
    run_info: list[dict[str, Any]] = field(default_factory=list)  # one entry per start (resumes append)
    plugins: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def examples(self) -> dict[str, list[dict[str, Any]]]:
        """``{"before": [...], "after": [...]}``: the evaluation examples of each phase that has them."""
        return {phase: list(ev.get("examples") or []) for phase, ev in
                (("before", self.eval_before), ("after", self.eval_after)) if ev}

    @property
    def started(self) -> str | None:
        """When the run was first started (``run_info.json``), else the recipe file's modification time."""
        if self.run_info and self.run_info[0].get("started"):
            return str(self.run_info[0]["started"])
        recipe = self.path / "recipe.yaml"
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(recipe.stat().st_mtime)) if recipe.exists() else None

    def metric_names(self) -> list[str]:
        """Every numeric metric logged at least once, in first-logged order."""
        names: dict[str, None] = {}
        for row in self.metrics:
            for k, v in row.items():
                if k not in NOT_METRICS and is_number(v):
                    names[k] = None
        return list(names)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_json(path: Path, warnings: list[str]) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        warnings.append(f"{path.name} is not valid JSON ({exc}); ignored")
        return None


def _read_json_lines(path: Path, warnings: list[str]) -> list[dict[str, Any]]:
    """Every JSON-object line of ``path``; a malformed line is skipped (a torn last line without a warning)."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif i != last:
            warnings.append(f"{path.name} line {i + 1} is not a JSON object; skipped")
    return rows


def merge_steps(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(one row per step sorted by step, the end-of-training summary)``. A step logged twice (a resumed run)
    keeps the last value logged for each key; rows without a step are dropped."""
    by_step: dict[int, dict[str, Any]] = {}
    summary: dict[str, Any] = {}
    for row in rows:
        if SUMMARY_KEYS & row.keys():
            summary = row
            continue
        step = row.get("step")
        if not is_number(step):
            continue
        by_step.setdefault(int(step), {}).update(row)
    return [by_step[s] | {"step": s} for s in sorted(by_step)], summary


def seconds_per_step(metrics: list[dict[str, Any]]) -> float | None:
    """Median of (time delta / step delta) over consecutive logged steps: robust to the pause of a resume."""
    pts = [(r["step"], r["time"]) for r in metrics if is_number(r.get("time"))]
    rates = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(pts, pts[1:]) if s1 > s0 and t1 >= t0]
    return statistics.median(rates) if rates else None


def find_checkpoints(run_dir: Path) -> list[Checkpoint]:
    out = []
    for p in run_dir.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            out.append(Checkpoint(int(m.group(1)), p, p.stat().st_mtime, (p / CHECKPOINT_MARKER).exists()))
    return sorted(out, key=lambda c: c.step)


def _parse_recipe(text: str, warnings: list[str]) -> tuple[dict[str, Any], str | None]:
    import yaml

    first = text.splitlines()[0] if text else ""
    source = first[len("# resolved from "):].strip() if first.startswith("# resolved from ") else None
    try:
        data = yaml.safe_load(text) if text else {}
    except yaml.YAMLError as exc:
        warnings.append(f"recipe.yaml is not valid YAML ({exc}); its settings are not shown")
        return {}, source
    if not isinstance(data, dict):
        warnings.append("recipe.yaml is not a mapping; its settings are not shown")
        return {}, source
    return data, source


def _finite(v: Any) -> float | None:
    return float(v) if is_number(v) and math.isfinite(v) else None


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """Read the run directory ``path``; raises :class:`OPDError` when it is not one."""
    path = Path(path)
    if not path.is_dir():
        why = "does not exist" if not path.exists() else "is not a directory"
        raise OPDError(f"not a run directory of opd_plugins: {path} ({why})")
    if not (path / "metrics.jsonl").is_file() and not (path / "recipe.yaml").is_file():
        raise OPDError(f"not a run directory of opd_plugins: {path} (it has neither metrics.jsonl nor recipe.yaml; "
                       "pass the output_dir of a training run)")
    run = RunData(name=name or path.resolve().name, path=path)
    w = run.warnings
    recipe_file = path / "recipe.yaml"
    if recipe_file.is_file():
        run.recipe_text = recipe_file.read_text(encoding="utf-8", errors="replace")
        run.recipe, run.recipe_source = _parse_recipe(run.recipe_text, w)
    else:
        w.append("no recipe.yaml")
    if not (path / "metrics.jsonl").is_file():
        w.append("no metrics.jsonl: nothing was logged")
    run.metrics, run.train_summary = merge_steps(_read_json_lines(path / "metrics.jsonl", w))
    run.run_info = _read_json_lines(path / "run_info.json", w)
    plugins = _read_json(path / "plugins.json", w)
    run.plugins = [p for p in plugins if isinstance(p, dict)] if isinstance(plugins, list) else []
    summary = _read_json(path / "eval_summary.json", w)
    summary = summary if isinstance(summary, dict) else {}
    before = summary.get("before") or _read_json(path / "eval_before.json", w)
    run.eval_before = before if isinstance(before, dict) else None
    run.eval_after = summary["after"] if isinstance(summary.get("after"), dict) else None
    run.checkpoints = find_checkpoints(path)
    last_step = run.metrics[-1]["step"] if run.metrics else None
    times = [r["time"] for r in run.metrics if is_number(r.get("time"))]
    run.timings = Timings(
        train_seconds=_finite(summary.get("train_seconds")),
        steps=int(summary["steps"]) if is_number(summary.get("steps")) else last_step,
        seconds_per_step=seconds_per_step(run.metrics),
        logged_span_seconds=max(times) - min(times) if len(times) > 1 else None,
        train_runtime=_finite(run.train_summary.get("train_runtime")),
    )
    return run


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": leaf}`` for nested dicts; a list (e.g. ``token_weighting``) and an empty dict are leaves."""
    if not (isinstance(value, dict) and value):
        return {prefix: value} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in value.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


MISSING = object()


def differing_keys(recipes: list[dict[str, Any]]) -> list[tuple[str, list[Any]]]:
    """``(dotted key, [value in each recipe, or MISSING])`` for every key whose values are not all equal."""
    flat = [flatten(r) for r in recipes]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    rows = []
    for k in keys:
        values = [f.get(k, MISSING) for f in flat]
        if any(v is MISSING or values[0] is MISSING or v != values[0] for v in values[1:]):
            rows.append((k, values))
    return rows
