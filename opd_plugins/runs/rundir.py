"""The run directory every trainer variant writes, and the steps every run shares.

``output_dir`` holds: ``recipe.yaml`` (resolved, secrets redacted), ``plugins.json`` (loaded plugins and versions),
``run_info.json`` (one line per start), ``metrics.jsonl``, ``checkpoint-N/`` (published atomically),
``eval_before.json`` / ``eval_summary.json``, ``curves.png`` and ``final/`` (the trained weights or adapter);
a variant may add its own files (SODA: ``soda_pairs.jsonl``).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from opd_plugins.errors import OPDError
from opd_plugins.paths import append_durably, atomic_write
from opd_plugins.recipe.loader import redact
from opd_plugins.recipe.schema import DatasetSource, Recipe

RUN_MARKERS = ("recipe.yaml", "metrics.jsonl", "plugins.json")
"""Files by which a directory is recognisably a run directory of this project (it holds at least two of them:
every start writes recipe.yaml and plugins.json first)."""

RESUME_SAFE_KEYS = frozenset({
    "description", "output_dir",
    *(f"trainer.args.{k}" for k in (
        "max_steps", "logging_steps", "logging_first_step", "logging_strategy", "save_steps", "save_strategy",
        "save_total_limit", "save_only_model", "eval_steps", "eval_strategy", "per_device_eval_batch_size",
        "report_to", "run_name", "disable_tqdm", "dataloader_num_workers", "dataloader_pin_memory", "log_completions",
        "num_completions_to_print")),
    *(f"teacher.params.{k}" for k in (
        "base_url", "api_key_env", "timeout_s", "max_retries", "backoff_s", "concurrency", "sequences_per_request",
        "spawn_timeout_s", "spawn_args")),
})
"""Recipe keys a resumed run may change without ``--allow-recipe-change``: how long it runs, how it logs and
saves, how the teacher is reached. Anything else (model, data, components, objective, learning rate, ...)
changes what is trained. ``evaluation.*`` and ``diagnostics.*`` may change too (they measure the run, they do not
train it)."""

METRICS_SUPERSEDED = "metrics_superseded.jsonl"
"""Where a resumed run moves the metrics rows logged after the checkpoint it resumed from."""


@dataclass(frozen=True)
class Resume:
    """``--resume``, and what the resumed run may differ in (a true value wherever a plain ``resume=True`` is
    accepted)."""

    allow_recipe_change: bool = False

    def __bool__(self) -> bool:
        return True


@dataclass
class RunStart:
    """How a run starts: the checkpoint it resumes from (None: from the initial weights), or, when ``complete``
    holds the finished run's summary, not at all."""

    checkpoint: str | None = None
    complete: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------------------------
# Output directory
# ---------------------------------------------------------------------------------------------------------------


def last_complete_checkpoint(out: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(out)) if out.is_dir() else None


def is_run_dir(out: Path) -> bool:
    """Whether ``out`` is recognisably a run directory of this project (:data:`RUN_MARKERS`)."""
    return sum((out / name).is_file() for name in RUN_MARKERS) >= 2


