"""Plugin overhead: the same tiny-model GRPO configuration through plain TRL and through opd_plugins.

Step times are measured in one process, in interleaved rounds (TRL, OPD, OPD, TRL, ...), skipping each run's
first step (warm-up); the ratio of medians is the overhead. Both wall time and CPU time per step (the process's,
all threads: ``time.process_time``) are measured, since CPU time is steadier when the machine is not perfectly
quiet; each round (same seed for both trainers, so the same samples) gives one ratio, and their median and spread
are reported. Peak memory (max RSS) is measured in two separate child processes, one per trainer, so they do not
share a high-water mark.

    OMP_NUM_THREADS=2 python benchmarks/plugin_overhead.py [--rounds 10 --steps 10 --hidden 256 --layers 4]

``--paired N`` measures instead in lockstep: the two trainers take turns step by step (TRL step 1, OPD step 1,
TRL step 2, ...), each in its own process; a trainer holds the turn from the start of its step through its
logging until the start of its next one, so nothing of one trainer runs during the other's step. Each OPD step
is compared with the TRL step just before it, a fraction of a second apart, so the machine's drift in speed
between rounds (a virtual machine's CPU share and frequency, which made the round medians range from 285 to 452 ms)
falls out of the ratio. Reported: the median of the N - 1 paired ratios (the first pair is warm-up) with a 95% bootstrap interval,
in wall and CPU time.

    OMP_NUM_THREADS=2 python benchmarks/plugin_overhead.py --paired 200
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import random
import tempfile
import time

from _util import peak_rss_mib  # benchmarks/ is on sys.path when run as a script

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def reward(completion_ids, **kwargs):
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def build(kind: str, out: str, steps: int, hidden: int, layers: int, seed: int = 0, extra_callbacks: tuple = ()):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from opd_plugins.testing import build_tiny_model, build_tokenizer
    from opd_plugins.trainers import Components, OPDConfig, OPDTrainer

    tok = build_tokenizer()
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + {i + 3}?"}] for i in range(64)]})
    common = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=8, num_generations=4,
                  max_completion_length=32, learning_rate=1e-4, logging_steps=1, report_to="none",
                  save_strategy="no", bf16=False, use_cpu=True, seed=seed, disable_tqdm=True, loss_type="dapo",
                  # every completion is exactly max_completion_length tokens, so both trainers do the same work
                  generation_kwargs={"min_new_tokens": 32})
    times: list[tuple[float, float]] = []  # (wall s, CPU s) per optimizer step

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times.append((time.perf_counter() - self.t, time.process_time() - self.c))

    model = build_tiny_model(tok, seed=seed, hidden=hidden, layers=layers)
    if kind == "trl":
        tr = GRPOTrainer(model=model, reward_funcs=[reward], args=GRPOConfig(**common), train_dataset=ds,
                         processing_class=tok, callbacks=[*extra_callbacks, Timer()])
    else:
        comps = Components.build(advantage=("grpo", {"scale": "group"}), rollout="hf_generate", sampler="none",
                                 pg_weight=1.0)
        tr = OPDTrainer(model=model, reward_funcs=[reward], args=OPDConfig(**common), train_dataset=ds,
                        processing_class=tok, components=comps, callbacks=[*extra_callbacks, Timer()])
    return tr, times


class Turns:
    """Two trainers in two processes taking turns, one optimizer step each. A trainer waits for its turn at the
    start of each step and hands the turn over at the start of its next step (or at the end of its training), so
    its logging and data loading after a step happen before the other trainer's step begins. (Processes, not
    threads: two trainers in two threads of one process ran each step about twice as slowly.)"""

    def __init__(self, ctx=None) -> None:
        import multiprocessing

        ctx = ctx or multiprocessing.get_context("spawn")
        self.sems = (ctx.Semaphore(1), ctx.Semaphore(0))    # trainer 0 has the first turn
        self.done = ctx.Array("b", [0, 0])

    def callback(self, me: int):
        from transformers import TrainerCallback

        turns, started = self, [False]

        class Turn(TrainerCallback):
            # Callbacks run in registration order and build() registers the Timer after this one, so the wait
            # for the turn is not timed.
            def on_step_begin(self, args, state, control, **kw):
                if started[0]:
                    turns.sems[1 - me].release()
                started[0] = True
                while not turns.sems[me].acquire(timeout=0.05):
                    if turns.done[1 - me]:
                        return

            def on_train_end(self, args, state, control, **kw):
                turns.done[me] = 1
                turns.sems[1 - me].release()

        return Turn()


def paired_child(kind: str, me: int, turns: Turns, pairs: int, hidden: int, layers: int, seed: int, out) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    with tempfile.TemporaryDirectory() as d:
        tr, times = build(kind, d, pairs, hidden, layers, seed=seed, extra_callbacks=(turns.callback(me),))
        try:
            tr.train()
        except BaseException:
            turns.done[me] = 1              # a crash must not leave the other trainer waiting for its turn
            turns.sems[1 - me].release()
            raise
    out.put((kind, times))


def paired(pairs: int, hidden: int, layers: int, seed: int = 0) -> dict:
    """Both trainers in lockstep (:class:`Turns`), each in its own process; per-step (wall, CPU) times of each,
    step k of OPD right after step k of TRL."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    turns, out = Turns(ctx), ctx.Queue()
    procs = [ctx.Process(target=paired_child, args=(kind, i, turns, pairs, hidden, layers, seed, out))
             for i, kind in enumerate(("trl", "opd"))]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        kind, times = out.get(timeout=3600)
        results[kind] = times
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a paired trainer process exited with {p.exitcode}")
    return results


