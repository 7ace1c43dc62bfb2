"""The ``soda`` trainer variant: SODA, semi on-policy black-box distillation (preference pairs, then DPO).

Paper: SODA, "Semi On-Policy Black-Box Distillation" (reference/paper_catalog.md §1.9). For each prompt the
teacher's response is *chosen* and a one-time, static snapshot of the base student's own zero-shot response is
*rejected*; the student is then trained with DPO against its initial weights. There are no per-step rollouts and
no discriminator: the only on-policy part is the snapshot. Recipes choose it with ``trainer.name: soda``; their
rules are in :mod:`opd_plugins.recipe.preference`.

1. :func:`build_pairs`: the initial student's response to every training prompt (sampled once with the recipe's
   ``temperature``/``top_p``/``top_k``/``max_completion_length``) and the text teacher's response
   (``teacher.generate``), appended to ``<output_dir>/soda_pairs.jsonl`` batch by batch. Re-running keeps the
   finished rows and computes the rest; pairs whose two responses are identical or empty are dropped and counted.
2. :class:`~opd_plugins.trainers.soda_trainer.SODATrainer` (TRL's ``DPOTrainer``) on the kept pairs (reference =
   the initial weights: the LoRA adapter disabled, or a frozen copy), with ``trainer.args`` going to TRL's
   ``DPOConfig`` (``beta``, ``loss_type``, ``label_smoothing``, ``learning_rate``, ...).

The run directory is the OPD one (recipe.yaml, plugins.json, run_info.json, metrics.jsonl, atomically published
``checkpoint-N/``, eval_before.json / eval_summary.json, curves.png, final/) plus ``soda_pairs.jsonl``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

from opd_plugins.errors import OPDError, Problem
from opd_plugins.paths import append_durably
from opd_plugins.recipe import preference
from opd_plugins.recipe.preference import SAMPLING_ARGS, Sampling
from opd_plugins.recipe.schema import Recipe
from opd_plugins.runs import rundir
from opd_plugins.variants import TrainerVariant

PAIRS_FILE = "soda_pairs.jsonl"
PAIRS_FORMAT = 1
DROP_REASONS = ("identical", "empty_teacher", "empty_student")


# ---------------------------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------------------------


def read_pairs(path: str | os.PathLike, prompts: list[Any] | None = None,
               fingerprint: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The finished rows of a pairs file, in order (``[]`` if it does not exist).

    A last line without its newline (a run killed while writing) is cut off the file. Anything else that does
    not fit — a corrupt line, rows out of order, a prompt that differs from ``prompts[index]``, a header whose
    ``fingerprint`` (student, teacher, sampling) differs — is an :class:`OPDError`: the file belongs to another run.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    complete, _, partial = data.rpartition(b"\n")
    if partial:
        with open(path, "r+b") as f:
            f.truncate(len(complete) + 1 if complete else 0)
    lines = complete.split(b"\n") if complete else []
    rows: list[dict[str, Any]] = []
    for n, line in enumerate(lines):
        try:
            obj = json.loads(line)
        except ValueError:
            raise OPDError(f"{path}: line {n + 1} is not valid JSON; delete the file (or pass --overwrite) to "
                           "rebuild the pairs") from None
        if n == 0:
            if not isinstance(obj, dict) or obj.get("soda_pairs") != PAIRS_FORMAT:
                raise OPDError(f"{path}: not a SODA pairs file (its first line is not the header)")
            if fingerprint is not None and obj.get("fingerprint") != _jsonable(fingerprint):
                old = obj.get("fingerprint") or {}
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != _jsonable(fingerprint).get(k))
                raise OPDError(f"{path} was built with different settings ({', '.join(diff)} changed): its pairs do "
                               "not belong to this recipe. Pass --overwrite (or another output_dir) to rebuild them")
            continue
        index = n - 1
        if not isinstance(obj, dict) or obj.get("index") != index or not {"prompt", "chosen", "rejected"} <= set(obj):
            raise OPDError(f"{path}: line {n + 1} is not pair {index}; delete the file (or pass --overwrite) to rebuild")
        if prompts is not None:
            if index >= len(prompts):
                raise OPDError(f"{path} holds more pairs than the {len(prompts)} training prompts; it belongs to "
                               "another data configuration. Pass --overwrite to rebuild it")
            if obj["prompt"] != _jsonable(prompts[index]):
                raise OPDError(f"{path}: pair {index} was built for a different prompt than training prompt {index}; "
                               "the data changed. Pass --overwrite to rebuild the pairs")
        rows.append(obj)
    return rows


def build_pairs(model: Any, tokenizer: Any, dataset: Any, teacher: Any, out_dir: str | os.PathLike, *,
                sampling: Sampling | None = None, seed: int = 0,
                fingerprint: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Build (or finish) ``<out_dir>/soda_pairs.jsonl``; returns the kept pairs and statistics.

    For each training row: the student snapshot (``model``, which must hold the *initial* weights) sampled with
    ``sampling``, and the teacher's response (``teacher.generate(prompts, rows)``). Rows are appended one generation
    batch at a time (one write, flushed and fsynced), so an interrupted run leaves only whole rows; re-running
    keeps them and computes the rest. A row whose responses are identical, or either of them empty, is kept in the
    file with ``dropped`` set and left out of the returned pairs.
    """
    from rich.console import Console
    from rich.progress import Progress

    from opd_plugins.generation import generate_text

    sampling = sampling or Sampling()
    path = Path(out_dir) / PAIRS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    prompts = [dataset[i]["prompt"] for i in range(len(dataset))]
    done = read_pairs(path, prompts, fingerprint)
    resumed = len(done)
    if not path.exists() or path.stat().st_size == 0:
        _append(path, [{"soda_pairs": PAIRS_FORMAT, "fingerprint": _jsonable(fingerprint or {})}])
    n = len(prompts)
    step = sampling.generation_batch_size
    if resumed < n:
        teacher.setup(None)  # connect / load only when there is work left (fails before the first snapshot batch)
    with Progress(console=Console(stderr=True)) as progress:
        bar = progress.add_task("SODA pairs (student snapshot + teacher)", total=n, completed=resumed)
        for start in range(resumed, n, step):
            idx = list(range(start, min(start + step, n)))
            batch_prompts = [prompts[i] for i in idx]
            student = generate_text(model, tokenizer, batch_prompts, max_new_tokens=sampling.max_completion_length,
                                    temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                    batch_size=step, seed=seed)
            chosen = teacher.generate(batch_prompts, [dict(dataset[i]) for i in idx])
            rows = []
            for i, c, r in zip(idx, chosen, student, strict=True):
                c, r = str(c).strip(), str(r).strip()
                reason = ("empty_teacher" if not c else "empty_student" if not r else "identical" if c == r else None)
                rows.append({"index": i, "prompt": _jsonable(prompts[i]), "chosen": c, "rejected": r,
                             "dropped": reason})
            _append(path, rows)
            done += rows
            progress.advance(bar, len(rows))
    kept = [r for r in done if not r.get("dropped")]
    stats = {"path": str(path), "total": n, "kept": len(kept), "resumed": resumed,
             "dropped": {k: sum(r.get("dropped") == k for r in done) for k in DROP_REASONS}}
    return kept, stats


