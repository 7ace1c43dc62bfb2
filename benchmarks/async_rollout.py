"""Asynchronous rollouts (``rollout: async``) against synchronous generation with the same private copy of the
policy: correctness (the same prompts in the same order, nothing lost or used twice, staleness histogram, drops)
and step time with and without the overlap.

Both arms train GRPO with LoRA on the same prompts, seed and settings; the synchronous arm samples with
``perturbed_hf`` (``noise_std: 0``: an exact private copy, as the async backend's default), the asynchronous one
wraps the same backend in ``async {max_staleness: 1, ahead: 1}``. Each arm runs in its own process, one after the
other, on the same machine; the first optimizer step (warm-up) is left out of the step times. Wall time and
process CPU time (all threads) per step are reported: on 2 cores the producer thread and the trainer share the
same cores, which bounds what overlap can give.

    OMP_NUM_THREADS=2 python benchmarks/async_rollout.py [--model smollm2-135m-instruct --steps 10
                                                          --batch 8 --completion 64]
    python benchmarks/async_rollout.py --quick          # tiny random model, a smoke test (~1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

ARMS = {
    "sync": {"name": "perturbed_hf"},
    "async": {"name": "async", "params": {"backend": {"name": "perturbed_hf"}, "max_staleness": 1, "ahead": 1}},
}


def reward(completion_ids, **kwargs):
    """Fraction of even token ids: a dense reward every model can move."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def child(args: argparse.Namespace) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import TrainerCallback

    from opd_plugins.trainers import Components, OPDConfig, OPDTrainer

    torch.manual_seed(0)
    if args.quick or args.tiny:
        from opd_plugins.testing import build_tiny_model, build_tokenizer

        tok = build_tokenizer()
        model = build_tiny_model(tok, seed=0, hidden=64, layers=2)
    else:
        from opd_plugins.models import load_causal_lm, load_tokenizer

        tok = load_tokenizer(args.model)
        model = load_causal_lm(args.model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + {i + 3}?"}] for i in range(256)]})
    times: list[tuple[float, float]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            times.append((time.perf_counter() - self.t, time.process_time() - self.c))

    with tempfile.TemporaryDirectory() as out:
        config = OPDConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                           num_generations=4, max_completion_length=args.completion, learning_rate=1e-4,
                           logging_steps=1, report_to="none", save_strategy="no", bf16=False, use_cpu=True, seed=0,
                           disable_tqdm=True, temperature=0.7, generation_kwargs={"min_new_tokens": args.completion})
        spec = ARMS[args.arm]
        comps = Components.build(pg_weight=1.0, rollout=(spec["name"], spec.get("params", {})), correction="tis")
        tr = OPDTrainer(model=model, args=config, components=comps, reward_funcs=[reward], train_dataset=ds,
                        processing_class=tok, callbacks=[Timer()])
        order: list[list[str]] = []
        generate = tr._generate_and_score_completions
        tr._generate_and_score_completions = lambda inputs: order.append(
            [str(r["prompt"]) for r in inputs]) or generate(inputs)
        tr.train()
        tr.close_components()
    backend = comps.rollout
    steady = times[1:] or times
    result = {"arm": args.arm, "steps": len(times), "median_step_s": statistics.median(t for t, _ in steady),
              "median_cpu_s": statistics.median(c for _, c in steady),
              "step_s": [round(t, 3) for t, _ in times], "order": order}
    if args.arm == "async":
        result.update(counts=backend.counts, staleness_histogram=backend.histogram())
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8, help="per_device_train_batch_size (completions per step)")
    ap.add_argument("--completion", type=int, default=64, help="completion tokens (every completion is this long)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of --model")
    ap.add_argument("--quick", action="store_true", help="tiny random model, 3 steps: a smoke test")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.batch, args.completion = 3, 4, 8
    if args.arm:
        return child(args)
    results = {}
    for arm in ARMS:
        cmd = [sys.executable, __file__, "--arm", arm, "--model", args.model, "--steps", str(args.steps), "--batch",
               str(args.batch), "--completion", str(args.completion), *(["--quick"] if args.quick else []),
               *(["--tiny"] if args.tiny else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{arm}: exit {proc.returncode}: {proc.stderr.strip()[-800:]}")
        results[arm] = json.loads(proc.stdout.strip().splitlines()[-1])
    sync, async_ = results["sync"], results["async"]
    same_order = sync.pop("order") == async_.pop("order")
    summary = {"settings": {k: getattr(args, k) for k in ("model", "steps", "batch", "completion", "quick", "tiny")},
               "same_prompts_same_order": same_order,
               "speedup_wall": sync["median_step_s"] / async_["median_step_s"],
               "cpu_ratio": async_["median_cpu_s"] / sync["median_cpu_s"], "arms": results}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    print("\n| arm | steps | median step s (wall) | median step s (CPU) | hits / misses / dropped | staleness histogram |")
    print("|---|---|---|---|---|---|")
    for arm, r in results.items():
        c = r.get("counts", {})
        counts = f"{c.get('hits', '–')} / {c.get('misses', '–')} / {c.get('dropped', '–')}" if c else "–"
        print(f"| {arm} | {r['steps']} | {r['median_step_s']:.2f} | {r['median_cpu_s']:.2f} | {counts} "
              f"| {r.get('staleness_histogram', '–')} |")
    print(f"\nsame prompts in the same order: {same_order}; wall-time speedup {summary['speedup_wall']:.2f}x, "
          f"CPU time ratio (async / sync) {summary['cpu_ratio']:.2f}")


if __name__ == "__main__":
    main()
