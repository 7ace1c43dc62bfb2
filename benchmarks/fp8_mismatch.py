"""FP8 rollouts on CPU with SmolLM2-135M-Instruct (real weights): train/rollout mismatch and short GRPO runs.

Part 1, mismatch (``--part mismatch``): the same held-out arithmetic prompts, sampled once per arm with the same
seed at the training temperature, each completion scored again by the arm's *training* forward; the statistics
are the ones the trainer logs as ``correction/*`` (``opd_plugins.correction.importance_weights``):

* ``none``: no FP8 (``perturbed_hf`` with no noise: a private high-precision copy, the same generation path);
* ``rollout_only/<format>``: sample from the ``fp8`` backend's FP8 copy, train in high precision;
* ``unified/<format>``: the ``fp8`` backend's one precision flow: the student's own layers fake-quantized, the
  training forward and the rollout the same network;

for ``format`` per_block (128x128) and per_channel. The model is float32 on CPU, so "high precision" is fp32.

Part 2, training (``--part train``): GRPO on the same task with LoRA (r 16), ``--steps`` steps of 2 prompts x 4
completions each, for ``hf_generate`` (no FP8) and each flow (per_block) with ``correction: none`` and ``tis``
(token TIS, C = 2), each for ``--seeds`` seeds (the seed draws the training prompts and the samples). Per run: the
mean training reward over the first and the last half of the steps, the per-step completion lengths
(``--max-new-tokens`` is the cap), the mean ``correction/mismatch_kl``, the held-out greedy accuracy after training
(the policy as trained: for ``unified`` the quantized student) and the wall time; per arm, their mean and standard
error over seeds. ``--mask-truncated`` trains with TRL's ``mask_truncated_completions`` (a completion cut at the cap
leaves the loss), the check of whether truncated completions explain an arm's result. ``--runs`` picks arms.

    OMP_NUM_THREADS=2 python benchmarks/fp8_mismatch.py [--part both --prompts 48 --steps 10 --out fp8.json]
    OMP_NUM_THREADS=2 python benchmarks/fp8_mismatch.py --part train --steps 8 --eval-prompts 40 --seeds 3 \
        [--mask-truncated --runs hf_generate,rollout_only/none,rollout_only/tis,unified/none]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, if opd_plugins is not installed

TASK = {"op": "max", "digits": 2, "answer_format": "number_only"}
STATS = ("mismatch_kl", "mismatch_kl_k1", "logp_diff_abs_mean", "logp_diff_abs_p90", "logp_diff_abs_p99",
         "logp_diff_abs_max", "ratio_min", "ratio_max", "truncated_frac")


def load(model_name: str):
    from opd_plugins.models import load_causal_lm, load_tokenizer, resolve_model_path

    path = resolve_model_path(model_name)
    tok = load_tokenizer(path)
    model = load_causal_lm(path)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def prompt_ids(tok, rows) -> list[list[int]]:
    out = []
    for r in rows:
        text = tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


def train_logps(model, prompts, completions, temperature: float):
    """(B, T) log-probs of the completions under ``model``'s training forward (train mode, as the trainer)."""
    import torch

    width = max(len(c) for c in completions)
    out = torch.zeros(len(completions), width)
    mask = torch.zeros(len(completions), width)
    model.train()
    with torch.no_grad():
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            if not c:
                continue
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1:-1].float() / temperature
            out[i, :len(c)] = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
            mask[i, :len(c)] = 1
    model.eval()
    return out, mask


def mismatch(args) -> list[dict]:
    import torch

    from opd_plugins.context import Sampling
    from opd_plugins.correction import CorrectionSpec, importance_weights
    from opd_plugins.data import get_task
    from opd_plugins.rollout.fp8 import FP8Rollout
    from opd_plugins.rollout.perturbed import PerturbedHFGenerate
    from opd_plugins.testing import fake_context

    base, tok = load(args.model)
    task = get_task("arithmetic", TASK)
    prompts = prompt_ids(tok, task.build("eval", args.prompts, 0))
    arms = [("none", "-", lambda: PerturbedHFGenerate())]
    for fmt in ("per_block", "per_channel"):
        for flow in ("rollout_only", "unified"):
            arms.append((flow, fmt, lambda flow=flow, fmt=fmt: FP8Rollout(FP8Rollout.Params(flow=flow, format=fmt))))
    rows = []
    for flow, fmt, make in arms:
        t = time.monotonic()
        model = copy.deepcopy(base)
        ctx = fake_context(model, tok, args.temperature, max_completion_length=args.max_new_tokens,
                           eos_token_ids=[tok.eos_token_id])
        backend = make()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SmolLM2's 576-wide layers are not multiples of 128: partial tiles
            backend.setup(ctx)
        torch.manual_seed(args.seed)
        out = backend.generate(prompts, Sampling(num_generations=1))
        width = max(len(c) for c in out.completion_ids)
        behaviour = torch.zeros(len(prompts), width)
        for i, lp in enumerate(out.behaviour_logps):
            behaviour[i, :len(lp)] = torch.tensor(lp)
        train, mask = train_logps(model, prompts, out.completion_ids, args.temperature)
        stats = importance_weights(train, behaviour, mask, CorrectionSpec(mode="token_tis", clip_max=2.0)).stats
        row = {"flow": flow, "format": fmt, "tokens": int(mask.sum()), **{k: stats[k] for k in STATS},
               "seconds": time.monotonic() - t}
        rows.append(row)
        print(f"[mismatch] {flow:12s} {fmt:11s} KL {row['mismatch_kl']:.2e}  |gap| mean {row['logp_diff_abs_mean']:.2e}"
              f" p99 {row['logp_diff_abs_p99']:.2e} max {row['logp_diff_abs_max']:.2e}  ({row['seconds']:.0f} s)",
              file=sys.stderr, flush=True)
        backend.close()
        del model, backend
    return rows