def check_output_path(out: Path) -> None:
    """:class:`OPDError` unless ``out`` is, or can be created as, a writable directory."""
    if out.exists() and not out.is_dir():
        raise OPDError(f"output_dir {out} is a file, not a directory; choose another output_dir")
    probe = out
    while not probe.exists():
        if probe.is_symlink():  # a dangling link
            raise OPDError(f"output_dir {out}: {probe} is a broken symbolic link; choose another output_dir")
        probe = probe.parent
    if not probe.is_dir():
        raise OPDError(f"output_dir {out} cannot be created: {probe} is a file, not a directory; choose another "
                       "output_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == out else f"cannot be created: {probe} is not writable"
        raise OPDError(f"output_dir {out} {what} (by this user); choose a writable output_dir")


def prepare_output_dir(out: Path, *, resume: bool, overwrite: bool, resumable_without_checkpoint: bool = False) \
        -> str | None:
    """Check ``out`` and refuse to clobber an existing run unless asked; returns the checkpoint to resume from.

    ``--overwrite`` deletes only a run directory of this project (:func:`is_run_dir`) that does not hold the
    current directory. With ``resumable_without_checkpoint`` a resume finds nothing to resume from (None) instead
    of failing (SODA resumes pair building)."""
    if resume and overwrite:
        raise OPDError("--resume and --overwrite contradict each other: choose one")
    check_output_path(out)
    existing = out.is_dir() and any(out.iterdir())
    if resume:
        if not existing:
            raise OPDError(f"nothing to resume: output_dir {out} does not exist or is empty")
        ckpt = last_complete_checkpoint(out)
        if ckpt is None and not resumable_without_checkpoint:
            raise OPDError(f"nothing to resume: output_dir {out} has no complete checkpoint-N directory")
        return ckpt
    if existing:
        if not overwrite:
            listing = ", ".join(sorted(p.name for p in out.iterdir())[:6])
            raise OPDError(
                f"output_dir {out} already exists and is not empty ({listing}). Pass --resume to continue that run, "
                "--overwrite to replace it, or choose another output_dir (e.g. output_dir=runs/new on the command line)"
            )
        if not is_run_dir(out):
            raise OPDError(f"--overwrite refused: output_dir {out} is not a run directory of opd_plugins (it lacks "
                           f"{' / '.join(RUN_MARKERS)}), so it is not deleted; remove it yourself or choose another "
                           "output_dir")
        cwd = Path.cwd().resolve()
        if cwd == out.resolve() or out.resolve() in cwd.parents:
            raise OPDError(f"--overwrite refused: output_dir {out} holds the current directory; change directory "
                           "first or choose another output_dir")
        shutil.rmtree(out)
    return None


def start_run(out: Path, recipe: Recipe, *, resume: bool | Resume, overwrite: bool,
              resumable_without_checkpoint: bool = False) -> RunStart:
    """Everything decided about ``out`` before anything is loaded: :func:`prepare_output_dir`, and for a resume
    that the recipe did not change what is trained (:func:`recipe_changes`; refused unless
    ``Resume(allow_recipe_change=True)``) and whether the run is already complete (``RunStart.complete``: it
    finished and ``max_steps`` was not raised)."""
    checkpoint = prepare_output_dir(out, resume=bool(resume), overwrite=overwrite,
                                    resumable_without_checkpoint=True)
    if not resume:
        return RunStart()
    changes = recipe_changes(out, recipe)
    if changes and not (isinstance(resume, Resume) and resume.allow_recipe_change):
        shown = "\n".join(f"  {line}" for line in changes[:20]) + ("\n  ..." if len(changes) > 20 else "")
        raise OPDError(f"--resume refused: output_dir {out} was trained with another recipe, and these changes "
                       f"alter what is trained:\n{shown}\nResume with the recipe.yaml in {out}, pass "
                       "--allow-recipe-change to continue with the new settings (every start's recipe is kept as "
                       "recipe-<n>.yaml), or train into another output_dir")
    summary = finished_summary(out)
    if summary is not None:
        done = summary.get("steps")
        wanted = _int(recipe.trainer.args.get("max_steps"))
        if not (isinstance(done, int) and wanted is not None and wanted > done):
            return RunStart(complete=summary)
        if checkpoint is None:
            raise OPDError(f"output_dir {out} holds a run completed at step {done} with no checkpoint to continue "
                           f"from to max_steps={wanted}; train into another output_dir")
    if checkpoint is None and not resumable_without_checkpoint:
        raise OPDError(f"nothing to resume: output_dir {out} has no complete checkpoint-N directory")
    return RunStart(checkpoint=checkpoint)


def finished_summary(out: Path) -> dict[str, Any] | None:
    """The summary of a run that finished into ``out`` (``final/`` and ``eval_summary.json`` written), or None."""
    path = out / "eval_summary.json"
    if not (out / "final").is_dir() or not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _int(value: Any) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None


def recipe_changes(out: Path, recipe: Recipe) -> list[str]:
    """``key: old -> new`` for every setting in which ``recipe`` differs from the one ``out`` was last started
    with (its ``recipe.yaml``), leaving out :data:`RESUME_SAFE_KEYS`, ``evaluation.*`` and ``diagnostics.*``."""
    path = out / "recipe.yaml"
    if not path.is_file():
        return []
    try:
        old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return [f"(recipe.yaml in {out} is unreadable, so the recipe it was trained with is unknown)"]
    before, after = _flatten(old), _flatten(redact(recipe.model_dump(mode="json")))
    lines = []
    for key in sorted(set(before) | set(after)):
        measures = key.startswith(("evaluation.", "diagnostics."))
        if key in RESUME_SAFE_KEYS or measures or before.get(key) == after.get(key):
            continue
        lines.append(f"{key}: {_show(before, key)} -> {_show(after, key)}")
    return lines


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in obj.items()]
    elif isinstance(obj, list) and obj:
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(obj)]
    else:
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(_flatten(value, key))
    return out


