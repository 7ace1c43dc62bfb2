"""Recipe rules: one function per concern, each ``(ctx) -> list[Problem]``; they load nothing heavy.

The loader runs the generic rules (:data:`GENERIC_RULES`: the trainer variant, the component slots, the model,
the data, the trainer arguments, the plugins' hooks) and then the chosen variant's own
(:meth:`~opd_plugins.variants.TrainerVariant.recipe_problems`); the on-policy variant uses :data:`ON_POLICY_RULES`.
Components are built here, once, through the registry (nested specs included) and kept in ``ctx.built`` for the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from opd_plugins.components import ComponentSpec
from opd_plugins.diagnostics import DiagnosticsSpec, hybrid_problem
from opd_plugins.errors import Problem, pydantic_problems
from opd_plugins.recipe.launch import Launch, engine_arg_problems, engine_component_problems
from opd_plugins.recipe.references import check_model_reference
from opd_plugins.recipe.schema import SLOT_KINDS, DatasetSource, ObjectiveSpec
from opd_plugins.variants import TrainerVariant

OBJECTIVE_TERMS: dict[str, str] = {"policy_gradient": "pg_weight", "divergence": "div_weight",
                                   "divergence_reward": "div_reward_weight"}
"""Objective terms and the key their schedule is built under (``Components`` field names)."""

TOKEN_CAPABILITIES: tuple[str, ...] = ("sampled", "topk", "full")
"""Teacher capabilities that give token scores (weakest first); ``text`` gives none."""

GPU_TRAINER_ARGS: tuple[str, ...] = ("bf16", "fp16", "tf32", "use_vllm")


@dataclass
class RecipeContext:
    """What the rules see: the recipe's sections (None where a section is itself invalid, named in ``invalid``),
    the registry, the chosen variant, the recipe's own plugin modules, and the components built so far."""

    sections: Any
    registry: Any
    variant: TrainerVariant | None = None
    recipe_plugins: list[tuple[int, Any]] = field(default_factory=list)
    built: dict[str, Any] = field(default_factory=dict)
    device_check: bool = True
    launch: Launch | None = None  # the distributed launch to check against (train: this process's); None: not checked

    @property
    def invalid(self) -> set[str]:
        return self.sections.invalid

    @property
    def args(self) -> dict[str, Any]:
        trainer = self.sections.trainer
        return trainer.args if trainer is not None else {}

    def uses(self, section: str) -> bool:
        return self.variant is not None and section in self.variant.sections


# ---------------------------------------------------------------------------------------------------------------
# Generic rules
# ---------------------------------------------------------------------------------------------------------------


def trainer_rule(ctx: RecipeContext) -> list[Problem]:
    """``trainer.name`` names a registered trainer variant."""
    trainer = ctx.sections.trainer
    if trainer is None:
        return []
    variant, problems = ctx.registry.resolve("trainer", ComponentSpec(name=trainer.name), "trainer")
    ctx.variant = variant
    return problems


def slot_rule(ctx: RecipeContext) -> list[Problem]:
    """Every component slot the variant uses is built (with its nested specs); a slot it does not use must not be
    set."""
    problems: list[Problem] = []
    s = ctx.sections
    for slot, kind in SLOT_KINDS.items():
        spec = getattr(s, slot)
        if spec is None or slot in ctx.invalid:
            continue
        if not ctx.uses(slot):
            if ctx.variant is not None and _is_set(slot, spec):
                problems.append(_unused(ctx, slot))
            continue
        component, p = ctx.registry.resolve(kind, spec, slot)
        problems += p
        if component is not None:
            ctx.built[slot] = component
    if s.token_weighting and not ctx.uses("token_weighting"):
        problems.append(_unused(ctx, "token_weighting"))
    elif s.token_weighting:
        weightings = []
        for i, spec in enumerate(s.token_weighting):
            component, p = ctx.registry.resolve("token_weighting", spec, f"token_weighting[{i}]")
            problems += p
            weightings.append(component)
        if all(w is not None for w in weightings):
            ctx.built["token_weighting"] = weightings
    if s.objective is not None and not ctx.uses("objective"):
        if s.objective != ObjectiveSpec():
            problems.append(_unused(ctx, "objective"))
    elif s.objective is not None:
        for term, key in OBJECTIVE_TERMS.items():
            component, p = ctx.registry.resolve("schedule", getattr(s.objective, term), f"objective.{term}")
            problems += p
            if component is not None:
                ctx.built[key] = component
    if s.correction is not None and s.correction.mode != "none" and not ctx.uses("correction"):
        problems.append(_unused(ctx, "correction"))
    if s.diagnostics is not None and s.diagnostics != DiagnosticsSpec() and not ctx.uses("diagnostics"):
        problems.append(_unused(ctx, "diagnostics"))
    return problems