RUNS = ("hf_generate", "rollout_only/none", "rollout_only/tis", "unified/none", "unified/tis")
"""The training runs: ``hf_generate`` (no FP8) and each FP8 flow (per_block) with ``correction`` none or tis."""


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error over seeds (None for one seed)."""
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None)


def train_one(args, name: str, seed: int, task, eval_ds, before: dict) -> dict:
    """One GRPO run of ``name`` with ``seed``; fills ``before`` (the initial policy's accuracy per precision)."""
    from peft import LoraConfig
    from transformers import PrinterCallback

    from opd_plugins.evaluation import evaluate_accuracy
    from opd_plugins.rollout.fp8 import FP8Rollout
    from opd_plugins.tasks import make_reward_function
    from opd_plugins.trainers import Components, OPDConfig, OPDTrainer

    flow, _, correction = name.partition("/")
    correction = correction or "none"
    t = time.monotonic()
    model, tok = load(args.model)
    rollout = "hf_generate" if flow == "hf_generate" else FP8Rollout(FP8Rollout.Params(flow=flow, format="per_block"))
    train_ds = task.build("train", 2 * args.steps, seed)
    with tempfile.TemporaryDirectory() as out:
        cfg = OPDConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=8, num_generations=4,
                        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_k=0,
                        top_p=1.0, learning_rate=args.lr, logging_steps=1, report_to="none", save_strategy="no",
                        use_cpu=True, bf16=False, seed=seed, disable_tqdm=True,
                        mask_truncated_completions=args.mask_truncated)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # partial FP8 tiles, TRL's notes on CPU
            tr = OPDTrainer(model=model, args=cfg, components=Components.build(rollout=rollout, correction=correction),
                            reward_funcs=[make_reward_function(task)], train_dataset=train_ds, processing_class=tok,
                            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                   task_type="CAUSAL_LM"))
            tr.remove_callback(PrinterCallback)  # the per-step dicts; the summary below says what matters
            key = "quantized" if flow == "unified" else "high_precision"
            if key not in before:  # the initial policy as this flow samples it (greedy: the same for every seed)
                before[key] = evaluate_accuracy(tr.model, tok, eval_ds, task, num_prompts=args.eval_prompts,
                                                max_new_tokens=args.max_new_tokens, batch_size=args.eval_prompts)
            train_start = time.monotonic()
            tr.train()
            train_s = time.monotonic() - train_start
            after = evaluate_accuracy(tr.model, tok, eval_ds, task, num_prompts=args.eval_prompts,
                                      max_new_tokens=args.max_new_tokens, batch_size=args.eval_prompts)
            tr.close_components()
    hist = tr.state.log_history
    rewards = [h["reward"] for h in hist if "reward" in h]
    kl = [h["correction/mismatch_kl"] for h in hist if "correction/mismatch_kl" in h]
    lengths = [h["completions/mean_length"] for h in hist if "completions/mean_length" in h]
    clipped = [h["completions/clipped_ratio"] for h in hist if "completions/clipped_ratio" in h]
    half = max(len(rewards) // 2, 1)
    return {"run": name, "rollout": "hf_generate" if flow == "hf_generate" else f"fp8 {flow}",
            "correction": correction, "seed": seed,
            "reward_first_half": statistics.fmean(rewards[:half]), "reward_last_half": statistics.fmean(rewards[half:]),
            "length_last_half": statistics.fmean(lengths[half:]), "length_last_step": lengths[-1],
            "clipped_last_half": statistics.fmean(clipped[half:]) if clipped else None,
            "rewards_per_step": rewards, "lengths_per_step": lengths,
            "mismatch_kl": statistics.fmean(kl) if kl else None, "accuracy_after": after["accuracy"],
            "accuracy_se": after.get("stderr"), "n": after["n"], "train_s": train_s, "seconds": time.monotonic() - t}


SUMMARY = ("accuracy_after", "reward_first_half", "reward_last_half", "length_last_half", "length_last_step",
           "clipped_last_half", "mismatch_kl")


def train_runs(args, save=lambda partial: None) -> dict:
    """Every run of ``args.runs`` for each seed; ``save`` gets the result so far after each run (nothing is lost
    when a long invocation is stopped)."""
    from opd_plugins.data import get_task

    task = get_task("arithmetic", TASK)
    eval_ds = task.build("eval", args.eval_prompts, 0)
    seeds = [args.seed + i for i in range(args.seeds)]
    results: list[dict] = []
    before: dict = {}
    for name in args.runs:
        for seed in seeds:
            row = train_one(args, name, seed, task, eval_ds, before)
            results.append(row)
            print(f"[train] {name:17s} seed {seed}  reward {row['reward_first_half']:.3f} -> "
                  f"{row['reward_last_half']:.3f}  length {row['length_last_half']:.1f}  "
                  f"KL {fmt(row['mismatch_kl'])}  acc {row['accuracy_after']:.3f}  ({row['seconds']:.0f} s)",
                  file=sys.stderr, flush=True)
            save({"runs": results, "complete": False})
    summary = []
    for name in args.runs:
        rows = [r for r in results if r["run"] == name]
        entry: dict = {"run": name, "seeds": [r["seed"] for r in rows],
                       "accuracy_per_seed": [r["accuracy_after"] for r in rows],
                       "length_last_step_per_seed": [r["length_last_step"] for r in rows]}
        for key in SUMMARY:
            values = [r[key] for r in rows if r[key] is not None]
            entry[key], entry[key + "_se"] = mean_se(values) if values else (None, None)
        summary.append(entry)
    return {"before": {k: {"accuracy": v["accuracy"], "n": v["n"]} for k, v in before.items()}, "seeds": seeds,
            "mask_truncated_completions": args.mask_truncated, "runs": results, "summary": summary,
            "complete": True}


def pm(mean, se) -> str:
    return "-" if mean is None else fmt(mean) + ("" if se is None else f" ± {fmt(se)}")


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2e}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.3f}"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("mismatch", "train", "both"), default="both")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=48, help="held-out prompts for the mismatch part")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--steps", type=int, default=10, help="GRPO steps per training run")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-prompts", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--seeds", type=int, default=1, help="training runs per arm, seeds --seed, --seed+1, ...")
    p.add_argument("--runs", type=lambda v: v.split(","), default=list(RUNS),
                   help=f"comma-separated training runs (default all: {','.join(RUNS)})")
    p.add_argument("--mask-truncated", action="store_true",
                   help="train with TRL's mask_truncated_completions: completions cut at the cap leave the loss")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        p.error(f"--runs: unknown {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    if args.seeds < 1:
        p.error("--seeds must be at least 1")

    import torch
    import transformers
    import trl

    from opd_plugins.paths import atomic_write

    t0 = time.monotonic()
    result: dict = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                    "threads": torch.get_num_threads(), "args": vars(args), "task": TASK}
    if args.part in ("mismatch", "both"):
        result["mismatch"] = rows = mismatch(args)
        print("\nflow          format       tokens  " + "  ".join(f"{k:>10s}" for k in STATS))
        for r in rows:
            print(f"{r['flow']:12s}  {r['format']:11s}  {r['tokens']:6d}  " + "  ".join(f"{fmt(r[k]):>10s}"
                                                                                  for k in STATS))
    if args.part in ("train", "both"):
        def save(partial: dict) -> None:
            if args.out:
                atomic_write(args.out, json.dumps({**result, "train": partial}, indent=2))

        result["train"] = runs = train_runs(args, save)
        print("\nbefore training: " + ", ".join(f"{k} {v['accuracy']:.3f} (n={v['n']})"
                                                for k, v in runs["before"].items())
              + f"; seeds {runs['seeds']}; mask_truncated_completions {args.mask_truncated}")
        print(f"{'run':18s}{'seed':>5s}{'reward 1st half':>16s}{'reward 2nd half':>16s}{'length 2nd half':>16s}"
              f"{'last step':>10s}{'mismatch_kl':>12s}{'acc after':>10s}{'train s':>8s}")
        for r in runs["runs"]:
            print(f"{r['run']:18s}{r['seed']:5d}{fmt(r['reward_first_half']):>16s}{fmt(r['reward_last_half']):>16s}"
                  f"{r['length_last_half']:16.1f}{r['length_last_step']:10.1f}{fmt(r['mismatch_kl']):>12s}"
                  f"{fmt(r['accuracy_after']):>10s}{r['train_s']:8.0f}")
        print(f"\nmean ± SE over {len(runs['seeds'])} seed(s)")
        print(f"{'run':18s}{'acc after':>18s}{'reward 2nd half':>18s}{'length 2nd half':>18s}{'mismatch_kl':>20s}"
              "  acc per seed")
        for e in runs["summary"]:
            print(f"{e['run']:18s}{pm(e['accuracy_after'], e['accuracy_after_se']):>18s}"
                  f"{pm(e['reward_last_half'], e['reward_last_half_se']):>18s}"
                  f"{pm(e['length_last_half'], e['length_last_half_se']):>18s}"
                  f"{pm(e['mismatch_kl'], e['mismatch_kl_se']):>20s}  "
                  + " ".join(f"{a:.3f}" for a in e["accuracy_per_seed"]))
    result["total_s"] = time.monotonic() - t0
    print(f"total {result['total_s']:.0f} s")
    if args.out:
        atomic_write(args.out, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
