"""The HTML report: figures (matplotlib, PNG files and base64 in the page) and the Jinja2 template.

matplotlib and jinja2 are imported inside the functions that use them, so ``import opd_plugins.report`` stays cheap.
"""

from __future__ import annotations

import base64
import difflib
import importlib.util
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opd_plugins.errors import OPDError
from opd_plugins.report.load import MISSING, RunData, differing_keys, is_number, load_run

GROUPS = ("opd", "diag", "teacher", "correction", "rollout", "prompt_selection", "sampler", "token_weighting", "rewards")
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
KEY_SETTINGS = ("description", "plugins", "model.name_or_path", "model.dtype", "model.lora", "data.task",
                "data.dataset", "data.eval_dataset", "data.train_size", "data.eval_size", "teacher", "divergence",
                "advantage", "sampler", "prompt_selection", "rollout", "token_weighting", "objective.policy_gradient",
                "objective.divergence", "objective.divergence_reward", "correction.mode", "evaluation.num_prompts",
                "evaluation.temperature", "evaluation.samples_per_prompt", "evaluation.max_new_tokens", "seed")


@dataclass
class Figure:
    title: str
    file: str
    data_uri: str


def group_of(metric: str) -> str:
    head = metric.split("/", 1)[0]
    return head if "/" in metric and head in GROUPS else "train"


def describe(value: Any) -> str:
    """A short one-line rendering of a recipe value: ``name(k=v, ...)`` for a component spec."""
    if value is MISSING:
        return "(absent)"
    if value is None:
        return "none"
    if isinstance(value, dict) and "name" in value and set(value) <= {"name", "params"}:
        params = value.get("params") or {}
        return str(value["name"]) + (f"({describe(params)})" if params else "")
    if isinstance(value, dict):
        return ", ".join(f"{k}={describe(v)}" for k, v in value.items()) if value else "{}"
    if isinstance(value, list):
        return "[" + ", ".join(describe(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def key_settings(recipe: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for key in KEY_SETTINGS:
        node: Any = recipe
        for part in key.split("."):
            node = node.get(part, MISSING) if isinstance(node, dict) else MISSING
        if node is MISSING or (key.startswith("data.") and node is None) or (key == "plugins" and not node):
            continue
        rows.append((key, describe(node)))
    args = (recipe.get("trainer") or {}).get("args") or {}
    rows += [(f"trainer.args.{k}", describe(v)) for k, v in args.items()]
    if recipe.get("output_dir"):
        rows.append(("output_dir", str(recipe["output_dir"])))
    return rows


def fmt_num(v: Any, digits: int = 3) -> str:
    if not is_number(v):
        return "—"
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}f}" if abs(v) >= 10 ** -digits or v == 0 else f"{v:.2g}"


def fmt_time(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if is_number(t) else "—"


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------


def _save(fig: Any, out: Path, file: str, title: str) -> Figure:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    data = buf.getvalue()
    (out / file).write_bytes(data)
    return Figure(title, file, "data:image/png;base64," + base64.b64encode(data).decode("ascii"))


def curve_figures(runs: list[RunData], out: Path) -> list[Figure]:
    """One figure per metric group; a panel per metric, a line per run (x = step)."""
    from matplotlib.figure import Figure as MplFigure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    names: dict[str, list[str]] = {}
    for run in runs:
        for m in run.metric_names():
            names.setdefault(group_of(m), [])
            if m not in names[group_of(m)]:
                names[group_of(m)].append(m)
    figures = []
    for group in (*GROUPS, "train"):
        metrics = names.get(group)
        if not metrics:
            continue
        ncols = min(3, len(metrics))
        nrows = math.ceil(len(metrics) / ncols)
        fig = MplFigure(figsize=(3.9 * ncols, 2.7 * nrows + 0.5), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, metric in zip(axes, metrics):
            for i, run in enumerate(runs):
                pts = [(r["step"], r[metric]) for r in run.metrics if is_number(r.get(metric))]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=COLORS[i % len(COLORS)],
                            marker="." if len(pts) <= 30 else None, label=run.name, linewidth=1.4)
            ax.set_title(metric if group == "train" else metric[len(group) + 1:], fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.grid(alpha=0.3)
        for ax in axes[len(metrics):]:
            ax.set_visible(False)
        handles = [Line2D([], [], color=COLORS[i % len(COLORS)], marker=".", label=run.name)
                   for i, run in enumerate(runs) if set(metrics) & set(run.metric_names())]
        fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 5), fontsize=8, frameon=False)
        title = "train" if group == "train" else f"{group}/"
        figures.append(_save(fig, out, f"curves-{group}.png", title))
    return figures


def accuracy_figure(runs: list[RunData], out: Path) -> Figure | None:
    """Held-out accuracy before and after training per run, with ± one standard error."""
    from matplotlib.figure import Figure as MplFigure

    evaluated = [(i, r) for i, r in enumerate(runs) if r.eval_before or r.eval_after]
    if not evaluated:
        return None
    fig = MplFigure(figsize=(max(4.5, 1.6 * len(evaluated) + 2), 3.4), layout="constrained")
    ax = fig.subplots()
    width = 0.38
    top = 1.0
    for x, (i, run) in enumerate(evaluated):
        for dx, phase, ev, color in ((-width / 2, "before", run.eval_before, "#9aa5b1"),
                                     (width / 2, "after", run.eval_after, COLORS[i % len(COLORS)])):
            if not ev or not is_number(ev.get("accuracy")) or not math.isfinite(ev["accuracy"]):
                continue
            acc, err = ev["accuracy"], ev.get("stderr")
            err = err if is_number(err) and math.isfinite(err) else 0.0
            ax.bar(x + dx, acc, width * 0.95, yerr=err, capsize=4, color=color, edgecolor="#333333", linewidth=0.5,
                   label=phase if x == 0 else None)
            ax.text(x + dx, acc + err + 0.02, f"{acc:.3f}", ha="center", va="bottom", fontsize=8)
            top = max(top, acc + err + 0.12)
    ax.set_xticks(range(len(evaluated)), [r.name for _, r in evaluated], fontsize=8)
    ax.set_ylim(0, top)
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out, "accuracy.png", "held-out accuracy")