_DEFAULT_SLOTS = {"advantage": "grpo", "sampler": "none", "prompt_selection": "uniform", "rollout": "hf_generate"}


def _is_set(slot: str, spec: ComponentSpec) -> bool:
    return not (slot in _DEFAULT_SLOTS and spec.name == _DEFAULT_SLOTS[slot] and not spec.params)


def _unused(ctx: RecipeContext, slot: str) -> Problem:
    v = ctx.variant
    return Problem(slot, f"not used by trainer {v.name!r}: {v.unused_reason}; remove it")


def model_rule(ctx: RecipeContext) -> list[Problem]:
    model = ctx.sections.model
    msg = check_model_reference(model.name_or_path) if model is not None else None
    return [Problem("model.name_or_path", msg)] if msg else []


def data_rule(ctx: RecipeContext) -> list[Problem]:
    """The task (a registered component of kind ``task``) and the dataset sources."""
    data = ctx.sections.data
    if data is None:
        return []
    problems: list[Problem] = []
    if data.task is not None:
        task, p = ctx.registry.resolve("task", data.task, "data.task")
        problems += p
        if task is not None:
            ctx.built["task"] = task
    for key in ("dataset", "eval_dataset"):
        src = getattr(data, key)
        if src is not None:
            try:
                DatasetSource.model_validate(src)
            except ValidationError as exc:
                problems += pydantic_problems(exc, DatasetSource, f"data.{key}")
    return problems


def args_rule(ctx: RecipeContext) -> list[Problem]:
    if ctx.variant is None or ctx.sections.trainer is None:
        return []
    return ctx.variant.arg_problems(ctx.args)


def hooks_rule(ctx: RecipeContext) -> list[Problem]:
    """A recipe's own plugin may not implement a lifecycle hook the chosen trainer never calls (it would be inert)."""
    if ctx.variant is None:
        return []
    from opd_plugins import hookspecs

    lifecycle = set(hookspecs.LIFECYCLE_HOOKS)
    problems = []
    for i, module in ctx.recipe_plugins:
        implemented = set()
        for attr in dir(module):
            opts = getattr(getattr(module, attr, None), "opd_impl", None)
            if isinstance(opts, dict):
                implemented.add(opts.get("specname") or attr)
        names = sorted(n for n in implemented if n in lifecycle and n not in ctx.variant.lifecycle_hooks)
        if names:
            calls = ", ".join(sorted(ctx.variant.lifecycle_hooks)) or "none"
            problems.append(Problem(f"plugins[{i}]", (
                f"plugin {module.__name__!r} implements {', '.join(names)}, which trainer {ctx.variant.name!r} never "
                f"calls (it calls: {calls}); the hook would do nothing. Remove the plugin from this recipe or choose "
                "a trainer that calls it (trainer.name: opd calls every hook)")))
    return problems


def launch_rule(ctx: RecipeContext) -> list[Problem]:
    """``trainer.args`` engine settings and components that contradict the launch (accelerate's engine)."""
    if ctx.launch is None:
        return []
    model = ctx.sections.model
    lora = model is not None and getattr(model, "lora", None) is not None
    return engine_arg_problems(ctx.args, ctx.launch) + engine_component_problems(ctx.built, ctx.launch, lora=lora)


def device_rule(ctx: RecipeContext) -> list[Problem]:
    return device_problems(ctx.sections, ctx.built) if ctx.device_check else []


def device_problems(recipe: Any, built: dict[str, Any] | None = None) -> list[Problem]:
    """GPU-only options in a recipe (trainer arguments, and the settings each built component declares through
    ``gpu_problems()``), when this machine has no GPU."""
    import torch

    if torch.cuda.is_available():
        return []
    trainer = getattr(recipe, "trainer", None)
    args = trainer.args if trainer is not None else {}
    problems = [Problem(f"trainer.args.{key}", f"{key}: true needs a GPU and none is available here; set it to false "
                        "on CPU") for key in GPU_TRAINER_ARGS if args.get(key)]
    built = built if built is not None else dict(getattr(recipe, "components", None) or {})
    for slot, component in built.items():
        for sub in component if isinstance(component, list) else [component]:
            for path, msg in sub.gpu_problems():
                problems.append(Problem(f"{slot}.params.{path}", msg))
    return problems