def pairs_dataset(pairs: list[dict[str, Any]]) -> Any:
    """The kept pairs in TRL's preference format: conversational (``chosen``/``rejected`` assistant turns) when the
    prompt is a conversation, plain strings otherwise."""
    from datasets import Dataset

    def turn(text: str, prompt: Any) -> Any:
        return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]

    return Dataset.from_list([{"prompt": p["prompt"], "chosen": turn(p["chosen"], p["prompt"]),
                               "rejected": turn(p["rejected"], p["prompt"])} for p in pairs])


def _append(path: Path, rows: list[dict[str, Any]]) -> None:
    append_durably(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, ensure_ascii=False, default=str))


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def sampling_args(recipe: Recipe) -> Sampling:
    return Sampling.model_validate(recipe.trainer.args)


def pairs_fingerprint(recipe: Any, sampling: Sampling) -> dict[str, Any]:
    """What the pairs depend on (student, teacher, snapshot sampling, seed), recorded in the pairs file's header;
    transport settings (URL, timeouts, concurrency, batch sizes, device) may change between runs."""
    teacher = {k: v for k, v in recipe.teacher.params.items() if k not in _TRANSPORT_PARAMS}
    return {"student": recipe.model.name_or_path, "teacher": {"name": recipe.teacher.name, "params": teacher},
            "sampling": sampling.model_dump(exclude={"generation_batch_size"}), "seed": recipe.seed}


