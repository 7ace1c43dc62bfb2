"""Offline OPD (offline_cache + replay) against a live teacher: step time and peak memory.

One rollout set (arithmetic prompts with worked-answer completions) is precomputed once with the teacher; then
three training configurations run, each in its own child process (so max RSS is that configuration's alone):

* ``offline``     — rollout ``replay`` + teacher ``offline_cache``: no teacher model, no generation;
* ``live_replay`` — rollout ``replay`` + teacher ``hf_model``: the same replayed rollouts, teacher scored live
  (isolates the cost of the teacher);
* ``live``        — rollout ``hf_generate`` + teacher ``hf_model``: standard on-policy distillation.

Student and teacher default to SmolLM2-135M-Instruct (the ``smollm2-135m-instruct`` alias; LoRA on the student,
as the CPU recipes do); ``--tiny`` uses in-process tiny models instead. Step time is the median over steps after
the first, in wall-clock seconds and in the process's CPU seconds (``time.process_time``, all threads: steadier
than wall time on a shared machine); memory is each child's max RSS.

    OMP_NUM_THREADS=2 python benchmarks/offline_vs_live.py [--steps 4 --prompts 8 --completions 4] [--tiny]
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

from _util import peak_rss_mib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODES = ("offline", "live_replay", "live")


def plugin_manager():
    from opd_plugins.manager import get_plugin_manager
    from opd_plugins.registry import PluginInfo
    from opd_plugins.rollout.replay import ReplayRollout
    from opd_plugins.teachers.offline_cache import OfflineCacheTeacher

    pm = get_plugin_manager()
    for cls in (OfflineCacheTeacher, ReplayRollout):  # a no-op once opd_plugins registers them itself
        pm.registry.register(cls, PluginInfo("benchmarks.offline_vs_live", __name__))
    return pm


def write_rollouts(path: str, prompts: int, completions: int) -> None:
    import random

    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(prompts):
            a, b = 2 + i % 8, 3 + (i * 7) % 9
            question = f"What is {a} times {b}? Think step by step."
            for j in range(completions):
                steps = " ".join(f"{a} times {k} is {a * k}." for k in range(1, rng.randint(2, b) + 1))
                f.write(json.dumps({"prompt": [{"role": "user", "content": question}],
                                    "completion": f"Let us count. {steps} So {a} times {b} is {a * b}."}) + "\n")


def recipe(a: argparse.Namespace, model: str, teacher: str, rollouts: str, out: str):
    from opd_plugins.recipe.loader import validate_recipe

    raw = {"model": {"name_or_path": model}, "data": {"dataset": {"path": rollouts}},
           "trainer": {"args": {"max_completion_length": a.max_completion_length, "temperature": 1.0}},
           "teacher": {"name": "hf_model", "params": {"model": teacher}},
           "divergence": {"name": "reverse_kl", "params": {"estimator": "sampled"}},
           "objective": {"policy_gradient": 0.0, "divergence": 1.0}, "output_dir": out}
    return validate_recipe(raw, pm=plugin_manager())


def child(a: argparse.Namespace) -> None:
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    pm = plugin_manager()
    if a.child == "precompute":
        from opd_plugins.precompute import precompute_teacher

        r, pm = recipe(a, a.model, a.teacher, a.rollouts, os.path.join(a.work, "unused"))
        t0 = time.perf_counter()
        m = precompute_teacher(r, pm, rollouts=a.rollouts, out_dir=a.cache, top_k=a.top_k, progress=False)
        print(json.dumps({"mode": "precompute", "seconds": time.perf_counter() - t0,
                          "rows": m["data"]["num_rows"], "completion_tokens": m["data"]["num_completion_tokens"],
                          "cache_mib": sum(os.path.getsize(os.path.join(a.cache, f)) for f in os.listdir(a.cache)) / 2**20,
                          "max_rss_mib": peak_rss_mib()}))
        return

    from peft import LoraConfig

    from opd_plugins.data.loading import DatasetSource, load_source
    from opd_plugins.models import load_causal_lm, load_tokenizer
    from opd_plugins.trainers import Components, OPDConfig, OPDTrainer

    teacher = {"offline": ("offline_cache", {"path": a.cache, "teacher": a.teacher}),
               "live_replay": ("hf_model", {"model": a.teacher}), "live": ("hf_model", {"model": a.teacher})}[a.child]
    rollout = ("hf_generate", {}) if a.child == "live" else ("replay", {"path": a.cache})
    comps = Components.build(pm, teacher=teacher, rollout=rollout, divergence=("reverse_kl", {"estimator": "sampled"}),
                             pg_weight=0.0, div_weight=1.0)
    tok = load_tokenizer(a.model)
    model = load_causal_lm(a.model, tokenizer=tok)
    times: list[float] = []
    cpu: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)
            cpu.append(time.process_time() - self.c)

    args = OPDConfig(output_dir=os.path.join(a.work, a.child), max_steps=a.steps, per_device_train_batch_size=a.batch,
                     num_generations=a.completions, max_completion_length=a.max_completion_length, temperature=1.0,
                     learning_rate=1e-4, logging_steps=1, report_to="none", save_strategy="no", bf16=False,
                     use_cpu=True, seed=0, disable_tqdm=True)
    peft = None if a.tiny else LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    tr = OPDTrainer(model=model, args=args, components=comps, train_dataset=load_source(DatasetSource(path=a.rollouts)),
                    processing_class=tok, peft_config=peft, plugin_manager=pm, callbacks=[Timer()])
    tr.train()
    logs = [h for h in tr.state.log_history if "opd/divergence" in h]
    teacher_mib = 0.0
    if getattr(comps.teacher, "model", None) is not None:
        teacher_mib = sum(p.numel() * p.element_size() for p in comps.teacher.model.parameters()) / 2**20
    print(json.dumps({"mode": a.child, "median_step_s": statistics.median(times[1:]), "steps": len(times),
                      "median_step_cpu_s": statistics.median(cpu[1:]),
                      "max_rss_mib": peak_rss_mib(),
                      "rss_after_training_mib": current_rss_mib(), "teacher_weights_mib": teacher_mib,
                      "mean_completion_tokens": statistics.mean(h["completions/mean_length"] for h in logs)}))


def current_rss_mib() -> float:
    """Resident memory now (VmRSS), while every model of the run is still loaded."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def run_child(a: argparse.Namespace, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--model", a.model, "--teacher", a.teacher, "--work", a.work,
           "--rollouts", a.rollouts, "--cache", a.cache, "--steps", str(a.steps), "--batch", str(a.batch),
           "--completions", str(a.completions), "--max-completion-length", str(a.max_completion_length),
           "--top-k", str(a.top_k), *(["--tiny"] if a.tiny else [])]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"child {mode} failed:\n{res.stderr[-4000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--completions", type=int, default=4, help="cached completions per prompt = num_generations")
    ap.add_argument("--batch", type=int, default=8, help="per_device_train_batch_size (completions per step)")
    ap.add_argument("--max-completion-length", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="tiny in-process models instead of SmolLM2 (no LoRA)")
    for hidden in ("--child", "--model", "--teacher", "--work", "--rollouts", "--cache"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    with tempfile.TemporaryDirectory() as work:
        a.work, a.rollouts, a.cache = work, os.path.join(work, "rollouts.jsonl"), os.path.join(work, "cache")
        if a.tiny:
            from opd_plugins.testing import build_tokenizer, save_tiny_model

            tok = build_tokenizer()
            a.model = str(save_tiny_model(os.path.join(work, "student"), seed=0, hidden=256, layers=4, tokenizer=tok))
            a.teacher = str(save_tiny_model(os.path.join(work, "teacher"), seed=1, hidden=512, layers=8, tokenizer=tok))
        else:
            from opd_plugins.models import SMOLLM2_ALIAS, ensure_smollm2

            ensure_smollm2()
            a.model = a.teacher = SMOLLM2_ALIAS
        write_rollouts(a.rollouts, a.prompts, a.completions)
        t0 = time.perf_counter()
        results = {"precompute": run_child(a, "precompute")}
        for mode in MODES:
            results[mode] = run_child(a, mode)
    off, rep, live = (results[m] for m in MODES)
    summary = {
        "models": "tiny Qwen2 (student hidden 256 x 4 layers, teacher 512 x 8)" if a.tiny else "SmolLM2-135M-Instruct student (LoRA) and teacher",
        "median_step_s": {m: round(results[m]["median_step_s"], 3) for m in MODES},
        "speedup_vs_live": round(live["median_step_s"] / off["median_step_s"], 2),
        "speedup_vs_live_replay": round(rep["median_step_s"] / off["median_step_s"], 2),
        "median_step_cpu_s": {m: round(results[m]["median_step_cpu_s"], 3) for m in MODES},
        "cpu_speedup_vs_live": round(live["median_step_cpu_s"] / off["median_step_cpu_s"], 2),
        "cpu_speedup_vs_live_replay": round(rep["median_step_cpu_s"] / off["median_step_cpu_s"], 2),
        "max_rss_mib": {m: round(results[m]["max_rss_mib"]) for m in ("precompute", *MODES)},
        "rss_after_training_mib": {m: round(results[m]["rss_after_training_mib"]) for m in MODES},
        "max_rss_saved_vs_live_replay_mib": round(rep["max_rss_mib"] - off["max_rss_mib"]),
        "rss_after_saved_vs_live_replay_mib": round(rep["rss_after_training_mib"] - off["rss_after_training_mib"]),
        "teacher_weights_mib": round(rep["teacher_weights_mib"]),
        "mean_completion_tokens": {m: round(results[m]["mean_completion_tokens"], 1) for m in MODES},
        "precompute": {k: round(v, 2) if isinstance(v, float) else v for k, v in results["precompute"].items()
                       if k != "mode"},
        "wall_s": round(time.perf_counter() - t0), "config": {k: v for k, v in vars(a).items()
                                                              if k in ("steps", "prompts", "completions", "batch",
                                                                       "max_completion_length", "top_k", "tiny")},
        "threads": os.environ.get("OMP_NUM_THREADS"),
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
