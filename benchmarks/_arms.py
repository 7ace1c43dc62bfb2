"""The arms harness of ``benchmarks/efficiency.py`` and ``benchmarks/samplers.py``: recipes trained to the same budget
of student-generated tokens and evaluated at fixed token checkpoints.

An *arm* is a recipe: a base recipe file plus dotted overrides, exactly as on the command line
(``opd-plugins train <base> <overrides>``). Every arm trains through the project's own path (``validate_recipe``,
``Components.from_recipe``, :func:`~opd_plugins.runs.opd.build_trainer`) with :class:`StudentTokens` registered as
a plugin for the run:

* ``opd_rollout_end`` counts the completion tokens the student generated in each training generation batch: every
  token kept in the completions, less the forced prefix tokens a sampler put in front (which the student did not
  generate; a continuation cut at ``max_completion_length`` after such a prefix counts with its kept part);
* ``opd_rewards_scored`` counts the groups whose G rewards are not all equal (non-degenerate groups);
* ``opd_advantages_computed`` records what of the batch carries a policy-gradient signal into the loss
  (:func:`loss_signal`): the completions cut at the length cap, those left in the loss, those of them with a
  non-zero advantage, and those completions' share of the loss's tokens (the ``dapo`` loss divides by every loss
  token, so completions with a zero advantage dilute the others' gradient);
* a ``TrainerCallback`` stops training at the end of the optimizer step whose generation batch reached the budget,
  so an arm uses ``budget <= tokens < budget + one generation batch's maximum`` (rows x ``max_completion_length``).

The held-out greedy accuracy (the task's prompt only: no privileged context, no sampler;
:func:`~opd_plugins.runs.opd.run_evaluation`) is measured at the end of the first optimizer step at or past each
checkpoint ``k * budget / evals`` (k = 1..evals), at the tokens actually used then. The point at 0 tokens is measured
once and shared by every arm and seed: all arms start from the same weights (a fresh LoRA adapter is the identity)
and the evaluation is greedy. The learning rate is constant in the base recipes and ``max_steps`` is only a cap
that the budget always reaches first (every completion has at least one generated token), so where an arm stops
changes nothing before it. Seeds 0..N-1 set ``seed`` (sampling, LoRA init, data order); the data (``data.seed``)
and the held-out set are the same for every arm and seed. Single process only (the counts are this process's).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, if opd_plugins is not installed

from opd_plugins import hookimpl  # noqa: E402
from opd_plugins.paths import atomic_write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE_RECIPE = ROOT / "recipes" / "cpu" / "grpo_smollm2_sub.yaml"

QUICK_TRAINER = ("trainer.args.per_device_train_batch_size=4", "trainer.args.num_generations=2",
                 "trainer.args.max_completion_length=8", "evaluation.max_new_tokens=8", "evaluation.batch_size=8")
"""Overrides of ``--quick`` (with a tiny model): small generation batches, short completions."""


@dataclass(frozen=True)
class Arm:
    """One arm: a name, the dotted overrides that make it from the base recipe, and what it is."""

    name: str
    overrides: tuple[str, ...] = ()
    about: str = ""


@dataclass(frozen=True)
class Plan:
    """What every arm gets: the token budget, the evaluations along it, the seeds, and overrides for all arms."""

    budget: int
    evals: int = 4
    seeds: int = 1
    common: tuple[str, ...] = ()
    zero_cut_advantage: bool = False  # register ZeroCutAdvantage for every arm (a counterfactual)

    def targets(self) -> list[int]:
        """The token checkpoints evaluated after training starts: k * budget / evals, k = 1..evals."""
        return [math.ceil(self.budget * k / self.evals) for k in range(1, self.evals + 1)]


def log(bench: str, message: str) -> None:
    """A progress line on stderr."""
    print(f"[{bench}] {message}", file=sys.stderr, flush=True)


SIGNAL_KEYS = ("cut_share", "in_loss_share", "signal_share", "signal_token_share", "signal_group_share")
"""The fields of :func:`loss_signal`, recorded per generation batch and averaged per run."""
RULES = ("keep", "mask_truncated", "mask_reward")
"""The three treatments of a completion cut at the length cap that :func:`rule_signal` compares on one batch:
``keep`` (scored and trained on as any other), ``mask_truncated`` (TRL's ``mask_truncated_completions``: scored,
so in its group's baseline, then out of the loss) and ``mask_reward`` (``truncated_completions: mask_reward``:
unscored, so out of the baseline, and in the loss with no task-reward advantage)."""
RULE_KEYS = tuple(f"if_{rule}_{field}" for rule in RULES for field in ("signal_share", "signal_token_share"))
"""The fields of :func:`rule_signal`."""


def cut_rows(completion_ids: Any, stop_ids: Sequence[int | None]) -> Any:
    """``(N,)`` bool: the completions cut at the length cap, TRL's rule read from the ids alone (no EOS or pad token
    anywhere in the row), so that it holds whether or not the cut rows were masked out of the loss."""
    import torch

    stops = torch.tensor(sorted({i for i in stop_ids if i is not None}), dtype=completion_ids.dtype,
                         device=completion_ids.device)
    return ~torch.isin(completion_ids, stops).any(dim=1)


def loss_signal(completion_ids: Any, mask: Any, advantages: Any, stop_ids: Sequence[int | None],
                num_generations: int) -> dict[str, float]:
    """What of one generation batch reaches the loss with a policy-gradient signal, as shares of its completions:

    * ``cut_share``: completions cut at the length cap (:func:`cut_rows`);
    * ``in_loss_share``: completions with at least one token in the loss mask;
    * ``signal_share``: completions in the loss with a non-zero advantage (any token, for per-token advantages);
    * ``signal_token_share``: those completions' loss tokens over all loss tokens (0.0 when no token is in the
      loss): with the ``dapo`` loss, the share of the normalising token count that carries a gradient;
    * ``signal_group_share``: groups of ``num_generations`` with at least one such completion.
    """
    import torch

    cut = cut_rows(completion_ids, stop_ids)
    tokens = mask.float().sum(dim=1)
    in_loss = tokens > 0
    adv = advantages.detach().float()
    nonzero = (adv.abs() > 0) if adv.dim() == 1 else ((adv.abs() * mask.float()) > 0).any(dim=1)
    signal = in_loss & nonzero
    rows = completion_ids.shape[0]
    groups = signal.view(-1, num_generations).any(dim=1) if rows % num_generations == 0 else signal[:0]
    total = float(tokens.sum())
    return {"cut_share": float(cut.float().mean()), "in_loss_share": float(in_loss.float().mean()),
            "signal_share": float(signal.float().mean()),
            "signal_token_share": float(tokens[signal].sum()) / total if total else 0.0,
            "signal_group_share": float(groups.float().mean()) if groups.numel() else float("nan")}


def rule_signal(rewards: Any, cut: Any, lengths: Any, num_generations: int) -> dict[str, float]:
    """On one batch of rollouts, what each of :data:`RULES` would give a group-relative (GRPO) advantage: the share
    of completions in the loss with a non-zero advantage (``if_<rule>_signal_share``) and their share of the loss's
    tokens (``if_<rule>_signal_token_share``, the ``dapo`` normaliser's share that carries a gradient). The same
    rollouts under every rule, so the rules' difference is not one of trajectories. ``rewards``: ``(N,)`` task
    rewards as scored (NaN: unscored), ``cut``: ``(N,)`` bool, ``lengths``: ``(N,)`` completion tokens. A
    completion's advantage is non-zero when its reward differs from the mean of its group's scored rewards by more
    than 1e-6 (GRPO's scaling by the group's standard deviation does not change which are zero)."""
    import torch

    r = rewards.detach().float().view(-1, num_generations)
    cut = cut.view(-1, num_generations).to(r.device)
    n = lengths.detach().float().view(-1, num_generations).to(r.device)
    out = {}
    for rule in RULES:
        scored = r.masked_fill(cut, float("nan")) if rule == "mask_reward" else r
        valid = ~scored.isnan()
        mean = torch.where(valid, scored, 0.0).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)
        signal = valid & ((scored - mean).abs() > 1e-6)
        in_loss = ~cut if rule == "mask_truncated" else torch.ones_like(cut)
        signal = signal & in_loss
        tokens = float((n * in_loss).sum())
        out[f"if_{rule}_signal_share"] = float(signal.float().mean())
        out[f"if_{rule}_signal_token_share"] = float((n * signal).sum()) / tokens if tokens else 0.0
    return out


class StudentTokens:
    """Hook implementations counting, over the training generation batches of one run, the completion tokens the
    student generated (forced prefix tokens left out), the rollouts a sampler guided, the non-degenerate groups,
    and per generation batch (``per_batch``) the tokens so far, the share of non-degenerate groups, the mean
    training reward (hinted rollouts included), the batch's :func:`loss_signal` and, for a run with task rewards,
    its :func:`rule_signal` (what each treatment of cut completions would make of the same rollouts)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.batches = 0
        self.rollouts = 0
        self.guided = 0
        self.groups = 0
        self.non_degenerate = 0
        self.per_batch: list[dict[str, float]] = []  # one record per generation batch, the curves of a run
        self._rewards: Any = None  # this generation batch's task rewards as scored, for rule_signal

    @hookimpl
    def opd_rollout_end(self, trainer: Any, rollout: dict[str, Any]) -> None:
        if not trainer.model.training:
            return
        ids = rollout["completion_ids"]
        guided = trainer.step.guided  # this generation batch's sampler plan (forced prefixes), None without one
        prefixes = guided.prefix_ids if guided is not None else [[] for _ in ids]
        self.tokens += sum(len(c) - min(len(p), len(c)) for c, p in zip(ids, prefixes, strict=True))
        self.batches += 1
        self.rollouts += len(ids)
        if guided is not None:
            self.guided += sum(role != "none" for role in guided.roles)

    @hookimpl
    def opd_rewards_scored(self, trainer: Any, rewards_per_func: Any, reward_names: list[str]) -> None:
        if not trainer.model.training:
            return
        from opd_plugins.advantages.base import degenerate_groups

        weights = trainer.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        rewards[rewards_per_func.isnan().all(dim=1)] = float("nan")  # unscored, as the trainer's rewards
        groups = rewards.numel() // trainer.num_generations
        non_degenerate = groups - len(degenerate_groups(rewards, trainer.num_generations))
        self.groups += groups
        self.non_degenerate += non_degenerate
        scored = rewards[~rewards.isnan()]
        self._record().update(non_degenerate_share=non_degenerate / max(groups, 1),
                              reward=float(scored.mean()) if scored.numel() else float("nan"))
        self._rewards = (self.batches, rewards.detach().cpu())

    @hookimpl
    def opd_advantages_computed(self, trainer: Any, batch: dict[str, Any], advantages: Any) -> None:
        if not trainer.model.training:
            return
        import torch

        from opd_plugins.trainers.student import loss_mask

        ids, pad = batch["completion_ids"], trainer._tokenizer.pad_token_id
        record = self._record()
        record.update(loss_signal(ids, loss_mask(batch), advantages, [*trainer.eos_token_ids, pad],
                                  trainer.num_generations))
        if self._rewards is not None and self._rewards[0] == self.batches and len(self._rewards[1]) == len(ids):
            cut = cut_rows(ids, [*trainer.eos_token_ids, pad])
            # a cut completion has all T tokens, whether or not TRL's masking took them out of the loss mask
            lengths = torch.where(cut, ids.shape[1], loss_mask(batch).sum(1).long())
            record.update(rule_signal(self._rewards[1], cut.cpu(), lengths.cpu(), trainer.num_generations))

    def _record(self) -> dict[str, float]:
        """This generation batch's record in ``per_batch`` (made by the first hook of the batch to need it)."""
        if not self.per_batch or self.per_batch[-1]["batch"] != self.batches:
            self.per_batch.append({"batch": self.batches, "tokens": self.tokens})
        return self.per_batch[-1]

    def signal(self) -> dict[str, float]:
        """The mean of every :func:`loss_signal` field over this run's generation batches."""
        return mean_signal(self.per_batch)


class ZeroCutAdvantage:
    """A counterfactual for the truncation analysis (``efficiency.py --zero-cut-advantage``): in training, the
    advantage of every completion cut at the length cap is set to 0 (``opd_modify_advantages``), after the
    estimator computed the batch's advantages with the cut completions' rewards in their groups' baselines. With
    ``truncated_completions: keep`` this is TRL's ``mask_truncated_completions`` for the policy-gradient term except
    that the cut completions' tokens stay in the loss (and in its token normaliser), and ``mask_reward`` except for
    the baseline. A row of per-token advantages is zeroed as a whole, a divergence reward included: for reward-only
    arms."""

    @hookimpl
    def opd_modify_advantages(self, trainer: Any, batch: dict[str, Any], advantages: Any) -> None:
        if not trainer.model.training:
            return
        cut = cut_rows(batch["completion_ids"], [*trainer.eos_token_ids, trainer._tokenizer.pad_token_id])
        advantages[cut.to(advantages.device)] = 0.0


def _budget_callback(counter: StudentTokens, budget: int, on_step: Callable[[int], None]) -> Any:
    from transformers import TrainerCallback

    class StopAtBudget(TrainerCallback):
        """Evaluates the checkpoints reached and stops training once the student generated ``budget`` tokens."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            on_step(state.global_step)
            if counter.tokens >= budget:
                control.should_training_stop = True

    return StopAtBudget()


def arm_recipe(base: Path, overrides: Sequence[str], *, budget: int, pm: Any) -> Any:
    """The validated recipe of an arm: ``base`` with ``overrides``, and ``trainer.args.max_steps`` set to a cap the
    budget always reaches first (each completion holds at least one generated token)."""
    from opd_plugins.recipe.loader import apply_overrides, read_yaml, validate_recipe

    raw, origins = apply_overrides(read_yaml(base), list(overrides))
    args = raw.setdefault("trainer", {}).setdefault("args", {})
    rows = int(args.get("per_device_train_batch_size", 8)) * int(args.get("gradient_accumulation_steps", 1))
    args["max_steps"] = math.ceil(budget / rows) + 1
    recipe, pm = validate_recipe(raw, str(base), pm=pm, origins=origins)
    return recipe, pm


def train_arm(base: Path, overrides: Sequence[str], *, plan: Plan, label: str, bench: str,
              initial: dict[str, Any] | None) -> dict[str, Any]:
    """Train one arm (one seed) to the budget; its checkpoints (k = 0..evals), the tokens it used and its counts.
    ``initial`` is the shared evaluation at 0 tokens (None: measured now, before training)."""
    from transformers import set_seed

    from opd_plugins.manager import get_plugin_manager
    from opd_plugins.runs import rundir
    from opd_plugins.runs.opd import build_config, build_trainer, run_evaluation
    from opd_plugins.trainers import Components

    pm = get_plugin_manager()
    counter = StudentTokens()
    pm.register(counter, name=f"benchmarks._arms[{label}]")
    if plan.zero_cut_advantage:
        pm.register(ZeroCutAdvantage(), name=f"benchmarks._arms.ZeroCutAdvantage[{label}]")
    pm.check_hooks()
    recipe, pm = arm_recipe(base, overrides, budget=plan.budget, pm=pm)
    set_seed(recipe.seed)
    built = recipe.take_components() or {}
    components = Components.from_recipe(recipe, pm, built=built or None)
    train_ds, eval_ds, task = rundir.build_data(recipe, rundir.teacher_columns(components.teacher), built.get("task"))
    if eval_ds is None or task is None:
        raise SystemExit(f"{label}: the recipe has no held-out set to evaluate (data.task and data.eval_size > 0)")
    rundir.check_sampler_columns(components.sampler, train_ds)
    config = build_config(recipe, components.rollout)
    targets = plan.targets()
    points: list[dict[str, Any]] = []
    timing = {"eval_s": 0.0}
    trainer: Any = None

    def evaluate(desc: str) -> dict[str, Any]:
        t = time.monotonic()
        result = run_evaluation(trainer, recipe, eval_ds, task, desc)
        timing["eval_s"] += time.monotonic() - t
        return {k: result[k] for k in ("accuracy", "stderr", "n")}

    def on_step(step: int) -> None:
        reached = [k for k, t in enumerate(targets, 1) if k > len(points) - 1 and counter.tokens >= t]
        if not reached:
            return
        result = evaluate(f"{label}: evaluating at {counter.tokens} tokens")
        for k in reached:  # one evaluation serves every checkpoint this step passed
            points.append({"k": k, "target": targets[k - 1], "tokens": counter.tokens, "step": step, **result})
        log(bench, f"{label}: {counter.tokens:,}/{plan.budget:,} tokens (step {step}): accuracy "
                   f"{result['accuracy']:.3f} ± {result['stderr']:.3f} (n={result['n']})")

    trainer = build_trainer(recipe, pm, train_dataset=train_ds, task=task, config=config, components=components,
                            callbacks=[_budget_callback(counter, plan.budget, on_step)])
    if trainer.accelerator.num_processes != 1:
        raise SystemExit("the arms harness counts this process's tokens: run it as a single process")
    try:
        if initial is None:
            initial = evaluate(f"{label}: evaluating before training")
            log(bench, f"before training: accuracy {initial['accuracy']:.3f} ± {initial['stderr']:.3f} "
                       f"(n={initial['n']}), shared by every arm")
        points.insert(0, {"k": 0, "target": 0, "tokens": 0, "step": 0, **initial})
        t0 = time.monotonic()
        trainer.train()
        wall = time.monotonic() - t0
    finally:
        trainer.close_components()
    args = trainer.args
    if counter.tokens < plan.budget:  # the checkpoints of the arms would no longer line up
        raise SystemExit(f"{label}: training ended at step {trainer.state.global_step} with {counter.tokens:,} of "
                         f"{plan.budget:,} student tokens (max_steps {args.max_steps}); see the log above")
    return {
        "seed": recipe.seed, "tokens": counter.tokens, "budget_reached": counter.tokens >= plan.budget,
        "steps": trainer.state.global_step, "generation_batches": counter.batches,
        "batch_max_tokens": args.per_device_train_batch_size * args.steps_per_generation * args.max_completion_length,
        "checkpoints": points, "rollouts": counter.rollouts,
        "guided_share": counter.guided / max(counter.rollouts, 1),
        "groups": counter.groups, "non_degenerate_share": counter.non_degenerate / max(counter.groups, 1),
        "per_batch": counter.per_batch, "loss_signal": counter.signal(),
        "train_s": round(wall - timing["eval_s"], 1), "eval_s": round(timing["eval_s"], 1),
    }


def run_arms(bench: str, base: Path, arms: Sequence[Arm], plan: Plan, workdir: Path, out: Path,
             report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every arm for seeds 0..N-1 (seed-major, so each seed is a complete comparison). After every arm ``report``,
    with ``report["arms"]`` holding the arms run so far and ``complete: False``, is written to ``out`` (a crash
    keeps the finished arms). Returns ``{arm: {about, overrides, runs, summary}}``."""
    results = {a.name: {"about": a.about, "overrides": list(a.overrides), "runs": []} for a in arms}
    initial = None
    for seed in range(plan.seeds):
        for arm in arms:
            label = f"{arm.name} seed {seed}"
            log(bench, f"{label}: training to {plan.budget:,} student tokens")
            overrides = [*plan.common, *arm.overrides, f"seed={seed}",
                         f"output_dir={workdir / f'{arm.name}-seed{seed}'}"]
            run = train_arm(base, overrides, plan=plan, label=label, bench=bench, initial=initial)
            initial = {k: run["checkpoints"][0][k] for k in ("accuracy", "stderr", "n")}
            results[arm.name]["runs"].append(run)
            results[arm.name]["summary"] = summarize(results[arm.name]["runs"])
            log(bench, f"{label}: done, {run['tokens']:,} tokens in {run['steps']} steps ({run['train_s']:.0f} s "
                       f"training, {run['eval_s']:.0f} s evaluating)")
            report.update(complete=False, arms={k: v for k, v in results.items() if v["runs"]})
            write_json(out, report)
    report.update(initial=initial)
    return results


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds at each checkpoint k: tokens, accuracy and its standard error (over seeds with two or more,
    else the binomial one of the single run's n prompts)."""
    curve = []
    for k in range(len(runs[0]["checkpoints"])):
        pts = [r["checkpoints"][k] for r in runs]
        accs = [p["accuracy"] for p in pts]
        se = statistics.stdev(accs) / math.sqrt(len(accs)) if len(accs) > 1 else pts[0]["stderr"]
        curve.append({"k": k, "tokens": statistics.fmean(p["tokens"] for p in pts),
                      "accuracy": statistics.fmean(accs), "se": se, "seeds": len(pts)})
    return {"curve": curve, "final": curve[-1], "se_over": "seeds" if len(runs) > 1 else "prompts (binomial)",
            "tokens_used": [r["tokens"] for r in runs],
            "non_degenerate_share": statistics.fmean(r["non_degenerate_share"] for r in runs),
            "guided_share": statistics.fmean(r["guided_share"] for r in runs),
            "loss_signal": mean_signal([r.get("loss_signal", {}) for r in runs])}


def mean_signal(records: Sequence[dict[str, float]]) -> dict[str, float]:
    """The mean of each :data:`SIGNAL_KEYS` and :data:`RULE_KEYS` field over ``records`` that have it (NaN where
    none has)."""
    out = {}
    for key in (*SIGNAL_KEYS, *RULE_KEYS):
        values = [r[key] for r in records if key in r and not math.isnan(r[key])]
        out[key] = statistics.fmean(values) if values else float("nan")
    return out


def tokens_to_reach(curve: list[dict[str, Any]], target: float) -> float | None:
    """Student tokens at which ``curve`` first reaches ``target`` accuracy, interpolated linearly between the last
    checkpoint below it and the first at or above it (0 when the starting point already does); None if never."""
    prev = None
    for point in curve:
        if point["accuracy"] >= target:
            if prev is None or point["accuracy"] == prev["accuracy"]:
                return float(point["tokens"])
            frac = (target - prev["accuracy"]) / (point["accuracy"] - prev["accuracy"])
            return prev["tokens"] + frac * (point["tokens"] - prev["tokens"])
        prev = point
    return None


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` as JSON atomically (a reader sees the previous file or the whole new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(obj, indent=1) + "\n")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(path: Path, results: dict[str, dict[str, Any]], title: str,
                lines: Sequence[tuple[str, float]] = ()) -> Path:
    """Held-out accuracy against student tokens, one line per arm with ± standard-error bars, and horizontal
    reference ``lines`` (label, accuracy); saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, arm in results.items():
        curve = arm["summary"]["curve"]
        ax.errorbar([p["tokens"] for p in curve], [p["accuracy"] for p in curve], yerr=[p["se"] for p in curve],
                    marker="o", markersize=4, capsize=3, label=name)
    for i, (label, value) in enumerate(lines):
        ax.axhline(value, linestyle="--", linewidth=1, color=f"C{len(results) + i}", label=label)
    ax.set_xlabel("student-generated tokens")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_batch(path: Path, results: dict[str, dict[str, Any]], title: str) -> Path:
    """Two panels against student tokens, one line per arm (the mean over seeds at each generation batch): the share
    of non-degenerate groups and the mean training reward of every generation batch; saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, arm in results.items():
        runs = [r.get("per_batch") or [] for r in arm["runs"]]
        n = min((len(r) for r in runs), default=0)
        if n == 0:
            continue
        tokens = [statistics.fmean(r[i]["tokens"] for r in runs) for i in range(n)]
        for ax, key in zip(axes, ("non_degenerate_share", "reward"), strict=True):
            ax.plot(tokens, [statistics.fmean(r[i][key] for r in runs) for i in range(n)], marker=".", label=name)
    for ax, label in zip(axes, ("non-degenerate groups (share per batch)", "training reward (mean per batch)"),
                         strict=True):
        ax.set_xlabel("student-generated tokens")
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(ap: Any, arm_names: Sequence[str], *, budget: int, quick_budget: int, out: str) -> None:
    """The options both benchmarks take: budget, evaluations, held-out size, seeds, arms, outputs, ``--quick``."""
    ap.add_argument("--budget", type=int, help=f"student-generated tokens per arm (default {budget:,}; --quick "
                                               f"{quick_budget})")
    ap.add_argument("--evals", type=int, help="evaluations along the budget, at every budget/evals (default 4; "
                                              "--quick 2)")
    ap.add_argument("--eval-n", type=int, help="held-out prompts per evaluation (default 200, at least 200 outside "
                                               "--quick; --quick 8)")
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per arm; mean ± SE over them")
    ap.add_argument("--arms", default=",".join(arm_names), help=f"comma-separated, from {', '.join(arm_names)}")
    ap.add_argument("--out", type=Path, default=Path(out), help="the JSON results (written atomically)")
    ap.add_argument("--png", type=Path, help="the curves (default: --out with .png)")
    ap.add_argument("--quick", action="store_true", help="tiny in-process models, tiny budget: a smoke test")


def resolve_arguments(ap: Any, a: Any, arm_names: Sequence[str], *, budget: int, quick_budget: int) \
        -> tuple[list[str], int, int, int]:
    """(arms, budget, held-out prompts, evaluations) from :func:`add_arguments`' options; ``ap.error`` on bad ones."""
    names = [n.strip() for n in a.arms.split(",") if n.strip()]
    unknown = sorted(set(names) - set(arm_names))
    if unknown or not names:
        ap.error(f"--arms: unknown arm(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(arm_names)}")
    eval_n = a.eval_n or (8 if a.quick else 200)
    if eval_n < 200 and not a.quick:
        ap.error("--eval-n must be at least 200 outside --quick (the standard error of 200 prompts is about 0.03)")
    tokens = a.budget or (quick_budget if a.quick else budget)
    evals = a.evals or (2 if a.quick else 4)
    if tokens <= 0 or evals <= 0 or a.seeds <= 0:
        ap.error("--budget, --evals and --seeds must be positive")
    return names, tokens, eval_n, evals


def eval_overrides(eval_n: int) -> tuple[str, ...]:
    """The held-out set and its evaluation for every arm, and no checkpoints (the arms' runs are not kept)."""
    return (f"data.eval_size={eval_n}", f"evaluation.num_prompts={eval_n}", "trainer.args.save_strategy='no'")


def tiny_models(workdir: Path) -> tuple[Path, Path]:
    """``--quick``'s models, built in-process: a tiny random student and a larger tiny teacher sharing its
    tokenizer."""
    from opd_plugins.testing import build_tokenizer, save_tiny_model

    tok = build_tokenizer()
    student = save_tiny_model(workdir / "tiny-student", seed=0, hidden=64, layers=2, tokenizer=tok)
    teacher = save_tiny_model(workdir / "tiny-teacher", seed=1, hidden=96, layers=2, tokenizer=tok)
    return student, teacher


def settings(plan: Plan, **extra: Any) -> dict[str, Any]:
    """The settings block of a benchmark's JSON."""
    import torch
    import transformers
    import trl

    from opd_plugins.markers import __version__

    return {"budget": plan.budget, "evals": plan.evals, "targets": plan.targets(), "seeds": plan.seeds,
            "common_overrides": list(plan.common), "zero_cut_advantage": plan.zero_cut_advantage,
            "threads": torch.get_num_threads(),
            "versions": {"opd_plugins": __version__, "trl": trl.__version__, "transformers": transformers.__version__,
                         "torch": torch.__version__}, **extra}


__all__ = ["BASE_RECIPE", "QUICK_TRAINER", "RULES", "RULE_KEYS", "SIGNAL_KEYS", "Arm", "Plan", "StudentTokens",
           "add_arguments", "arm_recipe", "cut_rows", "eval_overrides", "log", "loss_signal",
           "markdown_table", "mean_signal", "plot_curves", "plot_per_batch", "resolve_arguments", "rule_signal",
           "run_arms", "settings", "summarize", "tiny_models", "tokens_to_reach", "train_arm", "write_json",
           "ZeroCutAdvantage"]