def peer_rule(ctx: RecipeContext) -> list[Problem]:
    """Each built component's :meth:`~opd_plugins.components.Component.peer_problems` with the others."""
    problems = []
    for slot, component in ctx.built.items():
        for i, sub in enumerate(component if isinstance(component, list) else [component]):
            where = f"{slot}[{i}]" if isinstance(component, list) else slot
            for path, msg in sub.peer_problems(ctx.built):
                problems.append(Problem(f"{where}.params.{path}" if path else where, msg))
    return problems


def rollout_args_rule(ctx: RecipeContext) -> list[Problem]:
    """Trainer arguments the rollout backend sets must not contradict ``trainer.args``."""
    rollout = ctx.built.get("rollout")
    if rollout is None:
        return []
    return [Problem(f"trainer.args.{key}", f"rollout {rollout.name!r} sets {key}: {value!r}, but trainer.args sets "
                    f"{ctx.args[key]!r}; remove it from trainer.args (the rollout backend's params decide it)")
            for key, value in rollout.trainer_args().items() if key in ctx.args and ctx.args[key] != value]


GENERIC_RULES = (trainer_rule, slot_rule, model_rule, data_rule, args_rule, hooks_rule, peer_rule)


# ---------------------------------------------------------------------------------------------------------------
# On-policy rules (the `opd` trainer: rollouts, rewards, teacher scores, loss terms)
# ---------------------------------------------------------------------------------------------------------------


def _ever_nonzero(schedule: Any) -> bool:
    return any(abs(schedule.value(s, 100)) > 0 for s in range(0, 101, 5))


def teacher_needed_rule(ctx: RecipeContext) -> list[Problem]:
    """A non-zero divergence term needs a teacher and a divergence; so does a teacher-guided estimator."""
    b, s = ctx.built, ctx.sections
    uses_div = any(key in b and _ever_nonzero(b[key]) for key in ("div_weight", "div_reward_weight"))
    problems = []
    why = "objective.divergence or objective.divergence_reward is non-zero, so the recipe needs"
    if uses_div and s.teacher is None and "teacher" not in ctx.invalid:
        problems.append(Problem("teacher", f"required key is missing: {why} a teacher"))
    if uses_div and s.divergence is None and "divergence" not in ctx.invalid:
        problems.append(Problem("divergence", f"required key is missing: {why} a divergence"))
    adv = b.get("advantage")
    if adv is not None and adv.needs_token_reward and (s.teacher is None or s.divergence is None):
        problems.append(Problem("advantage", f"{s.advantage.name} turns teacher guidance into advantages: the "
                                "recipe needs a teacher and a divergence"))
    return problems


def capability_rule(ctx: RecipeContext) -> list[Problem]:
    """The teacher gives the scores the divergence needs (token scores at all, for a text-only teacher)."""
    teacher, divergence = ctx.built.get("teacher"), ctx.built.get("divergence")
    if teacher is None:
        return []
    caps = set(teacher.capabilities)
    name = ctx.sections.teacher.name
    if not caps & set(TOKEN_CAPABILITIES):
        return [Problem("teacher.name", (
            f"teacher {name!r} returns only response text, no token log-probs, which the on-policy trainer "
            "needs; train it with SODA (trainer.name: soda, docs/soda.md), or use a teacher that scores tokens "
            "(hf_model, openai_server)"))]
    if divergence is None:
        return []
    need = divergence.requires()
    if need not in caps:
        have = sorted(caps & set(TOKEN_CAPABILITIES))
        return [Problem("divergence", (
            f"{ctx.sections.divergence.name} needs {need!r} teacher scores, but teacher {name!r} provides only "
            f"{', '.join(have)}; choose a divergence that works from {' or '.join(have)} (e.g. estimator: sampled) "
            f"or a teacher that gives {need!r}"))]
    return []


def reward_rule(ctx: RecipeContext) -> list[Problem]:
    """Token weightings that gate on task rewards need a task."""
    data = ctx.sections.data
    if data is None or data.task is not None:
        return []
    return [Problem(f"token_weighting[{i}]", f"{tw.name} gates on task rewards, but the recipe has no reward: add "
                    "data.task (a verifiable task that scores completions)")
            for i, tw in enumerate(ctx.built.get("token_weighting", [])) if tw.requires_rewards()]


