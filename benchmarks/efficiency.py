"""On-policy distillation against RL per student token: the headline result in miniature.

What it measures: held-out greedy accuracy (n = 200 prompts the training never sees, no privileged context) against
the number of tokens the student generated, for five ways of training the same student with the same budget of
student-generated tokens:

* ``grpo``: GRPO on the task reward only (the base recipe ``recipes/cpu/grpo_smollm2_sub.yaml``);
* ``opd``: on-policy distillation from a trained teacher, full-vocabulary reverse KL as the loss
  (``objective.divergence: 1``, no policy gradient);
* ``opd_dense``: the same teacher signal as a dense per-token advantage (``advantage: teacher_dense`` with no sparse
  part, ``d_t = log pi_T(y_t) - log pi_theta(y_t)``: OPD in the RL form);
* ``opsd``: on-policy self-distillation, the teacher being the initial student with the answer in its prompt
  (``teacher: self_context``, as ``recipes/quickstart/self_distill_cpu.yaml``);
* ``kdrl``: a KDRL-style hybrid, GRPO plus 0.5 x the reverse KL to the teacher (KDRL anneals its beta from 5e-3 to
  1e-3 over a known number of steps; here training stops at a token budget, so the weight is constant and larger,
  on the scale of the policy-gradient term).

How: every arm is the base recipe plus dotted overrides, trained by the arms harness (``benchmarks/_arms.py``):
a plugin counts the completion tokens the student generates and stops training at the first generation batch that
reaches the budget; accuracy is measured before training (once, shared) and at every budget/4 tokens; seeds
0..N-1 (``--seeds``) give mean +- SE over seeds (with one seed the SE is the binomial one over the n prompts).
The table gives, per arm, the final accuracy and the tokens it needed to reach the GRPO arm's final accuracy (the
first checkpoint at or above it, interpolated linearly from the checkpoint before; the same rule for GRPO itself),
and the ratio GRPO tokens / arm tokens. The curves go to ``efficiency.png``, everything to ``efficiency.json``.
Two more tables say what of each arm's training batches carried a policy-gradient signal into the loss (cut
completions, completions in the loss, those with a non-zero advantage and their share of the loss tokens) and what
each treatment of cut completions (``keep``, TRL's ``mask_truncated_completions``, ``mask_reward``) would have made
of the same rollouts (``_arms.loss_signal`` and ``_arms.rule_signal``).

The student is SmolLM2-135M-Instruct with LoRA (r 16): the base recipe ``recipes/cpu/grpo_smollm2_sub.yaml`` with
the task set by ``--op/--digits/--answer-format``. The teacher is SmolLM2-135M-Instruct too (so it shares the
tokenizer), made stronger honestly: trained on the training split first, by ``recipes/cpu/teacher_smollm2_max.yaml``
(GRPO plus self-distillation from its initial weights shown the answer, for far more tokens than the arms get),
its LoRA adapter merged into the weights, cached in the user cache
(``$OPD_PLUGINS_CACHE/benchmarks/teachers/<recipe>-<hash of the validated recipe>``; a changed recipe or task
retrains, ``--retrain-teacher`` forces it) and evaluated on the arms' held-out set.

The task defaults to "Which number is larger: 31 or 57? Reply with just the number." (``--op max --digits 2``),
because it is the one candidate measured to be weak but learnable for this model: greedy accuracy 0.20 on 100
held-out prompts (``benchmarks/context_probe.py``, docs/benchmarks.md), and self-distillation lifts it to 0.725 in
40 steps, so the arms have room to separate by how fast they climb. Two-digit subtraction, the first guess, is
0.03 there: almost every GRPO group fails as a whole, which leaves GRPO, and a teacher trained by it, no signal
(it is the regime of ``benchmarks/samplers.py``). Two-digit addition is 0.19, but 40 steps of self-distillation did
not move it (0.235 -> 0.240), and one-digit multiplication has only 16 held-out problems (n >= 200 is needed).
``--probe`` measures the base model's greedy accuracy on 100 held-out prompts of each candidate (add/sub
2-digit, mul 1-digit, max 2-digit) so the choice can be checked: weak but learnable is 10-40%.

    OMP_NUM_THREADS=2 python benchmarks/efficiency.py --probe
    OMP_NUM_THREADS=2 python benchmarks/efficiency.py [--budget 10000 --seeds 1 --eval-n 200 --out efficiency.json]
    OMP_NUM_THREADS=2 python benchmarks/efficiency.py ... --set trainer.args.truncated_completions=mask_reward
    python benchmarks/efficiency.py --quick        # tiny in-process models, a smoke test (seconds)
    python benchmarks/efficiency.py --from-json efficiency.json   # the tables and curves again, no training
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _arms  # noqa: E402
from _arms import BASE_RECIPE, QUICK_TRAINER, Arm, Plan  # noqa: E402

BENCH = "efficiency"
TEACHER_RECIPE = _arms.ROOT / "recipes" / "cpu" / "teacher_smollm2_max.yaml"
ARM_NAMES = ("grpo", "opd", "opd_dense", "opsd", "kdrl")
BUDGET, QUICK_BUDGET = 10_000, 96
PROBES = (("add", 2), ("sub", 2), ("mul", 1), ("max", 2))
MERGED_MARKER = ".merged_complete"
ANSWER_CONTEXT = {"max": "{prompt} (The larger number is {answer}.)"}
"""The self-distillation teacher's context per op (the quickstart's for ``max``; default ``ANSWER_CONTEXT_OTHER``)."""
ANSWER_CONTEXT_OTHER = "{prompt} (The answer is {answer}.)"


def answer_context(op: str) -> str:
    return ANSWER_CONTEXT.get(op, ANSWER_CONTEXT_OTHER)


def arms(teacher: str, names: list[str], op: str = "max") -> list[Arm]:
    """The arms, in ``names``' order; ``teacher`` is the trained teacher's merged checkpoint."""
    hf = f"teacher={{name: hf_model, params: {{model: {json.dumps(teacher)}}}}}"
    full_kl = "divergence={name: reverse_kl, params: {estimator: full}}"
    table = {
        "grpo": Arm("grpo", (), "GRPO on the task reward (the base recipe)"),
        "opd": Arm("opd", (hf, full_kl, "objective={policy_gradient: 0.0, divergence: 1.0}"),
                   "OPD: full-vocabulary reverse KL to the trained teacher"),
        "opd_dense": Arm("opd_dense", (hf, "divergence={name: reverse_kl, params: {estimator: sampled}}",
                                       "advantage={name: teacher_dense, params: {sparse: null}}",
                                       "objective={policy_gradient: 1.0}"),
                         "OPD as RL: the teacher's per-token reward as a dense advantage"),
        "opsd": Arm("opsd", (f"teacher={{name: self_context, params: {{template: {json.dumps(answer_context(op))}, "
                             "weights: initial}}", full_kl, "objective={policy_gradient: 0.0, divergence: 1.0}"),
                    "OPSD: the initial student with the answer in its prompt as teacher"),
        "kdrl": Arm("kdrl", (hf, full_kl, "objective={policy_gradient: 1.0, divergence: 0.5}"),
                    "KDRL-style hybrid: GRPO + 0.5 x reverse KL to the trained teacher"),
    }
    return [table[n] for n in names]


# ---------------------------------------------------------------------------------------------------------------
# The teacher: trained once by its recipe, the adapter merged, cached by the recipe's hash
# ---------------------------------------------------------------------------------------------------------------


def recipe_key(recipe: Any) -> str:
    """A hash of what a recipe trains (its validated content without output_dir, description and evaluation)."""
    dump = recipe.model_dump(mode="json")
    for key in ("output_dir", "description", "evaluation"):
        dump.pop(key, None)
    return digest(dump)


def digest(obj: Any) -> str:
    """12 hex digits of the SHA-256 of ``obj`` as sorted JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def merge_into(recipe: Any, final: Path, out: Path) -> None:
    """Save the model a run trained (``final``: a LoRA adapter, merged into its base here, or full weights) as one
    plain checkpoint with its tokenizer at ``out``, published by a rename."""
    from opd_plugins.models import load_causal_lm, load_tokenizer

    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        base = load_causal_lm(recipe.model.name_or_path, dtype=recipe.model.dtype)
        model = PeftModel.from_pretrained(base, str(final)).merge_and_unload()
    else:
        model = load_causal_lm(str(final), dtype=recipe.model.dtype)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    load_tokenizer(recipe.model.name_or_path).save_pretrained(str(tmp))
    (tmp / MERGED_MARKER).write_text(json.dumps({"from": str(final), "base": recipe.model.name_or_path}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def ensure_teacher(path: Path, overrides: list[str], cache: Path, *, retrain: bool) -> dict[str, Any]:
    """The teacher's merged checkpoint, trained by the recipe at ``path`` (with ``overrides``) unless a cached one
    of the same recipe is there; returns its directory, key and how it was trained."""
    from opd_plugins.recipe.loader import apply_overrides, read_yaml, validate_recipe
    from opd_plugins.runs import rundir, train

    raw, origins = apply_overrides(read_yaml(path), [*overrides, "evaluation.enabled=false"])
    raw["output_dir"] = str(cache / "unused")
    key = recipe_key(validate_recipe(raw, str(path), origins=origins)[0])
    home = cache / f"{path.stem}-{key}"
    merged, run = home / "merged", home / "run"
    info = {"recipe": str(path), "overrides": overrides, "key": key, "path": str(merged)}
    if (merged / MERGED_MARKER).is_file() and not retrain:
        _arms.log(BENCH, f"teacher: reusing {merged}")
        return {**info, "trained_now": False, **_read_json(home / "training.json")}
    raw["output_dir"] = str(run)
    recipe, pm = validate_recipe(raw, str(path), origins=origins)
    resume = not retrain and rundir.last_complete_checkpoint(run) is not None
    _arms.log(BENCH, f"teacher: training {path.name} into {run}" + (" (resuming)" if resume else ""))
    t0 = time.monotonic()
    summary = train(recipe, pm, resume=resume, overwrite=not resume)
    merge_into(recipe, run / "final", merged)
    training = {"steps": summary.get("steps"), "train_seconds": summary.get("train_seconds"),
                "wall_s": round(time.monotonic() - t0, 1)}
    _arms.write_json(home / "training.json", training)
    return {**info, "trained_now": True, **training}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def teacher_accuracy(teacher: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The teacher's greedy accuracy on the arms' held-out set (their recipe's evaluation settings), cached next to
    the teacher per held-out set."""
    from opd_plugins.evaluation import evaluate_accuracy
    from opd_plugins.models import load_causal_lm, load_tokenizer
    from opd_plugins.runs import rundir

    recipe, _ = _arms.arm_recipe(BASE_RECIPE, plan.common, budget=plan.budget, pm=None)
    _, eval_ds, task = rundir.build_data(recipe)
    e = recipe.evaluation
    spec = {"task": recipe.data.task.model_dump(mode="json"), "seed": recipe.data.seed, "n": e.num_prompts,
            "max_new_tokens": e.max_new_tokens}
    cached = Path(teacher["path"]).parent / f"eval-{digest(spec)}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    tok = load_tokenizer(teacher["path"])
    model = load_causal_lm(teacher["path"], tokenizer=tok)
    result = evaluate_accuracy(model, tok, eval_ds, task, num_prompts=e.num_prompts,
                               max_new_tokens=e.max_new_tokens or recipe.trainer.args.get("max_completion_length", 32),
                               batch_size=e.batch_size, seed=recipe.seed, desc="evaluating the teacher")
    result = {k: result[k] for k in ("accuracy", "stderr", "n")}
    _arms.write_json(cached, result)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def table(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm: final accuracy ± SE, tokens used, tokens to reach GRPO's final accuracy and GRPO tokens / those (on
    the curves averaged over seeds), and the same ratio seed by seed (``per_seed``)."""
    grpo = results.get("grpo")
    target = grpo["summary"]["final"]["accuracy"] if grpo else None
    start = grpo["summary"]["curve"][0]["accuracy"] if grpo else None
    grpo_tokens = _arms.tokens_to_reach(grpo["summary"]["curve"], target) if grpo else None
    rows = []
    for name, arm in results.items():
        s = arm["summary"]
        reach = _arms.tokens_to_reach(s["curve"], target) if target is not None else None
        ratio, note = _ratio(target, start, grpo_tokens, reach)
        rows.append({"arm": name, "accuracy": s["final"]["accuracy"], "se": s["final"]["se"], "se_over": s["se_over"],
                     "tokens_used": s["final"]["tokens"], "tokens_to_grpo_final": reach,
                     "grpo_tokens_over_arm_tokens": ratio, "note": note, "per_seed": per_seed(grpo, arm)})
    return rows


def _ratio(target: float | None, start: float | None, grpo_tokens: float | None,
           reach: float | None) -> tuple[float | None, str]:
    if target is None:
        return None, "no grpo arm"
    if target <= start:
        return None, "GRPO did not improve on the initial model"
    if reach is None:
        return None, "not reached"
    return grpo_tokens / reach, ""


def per_seed(grpo: dict[str, Any] | None, arm: dict[str, Any]) -> list[dict[str, Any]]:
    """The arm's run of each seed against the GRPO run of the same seed (same data order, same initial weights):
    the tokens it needed to reach that GRPO run's final accuracy, and GRPO's tokens over them. A pairing that the
    mean curves hide: one seed's late GRPO jump and another's early one average into a curve neither run had."""
    if not grpo:
        return []
    out = []
    for g, r in zip(grpo.get("runs", []), arm.get("runs", [])):
        if g["seed"] != r["seed"]:
            raise ValueError(f"runs out of seed order: grpo seed {g['seed']} against seed {r['seed']}")
        target, start = g["checkpoints"][-1]["accuracy"], g["checkpoints"][0]["accuracy"]
        reach = _arms.tokens_to_reach(r["checkpoints"], target)
        ratio, note = _ratio(target, start, _arms.tokens_to_reach(g["checkpoints"], target), reach)
        out.append({"seed": r["seed"], "grpo_final": target, "tokens_to_grpo_final": reach, "ratio": ratio,
                    "note": note})
    return out


def show(rows: list[dict[str, Any]], teacher: dict[str, Any] | None, initial: dict[str, Any],
         results: dict[str, dict[str, Any]] | None = None) -> str:
    """The table (markdown), the reference accuracies, and with ``results`` the accuracy at every checkpoint."""
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    def seeds(r: dict[str, Any]) -> str:
        short = {"GRPO did not improve on the initial model": "no GRPO gain"}
        return ", ".join(num(p["ratio"], ".2f") if p["ratio"] is not None else short.get(p["note"], p["note"])
                         for p in r["per_seed"]) or "-"

    body = [[r["arm"], f"{r['accuracy']:.3f} ± {r['se']:.3f}", f"{r['tokens_used']:,.0f}",
             num(r["tokens_to_grpo_final"], ",.0f") if r["tokens_to_grpo_final"] is not None else r["note"],
             num(r["grpo_tokens_over_arm_tokens"], ".2f") if r["grpo_tokens_over_arm_tokens"] is not None
             else r["note"] or "-", seeds(r)] for r in rows]
    text = _arms.markdown_table(["arm", "final accuracy ± SE", "tokens used", "tokens to GRPO's final accuracy",
                                 "GRPO tokens / arm tokens", "per seed"], body)
    text += f"\n\nbefore training: {initial['accuracy']:.3f} ± {initial['stderr']:.3f} (n={initial['n']})"
    if teacher and teacher.get("accuracy") is not None:
        text += f"; teacher: {teacher['accuracy']:.3f} ± {teacher['stderr']:.3f} (n={teacher['n']})"
    text += ("\n(tokens to reach: linear interpolation between the two checkpoints around the crossing; per seed: "
             "each seed's run against GRPO's run of that seed)")
    if results:
        curves = {name: arm["summary"]["curve"][1:] for name, arm in results.items()}
        width = max(len(c) for c in curves.values())
        header = ["arm", *[f"checkpoint {k}" for k in range(1, width + 1)]]
        cells = [[name, *[f"{p['accuracy']:.3f} ± {p['se']:.3f} @ {p['tokens']:,.0f}" for p in curve]]
                 for name, curve in curves.items()]
        text += "\n\nheld-out accuracy ± SE @ mean student tokens, at every checkpoint:\n\n"
        text += _arms.markdown_table(header, cells)
        text += signal_table(results)
    return text


def signal_table(results: dict[str, dict[str, Any]]) -> str:
    """What of each arm's training batches reached the loss with a policy-gradient signal (``_arms.loss_signal``),
    and what each treatment of cut completions would have made of the same rollouts (``_arms.rule_signal``): means
    over generation batches, with several seeds each seed's row and then the mean over seeds. Empty for a JSON
    written before they were recorded."""
    nan = float("nan")

    def fmt(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:.2f}"

    def rows(keys: Sequence[str], cell: Callable[[dict[str, float]], list[str]]) -> list[list[str]]:
        """A row per seed (with several) and one for the mean; none where no key was recorded."""
        out = []
        for name, arm in results.items():
            runs = arm.get("runs", [])
            labelled = [(f"{name} seed {r['seed']}", r.get("loss_signal") or {}) for r in runs] if len(runs) > 1 else []
            labelled.append((name if len(runs) <= 1 else f"{name} (mean)", arm["summary"].get("loss_signal") or {}))
            out += [[label, *cell(signal)] for label, signal in labelled
                    if any(not math.isnan(signal.get(k, nan)) for k in keys)]
        return out

    actual = rows(_arms.SIGNAL_KEYS, lambda sig: [fmt(sig.get(k, nan)) for k in _arms.SIGNAL_KEYS])
    rules = rows(_arms.RULE_KEYS, lambda sig: [f"{fmt(sig.get(f'if_{r}_signal_share', nan))} "
                                               f"({fmt(sig.get(f'if_{r}_signal_token_share', nan))})"
                                               for r in _arms.RULES])
    text = ""
    if actual:
        text += ("\n\ntraining batches, mean share of completions (groups in the last column) over batches:\n\n"
                 + _arms.markdown_table(["arm", "cut", "in the loss", "in the loss, advantage != 0",
                                         "their share of loss tokens", "groups with one"], actual))
    if rules:
        text += ("\n\nthe same rollouts under each treatment of cut completions: share with a non-zero GRPO "
                 "advantage in the loss (their share of the loss tokens), mean over batches:\n\n"
                 + _arms.markdown_table(["arm", *_arms.RULES], rules))
    return text


# ---------------------------------------------------------------------------------------------------------------
# --probe: base-model accuracy on the candidate tasks
# ---------------------------------------------------------------------------------------------------------------


def probe(model_path: str, n: int, answer_format: str, max_new_tokens: int) -> list[dict[str, Any]]:
    from opd_plugins.data import get_task
    from opd_plugins.evaluation import evaluate_accuracy
    from opd_plugins.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(model_path)
    model = load_causal_lm(model_path, tokenizer=tok)
    rows = []
    for op, digits in PROBES:
        task = get_task("arithmetic", {"op": op, "digits": digits, "answer_format": answer_format})
        ds, held_out = held_out_prompts(task, n)
        r = evaluate_accuracy(model, tok, ds, task, num_prompts=len(ds), max_new_tokens=max_new_tokens,
                              batch_size=50, desc=f"probing {op} {digits}-digit")
        rows.append({"op": op, "digits": digits, "answer_format": answer_format, "accuracy": r["accuracy"],
                     "stderr": r["stderr"], "n": r["n"], "held_out_problems": held_out,
                     "in_band": 0.10 <= r["accuracy"] <= 0.40})
        _arms.log(BENCH, f"probe {op} {digits}-digit: {r['accuracy']:.3f} ± {r['stderr']:.3f} (n={r['n']})")
    print(_arms.markdown_table(
        ["op", "digits", "greedy accuracy ± SE", "n", "weak but learnable (10-40%)", "held-out problems"],
        [[r["op"], r["digits"], f"{r['accuracy']:.3f} ± {r['stderr']:.3f}", r["n"], "yes" if r["in_band"] else "no",
          r["held_out_problems"] if r["held_out_problems"] is not None else f">= {max(n, 200)}"] for r in rows]))
    return rows


def held_out_prompts(task: Any, n: int) -> tuple[Any, int | None]:
    """``n`` held-out prompts of ``task``, or all of them when its eval split is smaller; and the split's size when it
    is under 200 (too few for the benchmark), else None."""
    size = next(k for k in range(max(n, 200), 0, -1) if _builds(task, k))
    return task.build("eval", min(n, size), 0), (size if size < 200 else None)


def _builds(task: Any, size: int) -> bool:
    from opd_plugins.errors import DataError

    try:
        task.build("eval", size, 0)
    except DataError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _arms.add_arguments(ap, ARM_NAMES, budget=BUDGET, quick_budget=QUICK_BUDGET, out="efficiency.json")
    ap.add_argument("--op", default="max", choices=("add", "sub", "mul", "max"))
    ap.add_argument("--digits", type=int, default=2)
    ap.add_argument("--answer-format", default="number_only", choices=("number_only", "free"))
    ap.add_argument("--teacher-recipe", type=Path, default=TEACHER_RECIPE)
    ap.add_argument("--completion-length", type=int, help="trainer.args.max_completion_length of the teacher's "
                    "training and of every arm (default: the recipes' 32; evaluation keeps its own max_new_tokens)")
    ap.add_argument("--teacher-steps", type=int, help="trainer.args.max_steps of the teacher's training "
                    "(default: its recipe's)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a dotted recipe override for every arm, after the task's and before the arm's own "
                         "(repeatable; validated before anything trains; not the teacher's), e.g. "
                         "--set trainer.args.truncated_completions=mask_reward")
    ap.add_argument("--zero-cut-advantage", action="store_true",
                    help="a counterfactual for the truncation analysis: the advantage of a completion cut at the cap "
                         "is set to 0 after the estimator (its reward stays in its group's baseline, its tokens in the "
                         "loss); --arms grpo only; meant for truncated_completions: keep (under TRL's masking or "
                         "mask_reward it changes nothing: a cut completion is out of the loss or has no advantage)")
    ap.add_argument("--retrain-teacher", action="store_true", help="train the teacher again even if one is cached")
    ap.add_argument("--probe", action="store_true", help="only measure the base model on the candidate tasks (JSON: "
                                                         "--out's name with _probe)")
    ap.add_argument("--from-json", type=Path, metavar="JSON", help="no training: print the table and draw the curves "
                    "again from a run's JSON (--png, default: its name with .png)")
    a = ap.parse_args(argv)
    if a.from_json:
        return redraw(a.from_json, a.png)
    names, budget, eval_n, plan_evals = _arms.resolve_arguments(ap, a, ARM_NAMES, budget=BUDGET,
                                                                quick_budget=QUICK_BUDGET)
    if a.zero_cut_advantage and set(names) != {"grpo"}:
        ap.error("--zero-cut-advantage is a counterfactual for the reward-only arm: use it with --arms grpo (it "
                 "would zero the teacher's per-token rewards of the other arms' cut completions too)")

    with tempfile.TemporaryDirectory(prefix="opd-efficiency-") as tmp:
        work = Path(tmp)
        task = [f"data.task.params.op={a.op}", f"data.task.params.digits={a.digits}",
                f"data.task.params.answer_format={a.answer_format}"]
        student_over: list[str] = []
        teacher_over = [*task, f"teacher.params.template={json.dumps(answer_context(a.op))}"]
        if a.completion_length:
            student_over.append(f"trainer.args.max_completion_length={a.completion_length}")
            teacher_over.append(f"trainer.args.max_completion_length={a.completion_length}")
        if a.teacher_steps:
            teacher_over.append(f"trainer.args.max_steps={a.teacher_steps}")
        cache = _cache_root()
        if a.quick:
            student, tiny_teacher = _arms.tiny_models(work)
            student_over = [f"model.name_or_path={student}", *QUICK_TRAINER, "data.train_size=16"]
            teacher_over += [f"model.name_or_path={tiny_teacher}", *QUICK_TRAINER, "data.train_size=8",
                             "trainer.args.max_steps=1", "trainer.args.save_strategy='no'"]
            cache = work / "teachers"
        if a.probe:
            model = str(student) if a.quick else "smollm2-135m-instruct"
            rows = probe(model, 8 if a.quick else 100, a.answer_format, 8 if a.quick else 32)
            out = a.out.with_name(f"{a.out.stem}_probe.json")
            _arms.write_json(out, {"benchmark": "efficiency --probe", "model": model, "rows": rows})
            print(f"\nwrote {out}")
            return 0
        plan = Plan(budget=budget, evals=plan_evals, seeds=a.seeds,
                    common=(*task, *student_over, *_arms.eval_overrides(eval_n), *a.sets),
                    zero_cut_advantage=a.zero_cut_advantage)
        if a.sets:
            check_sets(plan, a.sets)
        t0 = time.monotonic()
        teacher: dict[str, Any] | None = None
        if any(n in ("opd", "opd_dense", "kdrl") for n in names):
            teacher = ensure_teacher(a.teacher_recipe, teacher_over, cache, retrain=a.retrain_teacher)
            teacher.update(teacher_accuracy(teacher, plan))
            _arms.log(BENCH, f"teacher: held-out accuracy {teacher['accuracy']:.3f} ± {teacher['stderr']:.3f} "
                             f"(n={teacher['n']})")
        report: dict[str, Any] = {
            "benchmark": BENCH, "complete": False, "quick": a.quick, "base_recipe": str(BASE_RECIPE),
            "task": {"op": a.op, "digits": a.digits, "answer_format": a.answer_format}, "teacher": teacher,
            "settings": _arms.settings(plan, eval_n=eval_n), "arms": {},
        }
        results = _arms.run_arms(BENCH, BASE_RECIPE, arms(teacher["path"] if teacher else "", names, a.op), plan, work,
                                 a.out, report)
    png = a.png or a.out.with_suffix(".png")
    rows = render(results, report, png)
    report.update(complete=True, table=rows, png=str(png), wall_s=round(time.monotonic() - t0))
    _arms.write_json(a.out, report)
    print(show(rows, teacher, report["initial"], results))
    print(f"\nwrote {a.out} and {png} ({report['wall_s']} s)")
    return 0


def check_sets(plan: Plan, sets: list[str]) -> None:
    """``--set``: the base recipe with every common override must validate before the teacher or any arm trains."""
    from opd_plugins.errors import OPDError

    try:
        _arms.arm_recipe(BASE_RECIPE, plan.common, budget=plan.budget, pm=None)
    except (OPDError, ValueError) as e:
        raise SystemExit(f"--set {' '.join(sets)}: the arms' recipe does not validate:\n{e}") from e


def render(results: dict[str, dict[str, Any]], report: dict[str, Any], png: Path) -> list[dict[str, Any]]:
    """The table's rows, and the curves drawn to ``png`` with the teacher's and GRPO's final accuracy as lines."""
    teacher, task = report.get("teacher"), report["task"]
    lines = [("teacher", teacher["accuracy"])] if teacher else []
    if "grpo" in results:
        lines.append(("GRPO final", results["grpo"]["summary"]["final"]["accuracy"]))
    title = f"{task['op']} {task['digits']}-digit, {report['settings']['budget']:,} student tokens per arm"
    _arms.plot_curves(png, results, title, lines)
    return table(results)


def redraw(path: Path, png: Path | None) -> int:
    """``--from-json``: the table and the curves again from a run's JSON, without training and without rewriting
    it. A partial JSON (a run stopped part-way) gives them for the arms it holds."""
    if not path.is_file():
        raise SystemExit(f"--from-json {path}: no such file")
    try:
        report = json.loads(path.read_text())
        results = report["arms"]
        runs = [run for arm in results.values() for run in arm["runs"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"--from-json {path}: not an efficiency benchmark's JSON ({type(e).__name__}: {e})") from e
    if report.get("benchmark") != BENCH or not runs:
        raise SystemExit(f"--from-json {path}: no arm of an efficiency benchmark in it (benchmark "
                         f"{report.get('benchmark')!r}, {len(runs)} runs)")
    initial = report.get("initial") or {k: runs[0]["checkpoints"][0][k] for k in ("accuracy", "stderr", "n")}
    png = png or path.with_suffix(".png")
    rows = render(results, report, png)
    state = "" if report.get("complete") else f" (partial: {', '.join(results)} so far)"
    print(show(rows, report.get("teacher"), initial, results))
    print(f"\nfrom {path}{state}; wrote {png}")
    return 0


def _cache_root() -> Path:
    from opd_plugins.paths import cache_dir

    return cache_dir() / "benchmarks" / "teachers"


if __name__ == "__main__":
    sys.exit(main())
