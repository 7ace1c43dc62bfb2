"""Run a validated recipe: data, model, components, trainer, evaluation, and the run directory.

The run directory (``output_dir``) holds: ``recipe.yaml`` (resolved, secrets redacted), ``plugins.json``
(loaded plugins and versions), ``run_info.json``, ``metrics.jsonl``, ``checkpoint-N/`` (published atomically),
``eval_before.json`` / ``eval_summary.json``, ``curves.png`` and ``final/`` (the trained weights or adapter).
A recipe whose divergence is a preference objective (``dpo``) is run by :mod:`opd_plugins.soda` into the same
layout, plus ``soda_pairs.jsonl``.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from opd_plugins.errors import DataError, OPDError
from opd_plugins.recipe.loader import redact
from opd_plugins.recipe.schema import Recipe

RUN_MARKERS = ("recipe.yaml", "metrics.jsonl", "plugins.json")


# ---------------------------------------------------------------------------------------------------------------
# Output directory
# ---------------------------------------------------------------------------------------------------------------


def last_complete_checkpoint(out: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(out)) if out.is_dir() else None


def prepare_output_dir(out: Path, *, resume: bool, overwrite: bool) -> str | None:
    """Refuse to clobber an existing run unless asked; returns the checkpoint to resume from, if any."""
    if resume and overwrite:
        raise OPDError("--resume and --overwrite contradict each other: choose one")
    existing = out.is_dir() and any(out.iterdir())
    if resume:
        if not existing:
            raise OPDError(f"nothing to resume: output_dir {out} does not exist or is empty")
        ckpt = last_complete_checkpoint(out)
        if ckpt is None:
            raise OPDError(f"nothing to resume: output_dir {out} has no complete checkpoint-N directory")
        return ckpt
    if existing:
        if not overwrite:
            listing = ", ".join(sorted(p.name for p in out.iterdir())[:6])
            raise OPDError(
                f"output_dir {out} already exists and is not empty ({listing}). Pass --resume to continue that run, "
                "--overwrite to replace it, or choose another output_dir (e.g. output_dir=runs/new on the command line)"
            )
        shutil.rmtree(out)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def build_data(recipe: Recipe, required: tuple[str, ...] = ()) -> tuple[Any, Any, Any]:
    """(train dataset, eval dataset or None, task or None) for a recipe."""
    from opd_plugins.data.loading import DatasetSource, check_columns, load_source
    from opd_plugins.data.tasks import get_task

    d = recipe.data
    task = get_task(d.task.name, d.task.params) if d.task is not None else None
    if d.dataset is not None:
        src = DatasetSource.model_validate(d.dataset)
        need = ("prompt", *(("answer",) if task is not None else ()), *required)
        train = load_source(src, required=tuple(dict.fromkeys(need)))
        evald = load_source(DatasetSource.model_validate(d.eval_dataset), required=("prompt", "answer")) if d.eval_dataset else None
    else:
        train = task.build("train", d.train_size, d.seed)
        evald = task.build("eval", d.eval_size, d.seed) if d.eval_size > 0 else None
        check_columns(train, ("prompt", *required), f"task {d.task.name!r}")
    return train, evald, task


# ---------------------------------------------------------------------------------------------------------------
# Config, callbacks
# ---------------------------------------------------------------------------------------------------------------


def build_config(recipe: Recipe) -> Any:
    import torch

    from opd_plugins.trainers.opd_config import OPDConfig

    args = dict(recipe.trainer.args)
    if not torch.cuda.is_available():
        args.setdefault("use_cpu", True)
        args.setdefault("bf16", False)
    args.setdefault("disable_tqdm", True)
    try:
        return OPDConfig(output_dir=recipe.output_dir, seed=recipe.seed, **args)
    except (ValueError, TypeError) as exc:
        raise OPDError(f"{recipe.source}: trainer.args: {exc}") from None


def _callbacks(run_dir: Path) -> list[Any]:
    from transformers import TrainerCallback
    from trl.trainer.callbacks import RichProgressCallback

    class MetricsJsonl(TrainerCallback):
        """Append every logged dict to metrics.jsonl (main process only)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, "time": time.time(), **logs}) + "\n")

    return [MetricsJsonl(), RichProgressCallback()]