def batch_rule(ctx: RecipeContext) -> list[Problem]:
    """``num_generations`` divides the generation batch and suits the advantage estimator."""
    args = ctx.args
    num_gen = args.get("num_generations", 8)
    per_device = args.get("per_device_train_batch_size", 8)
    ga = args.get("gradient_accumulation_steps", 1)
    spg = args.get("steps_per_generation") or ga
    world = ctx.launch.world_size if ctx.launch is not None else 1
    gen_batch = args.get("generation_batch_size") or (per_device * world * spg if isinstance(per_device, int) and
                                                      isinstance(spg, int) else None)
    problems = []
    if isinstance(num_gen, int) and isinstance(gen_batch, int) and num_gen > 0 and gen_batch % num_gen:
        processes = f" × {world} processes ({ctx.launch.source})" if world > 1 else ""
        problems.append(Problem("trainer.args.num_generations", (
            f"num_generations={num_gen} does not divide the generation batch of {gen_batch} completions "
            f"(per_device_train_batch_size={per_device}{processes} × steps_per_generation={spg}); set "
            f"num_generations to a divisor of {gen_batch} or change the batch size"
            f"{' or the number of processes' if world > 1 else ''}")))
    global_batch = per_device * world if isinstance(per_device, int) else None
    if args.get("generation_batch_size") and isinstance(global_batch, int) and global_batch > 0 \
            and args["generation_batch_size"] % global_batch:
        problems.append(Problem("trainer.args.generation_batch_size", (
            f"generation_batch_size={args['generation_batch_size']} is not a multiple of the global batch "
            f"{global_batch} (per_device_train_batch_size={per_device} × {world} process(es)); set it to a multiple "
            "or set steps_per_generation instead")))
    adv = ctx.built.get("advantage")
    if adv is not None and isinstance(num_gen, int):
        if num_gen < adv.min_generations:
            problems.append(Problem("trainer.args.num_generations", (
                f"advantage {adv.name!r} needs groups of at least {adv.min_generations} completions per prompt, "
                f"got num_generations={num_gen}")))
        message = adv.num_generations_problem(num_gen)
        if message:
            problems.append(Problem("trainer.args.num_generations", message))
    return problems


def pg_terms_rule(ctx: RecipeContext) -> list[Problem]:
    """TRL's KL-to-reference (``beta``) and entropy bonus live inside its policy-gradient loss, which the trainer
    skips while ``objective.policy_gradient`` is 0: refuse them together rather than drop them silently."""
    pg = ctx.built.get("pg_weight")
    if pg is None or not any(abs(pg.value(s, 100)) == 0 for s in range(0, 101, 5)):
        return []
    args, problems = ctx.args, []
    why = ("lives in TRL's policy-gradient loss, which is not computed while objective.policy_gradient is 0, so it "
           "would silently be dropped")
    beta = args.get("beta", 0.0)
    if isinstance(beta, (int, float)) and beta != 0:
        problems.append(Problem("trainer.args.beta", f"beta={beta}: the KL to the reference model {why}; set "
                                "beta: 0, or keep a non-zero policy_gradient weight (e.g. a small constant)"))
    entropy = args.get("entropy_coef", 0.0)
    if (isinstance(entropy, (int, float)) and entropy != 0) or args.get("use_adaptive_entropy"):
        problems.append(Problem("trainer.args.entropy_coef", f"the entropy bonus {why}; remove it, or keep a "
                                "non-zero policy_gradient weight"))
    return problems


def truncation_rule(ctx: RecipeContext) -> list[Problem]:
    """``truncated_completions: mask_reward`` keeps cut completions in the divergence terms, TRL's
    ``mask_truncated_completions`` removes them from every term: the two contradict each other."""
    if ctx.args.get("truncated_completions") == "mask_reward" and ctx.args.get("mask_truncated_completions") is True:
        return [Problem("trainer.args.truncated_completions", "mask_reward keeps truncated completions in the "
                        "divergence terms and masks only their task reward, while mask_truncated_completions: true "
                        "removes them from every loss term; choose one")]
    return []


