"""The ``opd`` trainer variant: on-policy distillation, self-distillation, GRPO and their hybrids, by ``OPDTrainer``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from opd_plugins import hookspecs
from opd_plugins.errors import OPDError, Problem
from opd_plugins.recipe import rules
from opd_plugins.recipe.schema import Recipe
from opd_plugins.recipe.trainer_args import cached_fields, coerce_values, name_problems, value_problems, versions_key
from opd_plugins.runs import rundir
from opd_plugins.variants import SECTIONS, TrainerVariant

_CONFIG_SOURCE = Path(__file__).resolve().parent.parent / "trainers" / "opd_config.py"


def trainer_arg_fields() -> dict[str, Any]:
    """Every ``OPDConfig`` field (type, choices, default), cached per opd_plugins/TRL/transformers version and
    ``opd_config.py`` content (``validate`` stays fast)."""

    def load() -> type:
        from opd_plugins.trainers.opd_config import OPDConfig

        return OPDConfig

    return cached_fields(f"trainer_args-{versions_key('trl', 'transformers', sources=[_CONFIG_SOURCE])}", load)


def trainer_arg_names() -> set[str]:
    """Every ``OPDConfig`` field name (:func:`trainer_arg_fields`)."""
    return set(trainer_arg_fields())


def build_config(recipe: Recipe, rollout: Any = None) -> Any:
    """``OPDConfig`` from ``trainer.args`` (CPU defaults on a machine without a GPU), plus the arguments the rollout
    backend sets (:meth:`~opd_plugins.rollout.base.RolloutBackend.trainer_args`)."""
    from opd_plugins.trainers.opd_config import OPDConfig

    args = {**rundir.cpu_defaults(coerce_values(recipe.trainer.args, trainer_arg_fields())),
            **(rollout.trainer_args() if rollout is not None else {})}
    try:
        return OPDConfig(output_dir=recipe.output_dir, seed=recipe.seed, **args)
    except (ValueError, TypeError) as exc:
        raise OPDError(f"{recipe.source}: trainer.args: {exc}") from None


def build_trainer(recipe: Recipe, pm: Any, *, train_dataset: Any, task: Any, callbacks: list[Any] | None = None,
                  config: Any = None, components: Any = None) -> Any:
    """The ``OPDTrainer`` of a validated recipe: its model and tokenizer, the recipe's components (those
    validation built, when given), the task's reward."""
    from opd_plugins.models import load_causal_lm, load_tokenizer, resolve_model_path
    from opd_plugins.tasks import make_reward_function
    from opd_plugins.trainers import Components, OPDTrainer

    components = components if components is not None else Components.from_recipe(recipe, pm)
    config = config if config is not None else build_config(recipe, components.rollout)
    path = resolve_model_path(recipe.model.name_or_path)
    tokenizer = load_tokenizer(path, trust_remote_code=recipe.model.trust_remote_code)
    model = load_causal_lm(path, dtype=recipe.model.dtype, trust_remote_code=recipe.model.trust_remote_code)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    reward_funcs = [make_reward_function(task)] if task is not None else []
    trainer = OPDTrainer(model=model, args=config, components=components, reward_funcs=reward_funcs,
                         train_dataset=train_dataset, processing_class=tokenizer, peft_config=rundir.lora_config(recipe),
                         plugin_manager=pm, recipe=recipe, callbacks=callbacks)
    if callbacks:
        rundir.use_rich_progress(trainer)
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