def paired_summary(times: dict, seed: int = 0, resamples: int = 2000) -> dict:
    """Median paired ratio OPD/TRL (step k against step k, the first pair left out) with a 95% bootstrap
    interval, for wall and CPU time."""
    trl, opd = times["trl"][1:], times["opd"][1:]
    n = min(len(trl), len(opd))
    rng = random.Random(seed)
    out: dict = {"pairs": n}
    for i, name in enumerate(("wall", "cpu")):
        ratios = [opd[k][i] / trl[k][i] for k in range(n)]
        boot = sorted(statistics.median(rng.choices(ratios, k=n)) for _ in range(resamples))
        out[name] = {"median_ratio": round(statistics.median(ratios), 4),
                     "ci95": [round(boot[int(0.025 * resamples)], 4), round(boot[int(0.975 * resamples) - 1], 4)],
                     "median_ms": {"trl": round(statistics.median(t[i] for t in trl) * 1000, 2),
                                   "opd": round(statistics.median(t[i] for t in opd) * 1000, 2)}}
    return out


def child(kind: str, steps: int, hidden: int, layers: int) -> None:
    with tempfile.TemporaryDirectory() as out:
        tr, times = build(kind, out, steps, hidden, layers)
        tr.train()
    print(json.dumps({"kind": kind, "max_rss_mib": peak_rss_mib(),
                      "median_step_s": statistics.median(t for t, _ in times[1:])}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--paired", type=int, metavar="N", help="N steps of each trainer in lockstep instead of rounds")
    ap.add_argument("--child", choices=["trl", "opd"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.steps, a.hidden, a.layers)
    if a.paired:
        if a.paired < 3:
            ap.error("--paired needs at least 3 steps (the first pair is warm-up)")
        result = paired_summary(paired(a.paired, a.hidden, a.layers))
        print(json.dumps({**result, "config": vars(a)}, indent=1))
        return None

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    per_kind: dict[str, list[tuple[float, float]]] = {"trl": [], "opd": []}
    ratios: dict[str, list[float]] = {"wall": [], "cpu": []}
    with tempfile.TemporaryDirectory() as out:
        for r in range(a.rounds):
            order = ("trl", "opd") if r % 2 == 0 else ("opd", "trl")
            medians = {}
            for kind in order:
                tr, times = build(kind, out, a.steps, a.hidden, a.layers, seed=r)
                tr.train()
                per_kind[kind] += times[1:]
                medians[kind] = (statistics.median(t for t, _ in times[1:]), statistics.median(c for _, c in times[1:]))
                print(f"round {r} {kind}: median {medians[kind][0] * 1000:.1f} ms/step wall, "
                      f"{medians[kind][1] * 1000:.1f} ms/step CPU", flush=True)
            ratios["wall"].append(medians["opd"][0] / medians["trl"][0])
            ratios["cpu"].append(medians["opd"][1] / medians["trl"][1])
    med = {k: (statistics.median(t for t, _ in v), statistics.median(c for _, c in v)) for k, v in per_kind.items()}
    mem = {}
    for kind in ("trl", "opd"):
        res = subprocess.run([sys.executable, __file__, "--child", kind, "--steps", str(a.steps), "--hidden",
                              str(a.hidden), "--layers", str(a.layers)], capture_output=True, text=True, check=True)
        mem[kind] = json.loads(res.stdout.strip().splitlines()[-1])["max_rss_mib"]

    def spread(values: list[float]) -> dict[str, float]:
        q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
        return {"median": round(statistics.median(values), 4), "q1": round(q[0], 4), "q3": round(q[2], 4),
                "min": round(min(values), 4), "max": round(max(values), 4)}

    result = {
        "steps_measured": {k: len(v) for k, v in per_kind.items()},
        "median_step_ms": {k: {"wall": round(v[0] * 1000, 2), "cpu": round(v[1] * 1000, 2)} for k, v in med.items()},
        "ratio_opd_over_trl": {"wall": round(med["opd"][0] / med["trl"][0], 4),
                               "cpu": round(med["opd"][1] / med["trl"][1], 4)},
        "per_round_ratio": {k: spread(v) for k, v in ratios.items()},
        "max_rss_mib": {k: round(v, 1) for k, v in mem.items()},
        "config": vars(a), "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
