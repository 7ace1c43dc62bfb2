"""SODA: semi on-policy black-box distillation — preference pairs from a text-only teacher, trained with DPO.

Paper: SODA, "Semi On-Policy Black-Box Distillation" (reference/paper_catalog.md §1.9). For each prompt the
teacher's response is *chosen* and a one-time, static snapshot of the base student's own zero-shot response is
*rejected*; the student is then trained with DPO against its initial weights. There are no per-step rollouts and
no discriminator: the only on-policy part is the snapshot.

A recipe whose ``divergence`` is a preference objective (``preference = True``, e.g. ``dpo``) is run here instead
of by the OPD trainer (``opd_plugins.run.train`` dispatches). Steps:

1. :func:`build_pairs`: the initial student's response to every training prompt (sampled once with the recipe's
   ``temperature``/``top_p``/``top_k``/``max_completion_length``) and the text teacher's response
   (``teacher.generate``), appended to ``<output_dir>/soda_pairs.jsonl`` batch by batch. Re-running keeps the
   finished rows and computes the rest; pairs whose two responses are identical or empty are dropped and counted.
2. TRL's ``DPOTrainer`` on the kept pairs (reference = the initial weights: the LoRA adapter disabled, or a frozen
   copy), with ``trainer.args`` going to TRL's ``DPOConfig`` (checked by :func:`trainer_arg_problems` at
   validation) and the objective's params (``beta``, ``loss_type``, ``label_smoothing``) from ``divergence.params``.

The run directory is the OPD one (recipe.yaml, plugins.json, run_info.json, metrics.jsonl, atomically published
``checkpoint-N/``, eval_before.json / eval_summary.json, curves.png, final/) plus ``soda_pairs.jsonl``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from opd_plugins.errors import OPDError

PAIRS_FILE = "soda_pairs.jsonl"
PAIRS_FORMAT = 1
DROP_REASONS = ("identical", "empty_teacher", "empty_student")
OBJECTIVE_ARGS = ("beta", "loss_type", "label_smoothing")
"""DPOConfig fields a preference objective sets from ``divergence.params``; ``trainer.args`` must not set them."""


class Sampling(BaseModel):
    """How the student snapshot is sampled: ``trainer.args`` keys a SODA recipe adds to DPOConfig's own (the same
    names OPD recipes use)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    max_completion_length: int = Field(256, gt=0, description="Most tokens per student response.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of the snapshot (0 = greedy).")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = no top-k truncation.")
    generation_batch_size: int = Field(32, gt=0, description="Prompts per generation batch while building pairs.")


SAMPLING_ARGS = tuple(Sampling.model_fields)


# ---------------------------------------------------------------------------------------------------------------
# Validation (called by the recipe loader; loads nothing heavy)
# ---------------------------------------------------------------------------------------------------------------


def _registered(pm: Any, kind: str, spec: Any) -> type | None:
    if spec is None or spec.name not in pm.registry.names(kind):
        return None
    return pm.registry.get(kind, spec.name)


def is_preference(cls: Any) -> bool:
    """A preference objective (trained on response pairs by this module), not a token-level divergence."""
    return bool(getattr(cls, "preference", False))


def is_text_only(cls: Any) -> bool:
    """A teacher that returns response text and no token scores."""
    from opd_plugins.teachers.base import CAPABILITY_ORDER

    caps = set(getattr(cls, "capabilities", ()))
    return "text" in caps and not caps & set(CAPABILITY_ORDER)


def is_preference_recipe(recipe: Any, pm: Any) -> bool:
    """True when the recipe's divergence is a preference objective (the recipe is trained by :func:`train`)."""
    return is_preference(_registered(pm, "divergence", getattr(recipe, "divergence", None)))