def _show(values: dict[str, Any], key: str) -> str:
    return json.dumps(values[key]) if key in values else "(not set)"


def rewind_metrics(out: Path, checkpoint: str) -> int:
    """Before resuming from ``checkpoint``: keep in ``metrics.jsonl`` only the rows logged up to its step, and move
    the later ones (and a torn last line) to :data:`METRICS_SUPERSEDED`; returns how many rows moved."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    step = checkpoint_step(checkpoint)
    kept, moved = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        row = _json_row(line)
        if row is not None and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
        else:
            moved.append(json.dumps({"superseded_by_resume_from_step": step, "row": row if row is not None else line}))
    if moved:
        append_durably(out / METRICS_SUPERSEDED, "".join(m + "\n" for m in moved))
        atomic_write(path, "".join(k + "\n" for k in kept))
    return len(moved)


def checkpoint_step(checkpoint: str | os.PathLike) -> int:
    """The optimizer step a ``checkpoint-N`` directory was saved at (its trainer state, else its name)."""
    state = Path(checkpoint) / "trainer_state.json"
    try:
        return int(json.loads(state.read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return int(Path(checkpoint).name.rsplit("-", 1)[-1])


def _json_row(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` (a torn or corrupt line, e.g. of a killed run, is skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = (_json_row(line) for line in path.read_text(encoding="utf-8", errors="replace").splitlines())
    return [r for r in rows if r is not None]


def write_run_files(run_dir: Path, recipe: Recipe, pm: Any, argv: list[str] | None = None,
                    resumed_from: str | None = None) -> None:
    """``recipe.yaml`` (and this start's copy, ``recipe-<n>.yaml``), ``plugins.json``, a line of ``run_info.json``;
    when resuming from a checkpoint, :func:`rewind_metrics` first."""
    import torch
    import transformers
    import trl

    from opd_plugins.markers import __version__

    run_dir.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return  # one writer per launch: the global main process (torchrun / accelerate set RANK on every process)
    if resumed_from is not None:
        rewind_metrics(run_dir, resumed_from)
    text = yaml.safe_dump(redact(recipe.model_dump(mode="json")), sort_keys=False)
    current = run_dir / "recipe.yaml"
    starts = sorted(int(p.stem.split("-", 1)[1]) for p in run_dir.glob("recipe-*.yaml")
                    if p.stem.split("-", 1)[1].isdigit())
    if current.is_file() and not starts:  # a run directory from before the history: its recipe was start 1
        shutil.copyfile(current, run_dir / "recipe-1.yaml")
        starts = [1]
    start = (starts[-1] if starts else 0) + 1
    atomic_write(run_dir / f"recipe-{start}.yaml", f"# start {start}, resolved from {recipe.source}\n{text}")
    atomic_write(current, f"# resolved from {recipe.source} (start {start})\n{text}")
    (run_dir / "plugins.json").write_text(json.dumps(pm.plugin_versions(), indent=1), encoding="utf-8")
    info = {"opd_plugins": __version__, "trl": trl.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__, "python": platform.python_version(), "argv": argv or sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(run_dir / "run_info.json", "a", encoding="utf-8") as f:
        f.write(json.dumps(info) + "\n")


def callbacks(run_dir: Path) -> list[Any]:
    """``metrics.jsonl`` (every logged dict, main process only) and the rich progress display."""
    from transformers import TrainerCallback
    from trl.trainer.callbacks import RichProgressCallback

    class MetricsJsonl(TrainerCallback):
        """Append every logged dict to metrics.jsonl (main process only)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, "time": time.time(), **logs}) + "\n")

    return [MetricsJsonl(), RichProgressCallback()]