def train(recipe: Recipe, pm: Any, *, resume: bool | rundir.Resume = False, overwrite: bool = False,
          argv: list[str] | None = None) -> dict[str, Any]:
    """Train a validated on-policy recipe end to end; returns the evaluation summary.

    ``resume`` (True, or :class:`~opd_plugins.runs.rundir.Resume`) continues from the last complete checkpoint,
    refusing a recipe that changed what is trained (:func:`~opd_plugins.runs.rundir.start_run`); a run that is
    already complete is reported and left as it is (its summary is returned, with ``complete: True``)."""
    from rich.console import Console
    from transformers import set_seed

    from opd_plugins.trainers import Components

    console = Console(stderr=True)
    out = Path(recipe.output_dir)
    # Everything that can be checked without the model is checked before anything is written.
    start = rundir.start_run(out, recipe, resume=resume, overwrite=overwrite)
    if start.complete is not None:
        return report_complete(out, start.complete, recipe, console)
    checkpoint = start.checkpoint
    set_seed(recipe.seed)
    built = recipe.take_components() or {}
    components = Components.from_recipe(recipe, pm, built=built or None)
    train_ds, eval_ds, task = rundir.build_data(recipe, rundir.teacher_columns(components.teacher), built.get("task"))
    rundir.check_sampler_columns(components.sampler, train_ds)
    config = build_config(recipe, components.rollout)

    rundir.write_run_files(out, recipe, pm, argv, resumed_from=checkpoint)
    trainer = build_trainer(recipe, pm, train_dataset=train_ds, task=task, callbacks=rundir.callbacks(out),
                            config=config, components=components)
    try:
        do_eval = recipe.evaluation.enabled and eval_ds is not None and task is not None
        summary: dict[str, Any] = {"recipe": recipe.source, "output_dir": str(out)}
        if do_eval and trainer.accelerator.is_main_process:
            summary["before"] = rundir.cached_before_eval(
                out, lambda: run_evaluation(trainer, recipe, eval_ds, task, "evaluating before training"))
        after = (lambda: run_evaluation(trainer, recipe, eval_ds, task, "evaluating after training")) if do_eval \
            else None
        rundir.train_and_report(trainer, out, summary, checkpoint, console, after)
    finally:
        trainer.close_components()
    return summary


def report_complete(out: Path, summary: dict[str, Any], recipe: Recipe, console: Any) -> dict[str, Any]:
    """What ``--resume`` of a finished run does: say so, change nothing, return its summary."""
    steps = summary.get("steps")
    console.print(f"output_dir {out}: this run is complete ({steps} steps trained, final/ written); nothing to "
                  f"do. To train further, raise trainer.args.max_steps above {steps} "
                  f"(e.g. trainer.args.max_steps={2 * steps if isinstance(steps, int) else 'N'}) and --resume "
                  "again, or train into another output_dir", soft_wrap=True, markup=False, highlight=False)
    return {**summary, "complete": True}


class OPDVariant(TrainerVariant):
    """On-policy training by ``OPDTrainer`` (a TRL ``GRPOTrainer``): rollouts, rewards, teacher scores and
    ``loss = w_pg(t)·PG + w_div(t)·D``. Pure OPD, OPD as RL, OPSD, GRPO and KDRL-style hybrids are recipes of it.
    ``trainer.args`` go to :class:`~opd_plugins.trainers.OPDConfig` (every ``GRPOConfig`` option).
    """

    name: ClassVar[str] = "opd"
    sections: ClassVar[frozenset[str]] = frozenset(SECTIONS)
    lifecycle_hooks: ClassVar[frozenset[str]] = frozenset(hookspecs.LIFECYCLE_HOOKS)

    def arg_problems(self, args: dict[str, Any]) -> list[Problem]:
        fields = trainer_arg_fields()
        return name_problems(args, set(fields)) + value_problems(args, fields)

    def recipe_problems(self, ctx: Any) -> list[Problem]:
        return [p for rule in rules.ON_POLICY_RULES for p in rule(ctx)]

    def train(self, recipe: Recipe, pm: Any, *, resume: bool | rundir.Resume = False, overwrite: bool = False,
              argv: list[str] | None = None) -> dict[str, Any]:
        return train(recipe, pm, resume=resume, overwrite=overwrite, argv=argv)


__all__ = ["OPDVariant", "build_config", "build_trainer", "report_complete", "run_evaluation", "train", "trainer_arg_fields",
           "trainer_arg_names"]