def recipe_problems(recipe: Any, pm: Any) -> list[tuple[str, str]] | None:
    """``(yaml path, message)`` problems of a recipe with a text-only teacher or a preference objective; None when
    it has neither (the token-level rules apply). A text-only teacher needs a preference objective and vice versa;
    the on-policy sections a preference recipe would silently ignore are errors."""
    teacher = _registered(pm, "teacher", recipe.teacher)
    objective = _registered(pm, "divergence", recipe.divergence)
    text_teacher, pref = is_text_only(teacher), is_preference(objective)
    if not (text_teacher or pref):
        return None
    problems: list[tuple[str, str]] = []
    invalid = getattr(recipe, "invalid", set())
    if text_teacher and recipe.divergence is None and "divergence" not in invalid:
        problems.append(("divergence", f"required key is missing: teacher {recipe.teacher.name!r} returns only "
                         "response text (no log-probs), so the recipe needs a preference objective: "
                         "divergence: {name: dpo} (SODA, docs/soda.md)"))
    elif text_teacher and objective is not None and not pref:
        need = objective(objective.Params()).requires() if _default_constructible(objective) else "token"
        problems.append(("divergence.name", f"divergence {recipe.divergence.name!r} is token-level (it needs "
                         f"{need!r} teacher scores), but teacher {recipe.teacher.name!r} returns only response text, "
                         "no log-probs; set divergence.name: dpo (a preference objective: SODA, docs/soda.md) or "
                         "use a teacher that scores tokens (hf_model, openai_server)"))
    if pref and recipe.teacher is None and "teacher" not in invalid:
        problems.append(("teacher", f"required key is missing: divergence {recipe.divergence.name!r} is a preference "
                         "objective trained on (teacher response, student snapshot) pairs, so the recipe needs a "
                         "text teacher: teacher: {name: blackbox_text, params: {source: ...}}"))
    elif pref and teacher is not None and "text" not in getattr(teacher, "capabilities", ()):
        problems.append(("teacher.name", f"teacher {recipe.teacher.name!r} scores tokens "
                         f"({', '.join(sorted(teacher.capabilities))}) but returns no response text, and divergence "
                         f"{recipe.divergence.name!r} is a preference objective trained on the teacher's responses; "
                         "set teacher.name: blackbox_text (e.g. source: local_model with the same checkpoint), or "
                         "choose a token-level divergence such as reverse_kl"))
    if pref:
        unused = []
        if recipe.token_weighting:
            unused.append("token_weighting")
        for slot, default in (("advantage", "grpo"), ("sampler", "none"), ("rollout", "hf_generate")):
            spec = getattr(recipe, slot)
            if spec is not None and spec.name != default:
                unused.append(slot)
        if recipe.correction is not None and recipe.correction.mode != "none":
            unused.append("correction")
        from opd_plugins.recipe.schema import ObjectiveSpec

        if recipe.objective is not None and recipe.objective != ObjectiveSpec():
            unused.append("objective")
        for key in unused:
            problems.append((key, f"not used by the preference objective {recipe.divergence.name!r}: SODA trains with "
                             "TRL's DPOTrainer on fixed pairs, with no rollouts, rewards or per-token terms; remove it"))
    return problems


def _default_constructible(cls: type) -> bool:
    try:
        cls.Params()
    except ValidationError:
        return False
    return True


def dpo_arg_names() -> set[str]:
    """Every TRL ``DPOConfig`` field name, cached per version in the user cache (``validate`` stays fast)."""
    from importlib import metadata

    from opd_plugins.recipe.loader import cached_field_names

    def load() -> type:
        from trl import DPOConfig

        return DPOConfig

    return cached_field_names(f"dpo_args-{metadata.version('trl')}-{metadata.version('transformers')}", load)


def trainer_arg_problems(args: dict[str, Any]) -> list[tuple[str, str]]:
    """``(yaml path, message)`` for each ``trainer.args`` key of a preference recipe that TRL's ``DPOConfig`` does
    not take (the snapshot's sampling keys, :data:`SAMPLING_ARGS`, are SODA's own)."""
    from opd_plugins.recipe.loader import _did_you_mean, trainer_arg_names

    names = dpo_arg_names()
    problems = []
    for key in args:
        path = f"trainer.args.{key}"
        if key in SAMPLING_ARGS:
            continue
        if key == "output_dir":
            problems.append((path, "set the top-level output_dir instead"))
        elif key in OBJECTIVE_ARGS:
            problems.append((path, f"set divergence.params.{key} instead (a parameter of the preference objective)"))
        elif key not in names:
            why = (f"{key} is an on-policy (GRPO/OPD) option, and SODA has no rollouts: pairs are built once"
                   if key in trainer_arg_names() else "unknown trainer argument")
            problems.append((path, f"not an argument of TRL's DPOConfig, which trains this preference recipe "
                             f"(SODA): {why}.{_did_you_mean(key, sorted(names | set(SAMPLING_ARGS)))}"))
    try:
        Sampling.model_validate(args)
    except ValidationError as exc:
        for err in exc.errors():
            problems.append((f"trainer.args.{err['loc'][0]}", f"{err['msg']} [got {err.get('input')!r}]"))
    return problems


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

    from opd_plugins.teachers.blackbox_text import generate_text

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
    if resumed < n and callable(getattr(teacher, "setup", None)):
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
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, ensure_ascii=False, default=str))


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def sampling_args(recipe: Any) -> Sampling:
    return Sampling.model_validate(recipe.trainer.args)


def pairs_fingerprint(recipe: Any, sampling: Sampling) -> dict[str, Any]:
    """What the pairs depend on (student, teacher, snapshot sampling, seed), recorded in the pairs file's header;
    transport settings (URL, timeouts, concurrency, batch sizes, device) may change between runs."""
    teacher = {k: v for k, v in recipe.teacher.params.items() if k not in _TRANSPORT_PARAMS}
    return {"student": recipe.model.name_or_path, "teacher": {"name": recipe.teacher.name, "params": teacher},
            "sampling": sampling.model_dump(exclude={"generation_batch_size"}), "seed": recipe.seed}