def use_rich_progress(trainer: Any) -> None:
    """Drop transformers' printer: the rich progress display shows the same numbers."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def lora_config(recipe: Recipe) -> Any:
    """The peft ``LoraConfig`` of ``model.lora``, or None for a full fine-tune."""
    if recipe.model.lora is None:
        return None
    from peft import LoraConfig

    lora = recipe.model.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


def cpu_defaults(args: dict[str, Any]) -> dict[str, Any]:
    """Trainer arguments with this project's defaults: on a machine without a GPU ``use_cpu`` and no ``bf16``, and
    no tqdm bar (the rich display replaces it)."""
    import torch

    args = dict(args)
    if not torch.cuda.is_available():
        args.setdefault("use_cpu", True)
        args.setdefault("bf16", False)
    args.setdefault("disable_tqdm", True)
    return args


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def build_data(recipe: Recipe, required: tuple[str, ...] = (), task: Any = None) -> tuple[Any, Any, Any]:
    """(train dataset, eval dataset or None, task or None) for a recipe. ``task`` is the recipe's task component
    when validation already built it (it is built from ``data.task`` otherwise)."""
    from opd_plugins.data.loading import check_columns, load_source
    from opd_plugins.data.tasks import get_task

    d = recipe.data
    if task is None and d.task is not None:
        task = get_task(d.task.name, d.task.params)
    if d.dataset is not None:
        src = DatasetSource.model_validate(d.dataset)
        need = ("prompt", *(("answer",) if task is not None else ()), *required)
        train = load_source(src, required=tuple(dict.fromkeys(need)))
        evald = load_source(DatasetSource.model_validate(d.eval_dataset), required=("prompt", "answer")) \
            if d.eval_dataset else None
    else:
        train = task.build("train", d.train_size, d.seed)
        evald = task.build("eval", d.eval_size, d.seed) if d.eval_size > 0 else None
        check_columns(train, ("prompt", *required), f"task {d.task.name!r}")
    return train, evald, task


# ---------------------------------------------------------------------------------------------------------------
# Evaluation, the end of a run
# ---------------------------------------------------------------------------------------------------------------


def cached_before_eval(out: Path, evaluate: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The pre-training evaluation, read from ``eval_before.json`` when a resumed run already has it (the
    weights it measured are gone), else computed by ``evaluate()`` and written there."""
    before_path = out / "eval_before.json"
    if before_path.exists():
        return json.loads(before_path.read_text())
    before = evaluate()
    before_path.write_text(json.dumps(before, indent=1))
    return before


def train_and_report(trainer: Any, out: Path, summary: dict[str, Any], checkpoint: str | None, console: Any,
                     evaluate_after: Callable[[], dict[str, Any]] | None = None) -> None:
    """Train (resuming from ``checkpoint``), save ``final/``, and on the main process evaluate, write
    ``eval_summary.json`` and the curves, and print the summary table."""
    t0 = time.time()
    trainer.train(resume_from_checkpoint=checkpoint)
    summary["train_seconds"] = round(time.time() - t0, 1)
    summary["steps"] = trainer.state.global_step
    trainer.save_model(str(out / "final"))
    # A sharded student (FSDP2, ZeRO-3) needs every rank in each forward: all ranks run the same evaluation (same
    # prompts and seeds, so the same result) and the main process writes it.
    sharded = getattr(trainer, "sharding", lambda: "none")() in ("fsdp", "deepspeed_zero3")
    after = evaluate_after() if evaluate_after is not None and (trainer.accelerator.is_main_process or sharded) \
        else None
    if trainer.accelerator.is_main_process:
        if after is not None:
            summary["after"] = after
        (out / "eval_summary.json").write_text(json.dumps(summary, indent=1))
        plot_curves(out, summary)
        print_summary(console, summary)


