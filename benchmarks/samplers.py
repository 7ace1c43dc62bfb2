"""Hint and prefix samplers against plain GRPO at the same budget of student-generated tokens.

What it measures: for GRPO and for GRPO with each built-in hint/prefix sampler, the held-out greedy accuracy
without any hint (n = 200 prompts the training never sees; samplers are never applied at evaluation) against the
tokens the student generated, the share of non-degenerate groups (groups whose G rewards are not all equal: the
ones that carry a learning signal, which is what a sampler is for), and the share of rollouts a sampler guided:

* ``grpo``: the base recipe ``recipes/cpu/grpo_smollm2_sub.yaml`` (SmolLM2-135M-Instruct, LoRA r 16, two-digit
  subtraction, number-only answers);
* ``oracle_prefix`` (POPE): hard prompts get the shortest prefix of the worked solution under which the policy
  succeeds, in the prompt (``context``);
* ``guide`` (Adaptive Guidance): hard prompts are generated with the answer hint and trained on the original
  prompt with the shaped ratio r/(r + gamma) (``swap``);
* ``hint_ladder`` (SAGE-light / Scaf-GRPO): a per-prompt level of how much of the worked solution is shown;
* ``prefix_rl`` (PrefixRL): hard prompts start from a forced prefix of a successful trace (the task's worked
  solution, ``trace_column: solution``, or the policy's own), its tokens out of the loss and of the token count.

A prompt is hard once its last unguided group all failed, and a sampler acts on its next visit, so the prompts must
recur: the training set is 32 prompts (one pass over them every 8 steps of 4 prompts). Every sampler has its paper
defaults (docs/components.md); the worked solutions and hints are the columns the arithmetic task writes.

How: the arms harness (``benchmarks/_arms.py``): every arm is the base recipe plus dotted overrides; a plugin
counts the completion tokens the student generated (forced prefix tokens left out) and the non-degenerate groups,
and stops training at the first generation batch that reaches the budget; per generation batch it records the
share of non-degenerate groups and the mean training reward (``samplers_per_batch.png``); accuracy is measured before training
(once, shared) and at every budget/4 tokens; ``--seeds N`` repeats with seeds 0..N-1 (mean ± SE over seeds; with
one seed the SE is the binomial one over the n prompts). The curves go to ``samplers.png``, everything to
``samplers.json``.

    OMP_NUM_THREADS=2 python benchmarks/samplers.py [--budget 12000 --seeds 1 --eval-n 200 --out samplers.json]
    python benchmarks/samplers.py --quick        # tiny in-process model, a smoke test (seconds)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _arms  # noqa: E402
from _arms import BASE_RECIPE, QUICK_TRAINER, Arm, Plan  # noqa: E402

BENCH = "samplers"
BUDGET, QUICK_BUDGET = 12_000, 160
TRAIN_PROMPTS, QUICK_TRAIN_PROMPTS = 32, 4
ARMS = (
    Arm("grpo", (), "GRPO, no sampler (the base recipe)"),
    Arm("oracle_prefix", ("sampler={name: oracle_prefix}",),
        "POPE: the shortest solution prefix that works, in the prompt"),
    Arm("guide", ("sampler={name: guide}",), "Adaptive Guidance: hinted rollouts, trained hint-free (swap)"),
    Arm("hint_ladder", ("sampler={name: hint_ladder}",), "SAGE-light: a per-prompt level of the solution shown"),
    Arm("prefix_rl", ("sampler={name: prefix_rl, params: {trace_column: solution}}",),
        "PrefixRL: a forced prefix of a successful trace, masked"),
)
ARM_BY_NAME = {a.name: a for a in ARMS}
ARM_NAMES = tuple(ARM_BY_NAME)


def table(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, arm in results.items():
        s = arm["summary"]
        rows.append({"arm": name, "accuracy": s["final"]["accuracy"], "se": s["final"]["se"], "se_over": s["se_over"],
                     "non_degenerate_share": s["non_degenerate_share"], "guided_share": s["guided_share"],
                     "tokens_used": s["final"]["tokens"],
                     "steps": sum(r["steps"] for r in arm["runs"]) / len(arm["runs"])})
    return rows


def show(rows: list[dict[str, Any]], initial: dict[str, Any]) -> str:
    text = _arms.markdown_table(
        ["arm", "held-out accuracy ± SE (no hint)", "non-degenerate groups", "guided rollouts", "tokens used",
         "steps"],
        [[r["arm"], f"{r['accuracy']:.3f} ± {r['se']:.3f}", f"{r['non_degenerate_share']:.2f}",
          f"{r['guided_share']:.2f}", f"{r['tokens_used']:,.0f}", f"{r['steps']:.0f}"] for r in rows])
    return text + f"\n\nbefore training: {initial['accuracy']:.3f} ± {initial['stderr']:.3f} (n={initial['n']})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _arms.add_arguments(ap, ARM_NAMES, budget=BUDGET, quick_budget=QUICK_BUDGET, out="samplers.json")
    ap.add_argument("--train-prompts", type=int, help=f"training prompts, which must recur for a sampler to act "
                                                      f"(default {TRAIN_PROMPTS}; --quick {QUICK_TRAIN_PROMPTS})")
    a = ap.parse_args(argv)
    names, budget, eval_n, evals = _arms.resolve_arguments(ap, a, ARM_NAMES, budget=BUDGET, quick_budget=QUICK_BUDGET)
    train_prompts = a.train_prompts or (QUICK_TRAIN_PROMPTS if a.quick else TRAIN_PROMPTS)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="opd-samplers-") as tmp:
        work = Path(tmp)
        student: list[str] = []
        if a.quick:
            model, _ = _arms.tiny_models(work)
            student = [f"model.name_or_path={model}", *QUICK_TRAINER]
        plan = Plan(budget=budget, evals=evals, seeds=a.seeds,
                    common=(*student, f"data.train_size={train_prompts}", *_arms.eval_overrides(eval_n)))
        report: dict[str, Any] = {"benchmark": BENCH, "complete": False, "quick": a.quick,
                                  "base_recipe": str(BASE_RECIPE),
                                  "settings": _arms.settings(plan, eval_n=eval_n, train_prompts=train_prompts)}
        results = _arms.run_arms(BENCH, BASE_RECIPE, [ARM_BY_NAME[n] for n in names], plan, work, a.out,
                                 report)
    rows = table(results)
    png = a.png or a.out.with_suffix(".png")
    report.update(complete=True, table=rows, png=str(png), wall_s=round(time.monotonic() - t0))
    lines = [("GRPO final", results["grpo"]["summary"]["final"]["accuracy"])] if "grpo" in results else []
    _arms.plot_curves(png, results, f"hint/prefix samplers, {budget:,} student tokens per arm", lines)
    per_batch_png = png.with_name(png.stem + "_per_batch.png")
    _arms.plot_per_batch(per_batch_png, results, "training signal per generation batch (hinted rollouts included)")
    report.update(per_batch_png=str(per_batch_png))
    _arms.write_json(a.out, report)
    print(show(rows, report["initial"]))
    print(f"\nwrote {a.out}, {png} and {per_batch_png} ({report['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