_TRANSPORT_PARAMS = frozenset({"base_url", "api_key_env", "timeout_s", "max_retries", "backoff_s", "concurrency",
                               "device", "batch_size"})


def build_dpo_config(recipe: Any, objective: Any) -> Any:
    """TRL's ``DPOConfig`` from ``trainer.args`` (minus the snapshot's sampling keys) and the objective's params."""
    import torch
    from trl import DPOConfig

    args = {k: v for k, v in recipe.trainer.args.items() if k not in SAMPLING_ARGS}
    if not torch.cuda.is_available():
        args.setdefault("use_cpu", True)
        args.setdefault("bf16", False)
    args.setdefault("disable_tqdm", True)
    args.setdefault("logging_steps", 1)
    args.setdefault("report_to", "none")
    args.update(objective.config_kwargs())
    try:
        return DPOConfig(output_dir=recipe.output_dir, seed=recipe.seed, **args)
    except (ValueError, TypeError) as exc:
        raise OPDError(f"{recipe.source}: trainer.args: {exc}") from None


def _sodatrainer_class() -> type:
    """``SODATrainer``, defined on first use: the recipe loader imports this module, and importing TRL takes seconds."""
    from trl import DPOTrainer

    from opd_plugins.trainers.checkpointing import AtomicCheckpointMixin

    class SODATrainer(AtomicCheckpointMixin, DPOTrainer):
        """TRL's ``DPOTrainer`` with the OPD trainer's checkpoint contract: each ``checkpoint-N`` is written into
        ``output_dir/.staging``, marked complete, and published with one atomic rename."""

    return SODATrainer


def train(recipe: Any, pm: Any, *, resume: bool = False, overwrite: bool = False,
          argv: list[str] | None = None) -> dict[str, Any]:
    """Run a validated preference recipe end to end (pairs, DPO, evaluation); returns the summary.

    ``resume`` continues from the last complete checkpoint, or, when pair building was interrupted before any
    checkpoint, keeps the finished pairs and builds the rest.
    """
    from accelerate import PartialState
    from rich.console import Console
    from transformers import set_seed

    from opd_plugins.evaluation import evaluate_accuracy
    from opd_plugins.models import load_causal_lm, load_tokenizer, resolve_model_path
    from opd_plugins.run import (_callbacks, build_data, cached_before_eval, last_complete_checkpoint,
                                 prepare_output_dir, recipe_teacher_columns, train_and_report, write_run_files)

    console = Console(stderr=True)
    out = Path(recipe.output_dir)
    if resume and not overwrite and (out / PAIRS_FILE).exists() and last_complete_checkpoint(out) is None:
        checkpoint = None  # interrupted while building pairs: keep the finished ones, train from the start
    else:
        checkpoint = prepare_output_dir(out, resume=resume, overwrite=overwrite)
    set_seed(recipe.seed)
    objective_cls = pm.registry.get("divergence", recipe.divergence.name)
    objective = objective_cls(objective_cls.Params(**recipe.divergence.params))
    teacher_cls = pm.registry.get("teacher", recipe.teacher.name)
    teacher = teacher_cls(teacher_cls.Params(**recipe.teacher.params))
    if not callable(getattr(teacher, "generate", None)):
        raise OPDError(f"teacher {recipe.teacher.name!r} declares the 'text' capability but has no "
                       "generate(prompts, rows) method")
    sampling = sampling_args(recipe)
    train_ds, eval_ds, task = build_data(recipe, tuple(recipe_teacher_columns(recipe, pm)))
    config = build_dpo_config(recipe, objective)

    write_run_files(out, recipe, pm, argv)
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
                summary["before"] = cached_before_eval(out, lambda: evaluate(model, "evaluating before training"))
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

        peft_config = ref_model = None
        if recipe.model.lora is not None:
            from peft import LoraConfig

            lora = recipe.model.lora
            peft_config = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                                     target_modules=lora.target_modules, task_type="CAUSAL_LM")
        else:  # a frozen copy of the initial weights (with LoRA, TRL disables the adapter instead)
            ref_model = load_causal_lm(path, dtype=recipe.model.dtype,
                                       trust_remote_code=recipe.model.trust_remote_code, tokenizer=tokenizer)
        trainer = _sodatrainer_class()(model=model, ref_model=ref_model, args=config,
                                       train_dataset=pairs_dataset(pairs), processing_class=tokenizer,
                                       peft_config=peft_config, callbacks=_callbacks(out))
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # the rich progress display shows the same numbers
        after = (lambda: evaluate(trainer.accelerator.unwrap_model(trainer.model), "evaluating after training")) \
            if do_eval else None
        train_and_report(trainer, out, summary, checkpoint, console, after)
    finally:
        teacher.close()
    return summary


__all__ = ["PAIRS_FILE", "Sampling", "build_pairs", "read_pairs", "pairs_dataset", "recipe_problems",
           "trainer_arg_problems", "is_preference_recipe", "train"]