_TRANSPORT_PARAMS = frozenset({"base_url", "api_key_env", "timeout_s", "max_retries", "backoff_s", "concurrency",
                               "device", "batch_size"})


def build_dpo_config(recipe: Recipe) -> Any:
    """TRL's ``DPOConfig`` from ``trainer.args`` (minus the snapshot's sampling keys)."""
    from trl import DPOConfig

    args = rundir.cpu_defaults({k: v for k, v in recipe.trainer.args.items() if k not in SAMPLING_ARGS})
    args.setdefault("logging_steps", 1)
    args.setdefault("report_to", "none")
    try:
        return DPOConfig(output_dir=recipe.output_dir, seed=recipe.seed, **args)
    except (ValueError, TypeError) as exc:
        raise OPDError(f"{recipe.source}: trainer.args: {exc}") from None


def train(recipe: Recipe, pm: Any, *, resume: bool | rundir.Resume = False, overwrite: bool = False,
          argv: list[str] | None = None) -> dict[str, Any]:
    """Run a validated SODA recipe end to end (pairs, DPO, evaluation); returns the summary.

    ``resume`` continues from the last complete checkpoint, or, when pair building was interrupted before any
    checkpoint, keeps the finished pairs and builds the rest.
    """
    from accelerate import PartialState
    from rich.console import Console
    from transformers import set_seed

    from opd_plugins.evaluation import evaluate_accuracy
    from opd_plugins.models import load_causal_lm, load_tokenizer, resolve_model_path
    from opd_plugins.trainers.soda_trainer import SODATrainer

    from opd_plugins.runs.opd import report_complete

    console = Console(stderr=True)
    out = Path(recipe.output_dir)
    # A resume with pairs but no checkpoint was interrupted while building pairs: keep the finished ones.
    start = rundir.start_run(out, recipe, resume=resume, overwrite=overwrite,
                             resumable_without_checkpoint=bool(resume) and (out / PAIRS_FILE).exists())
    if start.complete is not None:
        return report_complete(out, start.complete, recipe, console)
    checkpoint = start.checkpoint
    set_seed(recipe.seed)
    built = recipe.take_components() or {}
    teacher = built.get("teacher") or pm.registry.build("teacher", recipe.teacher)
    sampling = sampling_args(recipe)
    train_ds, eval_ds, task = rundir.build_data(recipe, rundir.teacher_columns(teacher), built.get("task"))
    config = build_dpo_config(recipe)

    rundir.write_run_files(out, recipe, pm, argv, resumed_from=checkpoint)
    state = PartialState()
    path = resolve_model_path(recipe.model.name_or_path)
    tokenizer = load_tokenizer(path, trust_remote_code=recipe.model.trust_remote_code)
    model = load_causal_lm(path, dtype=recipe.model.dtype, trust_remote_code=recipe.model.trust_remote_code,
                           tokenizer=tokenizer).to(state.device)
    e = recipe.evaluation
    do_eval = e.enabled and eval_ds is not None and task is not None

    def evaluate(m: Any, desc: str) -> dict[str, Any]:
        return evaluate_accuracy(m, tokenizer, eval_ds, task, num_prompts=e.num_prompts,
                                 max_new_tokens=e.max_new_tokens or sampling.max_completion_length,
                                 temperature=e.temperature, samples_per_prompt=e.samples_per_prompt,
                                 batch_size=e.batch_size, seed=recipe.seed, desc=desc)

    summary: dict[str, Any] = {"recipe": recipe.source, "output_dir": str(out)}
    fingerprint = pairs_fingerprint(recipe, sampling)
    try:
        if state.is_main_process:
            if do_eval:
                summary["before"] = rundir.cached_before_eval(out, lambda: evaluate(model, "evaluating before training"))
            pairs, stats = build_pairs(model, tokenizer, train_ds, teacher, out, sampling=sampling, seed=recipe.seed,
                                       fingerprint=fingerprint)
            summary["pairs"] = stats
            console.print(f"SODA pairs: {stats['kept']} of {stats['total']} kept (dropped: "
                          + ", ".join(f"{k} {v}" for k, v in stats["dropped"].items()) + f"); {stats['path']}")
        teacher.close()
        state.wait_for_everyone()
        if not state.is_main_process:
            pairs = [r for r in read_pairs(out / PAIRS_FILE) if not r.get("dropped")]
        if not pairs:
            raise OPDError(f"no SODA pairs to train on: every pair in {out / PAIRS_FILE} was dropped (the teacher's "
                           "and the student's responses were identical or empty); check the teacher's output")

        peft_config = rundir.lora_config(recipe)
        ref_model = None
        if peft_config is None:  # a frozen copy of the initial weights (with LoRA, TRL disables the adapter instead)
            ref_model = load_causal_lm(path, dtype=recipe.model.dtype,
                                       trust_remote_code=recipe.model.trust_remote_code, tokenizer=tokenizer)
        trainer = SODATrainer(model=model, ref_model=ref_model, args=config, train_dataset=pairs_dataset(pairs),
                              processing_class=tokenizer, peft_config=peft_config, callbacks=rundir.callbacks(out),
                              plugin_manager=pm, components={"teacher": teacher}, recipe=recipe)
        rundir.use_rich_progress(trainer)
        after = (lambda: evaluate(trainer.accelerator.unwrap_model(trainer.model), "evaluating after training")) \
            if do_eval else None
        rundir.train_and_report(trainer, out, summary, checkpoint, console, after)
    finally:
        teacher.close()
    return summary