def write_run_files(run_dir: Path, recipe: Recipe, pm: Any, argv: list[str] | None = None) -> None:
    import torch
    import transformers
    import trl

    from opd_plugins.markers import __version__

    run_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(redact(recipe.model_dump(mode="json")), sort_keys=False)
    (run_dir / "recipe.yaml").write_text(f"# resolved from {recipe.source}\n{text}", encoding="utf-8")
    (run_dir / "plugins.json").write_text(json.dumps(pm.plugin_versions(), indent=1), encoding="utf-8")
    info = {"opd_plugins": __version__, "trl": trl.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__, "python": platform.python_version(), "argv": argv or sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(run_dir / "run_info.json", "a", encoding="utf-8") as f:
        f.write(json.dumps(info) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------------------------


def build_trainer(recipe: Recipe, pm: Any, *, train_dataset: Any, task: Any, callbacks: list[Any] | None = None) -> Any:
    from opd_plugins.data.tasks import make_reward_function
    from opd_plugins.models import load_causal_lm, load_tokenizer, resolve_model_path
    from opd_plugins.trainers import Components, OPDTrainer

    config = build_config(recipe)
    components = Components.from_recipe(recipe, pm)
    path = resolve_model_path(recipe.model.name_or_path)
    tokenizer = load_tokenizer(path, trust_remote_code=recipe.model.trust_remote_code)
    model = load_causal_lm(path, dtype=recipe.model.dtype, trust_remote_code=recipe.model.trust_remote_code)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    peft_config = None
    if recipe.model.lora is not None:
        from peft import LoraConfig

        lora = recipe.model.lora
        peft_config = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                                 target_modules=lora.target_modules, task_type="CAUSAL_LM")
    reward_funcs = [make_reward_function(task)] if task is not None else []
    trainer = OPDTrainer(model=model, args=config, components=components, reward_funcs=reward_funcs,
                         train_dataset=train_dataset, processing_class=tokenizer, peft_config=peft_config,
                         plugin_manager=pm, recipe=recipe, callbacks=callbacks)
    if callbacks:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # the rich progress display shows the same numbers
    return trainer


def run_evaluation(trainer: Any, recipe: Recipe, eval_ds: Any, task: Any, desc: str) -> dict[str, Any]:
    from opd_plugins.evaluation import evaluate_accuracy

    e = recipe.evaluation
    return evaluate_accuracy(
        trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class, eval_ds, task,
        num_prompts=e.num_prompts, max_new_tokens=e.max_new_tokens or trainer.args.max_completion_length,
        temperature=e.temperature, samples_per_prompt=e.samples_per_prompt, batch_size=e.batch_size,
        seed=recipe.seed, desc=desc,
    )


def train(recipe: Recipe, pm: Any, *, resume: bool = False, overwrite: bool = False,
          argv: list[str] | None = None) -> dict[str, Any]:
    """Train a validated recipe end to end; returns the evaluation summary."""
    from rich.console import Console
    from transformers import set_seed

    from opd_plugins import soda

    if soda.is_preference_recipe(recipe, pm):  # a preference objective: SODA pairs + TRL's DPOTrainer
        return soda.train(recipe, pm, resume=resume, overwrite=overwrite, argv=argv)
    console = Console(stderr=True)
    out = Path(recipe.output_dir)
    # Everything that can be checked without the model is checked before anything is written.
    checkpoint = prepare_output_dir(out, resume=resume, overwrite=overwrite)
    set_seed(recipe.seed)
    required = tuple(recipe_teacher_columns(recipe, pm))
    train_ds, eval_ds, task = build_data(recipe, required)
    build_config(recipe)

    write_run_files(out, recipe, pm, argv)
    trainer = build_trainer(recipe, pm, train_dataset=train_ds, task=task, callbacks=_callbacks(out))
    try:
        do_eval = recipe.evaluation.enabled and eval_ds is not None and task is not None
        summary: dict[str, Any] = {"recipe": recipe.source, "output_dir": str(out)}
        if do_eval and trainer.accelerator.is_main_process:
            summary["before"] = cached_before_eval(
                out, lambda: run_evaluation(trainer, recipe, eval_ds, task, "evaluating before training"))
        after = (lambda: run_evaluation(trainer, recipe, eval_ds, task, "evaluating after training")) if do_eval \
            else None
        train_and_report(trainer, out, summary, checkpoint, console, after)
    finally:
        trainer.close_components()
    return summary


def cached_before_eval(out: Path, evaluate: Any) -> dict[str, Any]:
    """The pre-training evaluation, read from ``eval_before.json`` when a resumed run already has it (the
    weights it measured are gone), else computed by ``evaluate()`` and written there."""
    before_path = out / "eval_before.json"
    if before_path.exists():
        return json.loads(before_path.read_text())
    before = evaluate()
    before_path.write_text(json.dumps(before, indent=1))
    return before


def train_and_report(trainer: Any, out: Path, summary: dict[str, Any], checkpoint: str | None, console: Any,
                     evaluate_after: Any = None) -> None:
    """Train (resuming from ``checkpoint``), save ``final/``, and on the main process evaluate, write
    ``eval_summary.json`` and the curves, and print the summary table."""
    t0 = time.time()
    trainer.train(resume_from_checkpoint=checkpoint)
    summary["train_seconds"] = round(time.time() - t0, 1)
    summary["steps"] = trainer.state.global_step
    trainer.save_model(str(out / "final"))
    if trainer.accelerator.is_main_process:
        if evaluate_after is not None:
            summary["after"] = evaluate_after()
        (out / "eval_summary.json").write_text(json.dumps(summary, indent=1))
        plot_curves(out, summary)
        print_summary(console, summary)


def recipe_teacher_columns(recipe: Recipe, pm: Any) -> list[str]:
    if recipe.teacher is None:
        return []
    cls = pm.registry.get("teacher", recipe.teacher.name)
    return list(cls(cls.Params(**recipe.teacher.params)).required_columns())


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

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
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


__all__ = ["train", "build_trainer", "build_data", "build_config", "prepare_output_dir", "DataError"]