def sampler_rule(ctx: RecipeContext) -> list[Problem]:
    """A ``swap`` sampler needs the hinted generation's behaviour log-probs: from the rollout backend, or from the
    trainer's own forward when the backend samples the policy itself."""
    sampler, rollout = ctx.built.get("sampler"), ctx.built.get("rollout")
    problems = []
    limit = getattr(getattr(sampler, "params", None), "max_prefix_tokens", None)
    total = ctx.args.get("max_completion_length", 256)
    if isinstance(limit, int) and isinstance(total, int) and limit >= total:
        problems.append(Problem("sampler.params.max_prefix_tokens", f"{limit} leaves no room in "
                                f"trainer.args.max_completion_length={total} for the policy to continue the forced "
                                f"prefix; set it below {total}"))
    if sampler is None or rollout is None or "swap" not in getattr(sampler, "roles", ()):
        return problems
    if getattr(rollout, "samples_policy", False) or getattr(rollout, "reports_behaviour_logps", False):
        return problems
    return problems + [Problem("sampler.name", f"sampler {sampler.name!r} swaps prompts (trains on the original prompt what was "
                    f"generated with a hint), which needs the hinted generation's behaviour log-probs, but rollout "
                    f"{rollout.name!r} reports none and does not sample the training policy itself; use a rollout "
                    "that reports them (hf_generate, perturbed_hf, vllm, fp8)")]


def async_rollout_rule(ctx: RecipeContext) -> list[Problem]:
    """A backend that generates ahead samples from its own copy of the policy in a background thread, before any
    sampler could guide the batch."""
    rollout, sampler = ctx.built.get("rollout"), ctx.built.get("sampler")
    if rollout is None or not getattr(rollout, "generates_ahead", False):
        return []
    problems = []
    inner = getattr(rollout, "nested", {}).get("backend")
    if inner is not None and (getattr(inner, "samples_policy", False) or inner.name in ("vllm", "replay")
                              or getattr(getattr(inner, "params", None), "flow", None) == "unified"):
        problems.append(Problem("rollout.params.backend", f"rollout {rollout.name!r} generates in a background thread "
                                f"from a private copy of the policy, but backend {inner.name!r} samples the live "
                                "model (or serves it elsewhere); use perturbed_hf (noise_std: 0 is an exact copy) or "
                                "fp8 with flow: rollout_only"))
    if sampler is not None and sampler.name != "none":
        problems.append(Problem("sampler.name", f"rollout {rollout.name!r} generates the next batches before sampler "
                                f"{sampler.name!r} could guide them; use one or the other"))
    return problems


def reward_to_go_rule(ctx: RecipeContext) -> list[Problem]:
    """``objective.divergence_reward_to_go`` transforms the divergence reward: with that reward's weight 0 at every
    step (or no divergence) it would do nothing."""
    objective = ctx.sections.objective
    if objective is None or not objective.divergence_reward_to_go:
        return []
    weight = ctx.built.get("div_reward_weight")
    if ctx.built.get("divergence") is None and ctx.sections.divergence is None:
        return [Problem("objective.divergence_reward_to_go", "is true but the recipe has no divergence, whose "
                        "per-token reward it would sum; set a divergence or remove it")]
    if weight is not None and all(weight.value(s, 100) == 0 for s in range(0, 101, 5)):
        return [Problem("objective.divergence_reward_to_go", "is true but objective.divergence_reward is 0 at every "
                        "step, so no divergence reward reaches the advantages; set divergence_reward (e.g. 1.0), or "
                        "use teacher_dense {reward_to_go: true}")]
    return []


def diagnostics_rule(ctx: RecipeContext) -> list[Problem]:
    """``diagnostics.every > 0`` (the gradient cosine of the divergence and policy-gradient terms) needs both terms:
    a divergence, and objective weights that are both non-zero at some step."""
    spec = ctx.sections.diagnostics
    if spec is None or spec.every == 0:
        return []
    if ctx.sections.divergence is None:
        return [Problem("diagnostics.every", f"{spec.every}: the gradient cosine compares the divergence term's "
                        "gradient with the policy-gradient term's, but the recipe has no divergence; set a divergence "
                        "and objective.divergence, or diagnostics.every: 0")]
    pg, div = ctx.built.get("pg_weight"), ctx.built.get("div_weight")
    problem = hybrid_problem(pg, div) if pg is not None and div is not None else None
    return [Problem("diagnostics.every", f"{spec.every}: {problem}")] if problem else []


ON_POLICY_RULES = (teacher_needed_rule, capability_rule, reward_rule, batch_rule, rollout_args_rule, pg_terms_rule,
                   truncation_rule, reward_to_go_rule, sampler_rule, async_rollout_rule, diagnostics_rule)


__all__ = ["GENERIC_RULES", "ON_POLICY_RULES", "RecipeContext", "device_problems", "launch_rule"]