class SODAVariant(TrainerVariant):
    """SODA: preference pairs (the text teacher's response chosen, a one-time snapshot of the initial student's
    rejected), then TRL's ``DPOTrainer`` against the initial weights. ``trainer.args`` go to TRL's ``DPOConfig``
    (``beta``, ``loss_type``, ``label_smoothing``, ...), plus the snapshot's sampling keys
    (:class:`~opd_plugins.recipe.preference.Sampling`). Paper: SODA, "Semi On-Policy Black-Box Distillation";
    Rafailov et al., "Direct Preference Optimization", https://arxiv.org/abs/2305.18290.
    """

    name: ClassVar[str] = "soda"
    sections: ClassVar[frozenset[str]] = frozenset({"teacher"})
    lifecycle_hooks: ClassVar[frozenset[str]] = frozenset({"opd_trainer_init", "opd_train_end", "opd_checkpoint_save",
                                                             "opd_checkpoint_load"})
    unused_reason: ClassVar[str] = ("SODA trains with TRL's DPOTrainer on fixed pairs, with no rollouts, rewards or "
                                    "per-token terms")

    def arg_problems(self, args: dict[str, Any]) -> list[Problem]:
        return preference.arg_problems(args)

    def recipe_problems(self, ctx: Any) -> list[Problem]:
        return preference.recipe_problems(ctx)

    def summary(self, recipe: Recipe) -> str:
        return f"{super().summary(recipe)}; trained as preference pairs with TRL's DPOTrainer"

    def train(self, recipe: Recipe, pm: Any, *, resume: bool | rundir.Resume = False, overwrite: bool = False,
              argv: list[str] | None = None) -> dict[str, Any]:
        return train(recipe, pm, resume=resume, overwrite=overwrite, argv=argv)


__all__ = ["PAIRS_FILE", "SODAVariant", "Sampling", "build_dpo_config", "build_pairs", "pairs_dataset", "read_pairs",
           "train"]