# ---------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------


def unified_diff(a: RunData, b: RunData) -> list[tuple[str, str]]:
    """``(css class, line)`` for the unified diff of two runs' resolved recipe texts."""
    lines = difflib.unified_diff(a.recipe_text.splitlines(), b.recipe_text.splitlines(),
                                 fromfile=a.name, tofile=b.name, n=2, lineterm="")
    out = []
    for line in lines:
        cls = ("file" if line.startswith(("---", "+++")) else "hunk" if line.startswith("@@")
               else "add" if line.startswith("+") else "del" if line.startswith("-") else "ctx")
        out.append((cls, line))
    return out


def accuracy_rows(runs: list[RunData]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        b, a = run.eval_before or {}, run.eval_after or {}
        if not b and not a:
            continue
        change = a["accuracy"] - b["accuracy"] if is_number(a.get("accuracy")) and is_number(b.get("accuracy")) \
            else None
        ns = list(dict.fromkeys(str(e["n"]) for e in (b, a) if "n" in e))
        rows.append({"name": run.name, "before": fmt_num(b.get("accuracy")), "before_se": fmt_num(b.get("stderr")),
                     "after": fmt_num(a.get("accuracy")), "after_se": fmt_num(a.get("stderr")),
                     "change": "—" if change is None else f"{change:+.3f}",
                     "sign": "" if not change else ("up" if change > 0 else "down"), "n": " / ".join(ns) or "—"})
    return rows


def run_view(index: int, run: RunData) -> dict[str, Any]:
    info = run.run_info[-1] if run.run_info else {}
    versions = ", ".join(f"{k} {info[k]}" for k in ("opd_plugins", "trl", "transformers", "torch", "python")
                         if k in info)
    argv = info.get("argv")
    return {
        "id": f"run-{index + 1}", "name": run.name, "path": str(run.path), "started": run.started or "—",
        "starts": len(run.run_info), "source": run.recipe_source, "settings": key_settings(run.recipe),
        "recipe_text": run.recipe_text, "versions": versions,
        "argv": " ".join(map(str, argv)) if isinstance(argv, list) else None,
        "plugins": [(p.get("name", "?"), p.get("dist") or "", p.get("version") or "") for p in run.plugins],
        "checkpoints": [(c.step, c.complete, fmt_time(c.mtime)) for c in run.checkpoints],
        "examples": {phase: [{"question": str(e.get("question", "")), "answer": str(e.get("answer", "")),
                              "completion": str(e.get("completion", "")), "score": fmt_num(e.get("score"))}
                             for e in exs] for phase, exs in run.examples.items()},
        "steps": run.timings.steps, "description": run.recipe.get("description"),
        "warnings": run.warnings, "rows": len(run.metrics),
    }


def timing_rows(runs: list[RunData]) -> list[dict[str, Any]]:
    return [{"name": r.name, "steps": r.timings.steps if r.timings.steps is not None else "—",
             "train_seconds": fmt_num(r.timings.train_seconds, 1), "sps": fmt_num(r.timings.seconds_per_step),
             "span": fmt_num(r.timings.logged_span_seconds, 1), "runtime": fmt_num(r.timings.train_runtime, 1),
             "starts": len(r.run_info), "rows": len(r.metrics)} for r in runs]


def render_html(runs: list[RunData], out: Path) -> str:
    from importlib.resources import files

    import jinja2

    from opd_plugins import __version__

    text = files("opd_plugins.report").joinpath("templates", "report.html.j2").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    diff_keys = differing_keys([r.recipe for r in runs]) if len(runs) > 1 else []
    return env.from_string(text).render(
        title="Training report: " + ", ".join(r.name for r in runs),
        generated=time.strftime("%Y-%m-%d %H:%M:%S"), version=__version__,
        runs=[run_view(i, r) for i, r in enumerate(runs)],
        diff_keys=[(k, [describe(v) for v in vals]) for k, vals in diff_keys],
        unified_diffs=[(runs[0].name, r.name, unified_diff(runs[0], r)) for r in runs[1:]],
        same_recipe_text=len(runs) > 1 and all(r.recipe == runs[0].recipe for r in runs[1:]),
        accuracy=accuracy_rows(runs), accuracy_figure=accuracy_figure(runs, out),
        curves=curve_figures(runs, out), timings=timing_rows(runs),
    )


def _names(paths: list[Path]) -> list[str]:
    """Run names: the directory name, with its parent when two runs share it, numbered if still ambiguous."""
    names = [p.resolve().name for p in paths]
    if len(set(names)) < len(names):
        names = ["/".join(p.resolve().parts[-2:]) for p in paths]
    if len(set(names)) < len(names):
        names = [f"{n} #{i + 1}" for i, n in enumerate(names)]
    return names


def build_report(run_dirs: list[str | Path] | str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (self-contained) and its figures as PNG files into ``out``; returns the HTML's path.

    ``out`` defaults to ``<run dir>/report/`` for one run and to ``./report-<timestamp>/`` for several.
    Nothing in the run directories is modified (the default ``report/`` folder is the only thing added)."""
    paths = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(p) for p in run_dirs]
    if not paths:
        raise ValueError("build_report needs at least one run directory")
    missing = [m for m in ("matplotlib", "jinja2") if importlib.util.find_spec(m) is None]
    if missing:
        raise OPDError(f"the report needs {' and '.join(missing)}: pip install matplotlib jinja2")
    runs = [load_run(p, name) for p, name in zip(paths, _names(paths))]
    if out is None:
        out = paths[0] / "report" if len(paths) == 1 else Path.cwd() / f"report-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    html = render_html(runs, out)
    path = out / "report.html"
    path.write_text(html, encoding="utf-8")
    return path


__all__ = ["build_report", "render_html", "curve_figures", "accuracy_figure", "group_of", "describe"]