def print_summary(console: Any, summary: dict[str, Any]) -> None:
    from rich.table import Table

    if "after" not in summary:
        console.print(f"trained {summary.get('steps')} steps in {summary.get('train_seconds')} s; no held-out evaluation")
        return
    b, a = summary["before"], summary["after"]
    console.print("[bold]Held-out accuracy without privileged context[/bold]")
    table = Table()
    for col in ("", "accuracy", "± s.e.", "n"):
        table.add_column(col, justify="right")
    table.add_row("before", f"{b['accuracy']:.3f}", f"{b['stderr']:.3f}", str(b["n"]))
    table.add_row("after", f"{a['accuracy']:.3f}", f"{a['stderr']:.3f}", str(a["n"]))
    table.add_row("change", f"{a['accuracy'] - b['accuracy']:+.3f}", "", "")
    console.print(table)
    console.print(f"trained {summary['steps']} steps in {summary['train_seconds']} s; run directory: {summary['output_dir']}")


def plot_curves(run_dir: Path, summary: dict[str, Any]) -> Path | None:
    """Plot reward, divergence and held-out accuracy into ``curves.png``."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    keys = [k for k in ("reward", "opd/divergence", "opd/divergence_reward", "loss") if any(k in r for r in rows)]
    panels = keys + (["held-out accuracy"] if "after" in summary else [])
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        if key == "held-out accuracy":
            vals = [summary["before"]["accuracy"], summary["after"]["accuracy"]]
            errs = [summary["before"]["stderr"], summary["after"]["stderr"]]
            bars = ax.bar(["before", "after"], vals, yerr=errs, color=["#999999", "#3a7bd5"], capsize=4)
            for bar, v in zip(bars, vals, strict=True):
                ax.text(bar.get_x() + bar.get_width() / 2, min(v + 0.03, 0.95), f"{v:.3f}", ha="center")
            ax.set_ylim(0, 1)
        else:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
            ax.set_xlabel("step")
        ax.set_title(key)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def check_sampler_columns(sampler: Any, dataset: Any) -> None:
    """:class:`DataError` naming the sampler and the recipe key when the training data lacks a column it reads
    (a reference solution, say), before any model loads."""
    from opd_plugins.errors import DataError

    needed = tuple(sampler.required_columns()) if sampler is not None else ()
    have = set(getattr(dataset, "column_names", None) or [])
    missing = [c for c in needed if c not in have]
    if missing:
        raise DataError(f"sampler {sampler.name!r} reads column(s) {', '.join(missing)} (sampler.params), which the "
                        f"training data lacks; it has: {', '.join(sorted(have))}. Map a dataset column to it with "
                        f"data.dataset.columns (e.g. {{{missing[0]}: <column>}}), or set the sampler's column param")


def teacher_columns(teacher: Any) -> tuple[str, ...]:
    """Dataset columns the recipe's teacher reads (checked when the data is built)."""
    return tuple(teacher.required_columns()) if teacher is not None else ()


__all__ = ["METRICS_SUPERSEDED", "RESUME_SAFE_KEYS", "RUN_MARKERS", "Resume", "RunStart", "build_data",
           "cached_before_eval", "callbacks", "check_output_path", "check_sampler_columns", "checkpoint_step", "cpu_defaults",
           "finished_summary", "is_run_dir", "last_complete_checkpoint", "lora_config", "plot_curves",
           "prepare_output_dir", "print_summary", "read_metrics", "recipe_changes", "rewind_metrics", "start_run",
           "teacher_columns", "train_and_report", "use_rich_progress", "write_run_files"]
