r"""OPD training steps on one GPU: step time and peak memory of the Qwen3 OPD recipes against the memory model.

Random-weight models are built in-process (no download) from the memory model's Qwen3 configs
(``benchmarks/memory_model.py``'s ``MODEL_CONFIGS``: the student Qwen3-1.7B, the teacher Qwen3-8B), in bfloat16,
and saved with a local tokenizer (the test kit's ``build_tokenizer``; the models keep Qwen3's 151,936-token
vocabulary, which covers it) to a temporary directory. Each arm then builds the project's own ``OPDTrainer`` from a
shipped recipe, as ``opd-plugins train`` does (``load_recipe`` with overrides pointing ``model.name_or_path`` and
the ``hf_model`` teacher at those directories, ``Components.from_recipe``, ``runs.opd.build_trainer``), on a
synthetic dataset of prompts of ``--prompt-len`` tokens, and trains ``--warmup`` + ``--steps`` optimizer steps:

* ``lora``: ``recipes/qwen3/opd_1p7b_from_8b_lora.yaml`` (LoRA r 64 on all linears, reverse KL over the full
  vocabulary, the teacher scoring each micro-batch in the loss);
* ``lora_fused``: the same with ``divergence.params.fused_lm_head: true``;
* ``full``: ``recipes/qwen3/opd_1p7b_from_8b_full.yaml`` (full fine-tune), run only when the memory model predicts
  that it fits the GPU with ``--headroom`` (10%) of it left (else the row says ``skipped: predicted X GiB``).

Batch and lengths are the recipes' (per-device batch 8, 4 accumulation steps: 32 completions of 1,024 tokens per
step), or ``--batch`` / ``--completion-len``. Random weights generate garbage; ``generation_kwargs: {min_new_tokens:
T}`` makes every completion exactly T tokens long, so every step does the same work and the memory model's
"every completion at max_completion_length" holds. Per arm: ``step_s``, the median wall time of the timed steps
(``on_step_begin`` to ``on_step_end``, ``torch.cuda.synchronize`` on both sides: generation, teacher scoring, the
micro-batches and the optimizer step); ``tok/s``, the completion tokens of one step (generation batch × T) over
``step_s``; ``peak_gib``, ``torch.cuda.max_memory_allocated`` over the whole arm (trainer build included, minus
what was allocated before it); ``reserved_gib``, the caching allocator's peak reservation; ``pred_gib``, the
memory model's per-GPU total for the same settings on one GPU (``memory_model.estimate(..., "ddp", 1)``: one
process, no DDP wrapper; prompt length as built here); ``meas/pred`` = ``peak_gib / pred_gib``. Neither the CUDA
context nor the allocator's cache is in either number.

Arms stop being started, and an arm stops taking timed steps, once ``--time-budget-s`` is nearly spent (the skipped
ones are listed), so the default run stays under 8 minutes on one H200.

The GPU machine has torch, transformers, peft and accelerate, but not ``trl``, ``datasets`` or ``pydantic``, which
``opd_plugins`` imports: carry their wheels (docs/fp8.md's last paragraph names pydantic's). Where pip works, in the
repository root (``.whl/`` listed in ``.git/info/exclude``; the versions are the project's venv's)::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 pydantic-core==2.50.5 \
        annotated-types==0.8.0 typing-inspection==0.4.5

and on the GPU machine, from the repository root with ``.whl`` carried (the project needs transformers >= 5 and
peft >= 0.17, pyproject.toml: carry those too if the machine's are older)::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu/opd_step.py --out opd_step.json [--arms lora,lora_fused,full
                                                             --batch 8 --completion-len 1024 --steps 2]
    python3 benchmarks/gpu/opd_step.py --cpu-smoke        # tiny configs on CPU: checks the code path only
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository, if opd_plugins is not installed
sys.path.insert(0, str(ROOT / "benchmarks"))

import memory_model  # noqa: E402
from _util import peak_rss_mib  # noqa: E402
from fp8_rollout import fmt_cell, sync  # noqa: E402

GiB = memory_model.GiB
LORA_RECIPE = "recipes/qwen3/opd_1p7b_from_8b_lora.yaml"
ARMS = {  # arm: (recipe, its overrides)
    "lora": (LORA_RECIPE, []),
    "lora_fused": (LORA_RECIPE, ["divergence.params.fused_lm_head=true"]),
    "full": ("recipes/qwen3/opd_1p7b_from_8b_full.yaml", []),
}
TINY = {  # --cpu-smoke: what stands in for each of the recipes' models
    "Qwen/Qwen3-1.7B": memory_model.ModelConfig("tiny-student", 64, 2, 4, 2, 16, 128, 512, True),
    "Qwen/Qwen3-8B": memory_model.ModelConfig("tiny-teacher", 96, 2, 4, 2, 16, 192, 512, False),
}
SMOKE_SETTINGS = ["model.dtype=float32", "teacher.params.dtype=float32", "trainer.args.bf16=false",
                  "trainer.args.per_device_train_batch_size=2", "trainer.args.gradient_accumulation_steps=2",
                  "trainer.args.num_generations=2", "trainer.args.max_completion_length=8"]
COLUMNS = [("arm", 10), ("batch", 5), ("gen_batch", 9), ("prompt", 6), ("T", 5), ("steps", 5), ("step_s", 8),
           ("tok/s", 8), ("peak_gib", 8), ("reserved_gib", 12), ("pred_gib", 8), ("meas/pred", 9), ("pred_phase", 10)]


def save_random_model(m, directory: Path, tokenizer, dtype, device, seed: int) -> int:
    """A random-weight causal LM with ``m``'s shapes (``AutoModelForCausalLM.from_config``), saved to ``directory``
    with ``tokenizer``; returns its parameter count. Built on ``device`` (fast random init), then freed."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = memory_model.transformers_config(m, max_position_embeddings=40960, pad_token_id=tokenizer.pad_token_id,
                                           eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    n = sum(p.numel() for p in model.parameters())
    del model
    free(device)
    return n


def free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prompt_dataset(tokenizer, n: int, target: int):
    """``n`` conversational prompts of at most ``target`` tokens in the chat template (as TRL tokenizes them), and
    the longest one's length. Each carries an ``answer`` for the recipes' ``numeric_answer`` reward."""
    from datasets import Dataset

    def length(content: str) -> int:
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    filler = " ".join(str(7 * j % 100) for j in range(4 * target))
    prompts, longest = [], 0
    for i in range(n):
        head = f"What is {i} + {i}? "
        lo, hi = 0, len(filler)  # the longest filler prefix that keeps the prompt within target tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if length(head + filler[:mid]) <= target else (lo, mid - 1)
        prompts.append(head + filler[:lo])
        longest = max(longest, length(prompts[-1]))
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts],
                              "answer": [f"#### {2 * i}" for i in range(n)]})
    return data, longest


def step_timer(device, warmup: int, left):
    """A ``TrainerCallback`` timing each optimizer step (synchronised) and stopping the arm once the next step
    would overrun the time budget (``left()`` seconds), keeping at least one timed step."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.peaks_gib: list[float] = []
            self.stopped_early = False

        def on_step_begin(self, args, state, control, **kwargs):
            sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.times.append(time.perf_counter() - self.start)
            if device.type == "cuda":
                self.peaks_gib.append(torch.cuda.max_memory_allocated(device) / GiB)
            if len(self.times) > warmup and left() < 1.2 * self.times[-1] and state.global_step < state.max_steps:
                control.should_training_stop = self.stopped_early = True

    return StepTimer()


def run_arm(recipe_path: str, overrides: list[str], data, device, warmup: int, left) -> dict:
    """Build the recipe's ``OPDTrainer`` as ``opd-plugins train`` does, train it, and return the measurements."""
    import torch
    from transformers import set_seed

    from opd_plugins.recipe.loader import load_recipe
    from opd_plugins.runs.opd import build_config, build_trainer
    from opd_plugins.trainers import Components

    recipe, pm = load_recipe(ROOT / recipe_path, overrides)
    set_seed(recipe.seed)
    built = recipe.take_components() or {}
    components = Components.from_recipe(recipe, pm, built=built or None)
    config = build_config(recipe, components.rollout)
    free(device)
    start_bytes = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    t = time.monotonic()
    trainer = build_trainer(recipe, pm, train_dataset=data, task=built.get("task"), config=config,
                            components=components)
    timer = step_timer(device, warmup, left)
    trainer.add_callback(timer)
    setup_s = time.monotonic() - t
    try:
        trainer.train()
    finally:
        trainer.close_components()
    out = {"setup_s": setup_s, "step_times_s": timer.times, "stopped_early": timer.stopped_early,
           "start_gib": start_bytes / GiB}
    if device.type == "cuda":
        out["peak_gib"] = (torch.cuda.max_memory_allocated(device) - start_bytes) / GiB
        out["reserved_gib"] = torch.cuda.max_memory_reserved(device) / GiB
        out["peak_after_step_gib"] = [p - start_bytes / GiB for p in timer.peaks_gib]
        out["memory_source"] = "torch.cuda.max_memory_allocated"
    else:  # CPU: the process's peak RSS so far, runtime and libraries included (a code-path check only)
        out["peak_gib"] = peak_rss_mib() / 1024
        out["memory_source"] = "peak RSS of the process (CPU)"
    del trainer, components, built, recipe
    free(device)
    return out


def predict(recipe_path: str, settings: list[str], prompt_len: int, shapes: dict | None):
    """The memory model's one-GPU row for the recipe with ``settings`` (``shapes``: stand-ins for its models)."""
    s = memory_model.read_recipe(str(ROOT / recipe_path), prompt_len, settings)
    if shapes:
        s = dataclasses.replace(s, model=shapes[s.model.name], teacher_model=shapes[s.teacher_model.name])
    return s, memory_model.estimate(s, "ddp", 1)


def print_table(rows: list[dict]) -> None:
    print("  ".join(name.ljust(w) if i < 1 else name.rjust(w) for i, (name, w) in enumerate(COLUMNS)))
    keys = {"tok/s": "tokens_per_s", "meas/pred": "ratio"}
    for r in rows:
        note = r.get("skipped") or r.get("error")
        cells = [note if name == "step_s" and note else r.get(keys.get(name, name)) for name, _ in COLUMNS]
        print("  ".join(fmt_cell(c, w) for c, (_, w) in zip(cells, COLUMNS)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {list(ARMS)}")
    p.add_argument("--batch", type=int, help="per_device_train_batch_size (default: the recipe's)")
    p.add_argument("--completion-len", type=int, help="max_completion_length = every completion's length "
                                                      "(default: the recipe's)")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens (the memory model's default)")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps per arm")
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps per arm (median)")
    p.add_argument("--headroom", type=float, default=0.10,
                   help="an arm runs when its prediction is at most (1 - headroom) x the GPU's memory")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget-s", type=float, default=420.0)
    p.add_argument("--workdir", help="where the random models are saved (default: a temporary directory, removed)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny configs on CPU in float32, batch 2, 8 tokens, "
                                                            "1 + 1 steps")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)

    import torch
    import transformers

    from opd_plugins.testing import build_tokenizer

    arms = args.arms.split(",")
    if set(arms) - set(ARMS):
        p.error(f"unknown --arms {sorted(set(arms) - set(ARMS))}; choose from {list(ARMS)}")
    settings = list(SMOKE_SETTINGS) if args.cpu_smoke else []
    if args.cpu_smoke:
        args.device, args.prompt_len, args.warmup, args.steps = "cpu", 24, 1, 1
    if args.batch:
        settings.append(f"trainer.args.per_device_train_batch_size={args.batch}")
    if args.completion_len:
        settings.append(f"trainer.args.max_completion_length={args.completion_len}")
    device = torch.device(args.device)
    name, capacity_gib = "cpu", 139.0  # --cpu-smoke: the arms are checked against the H200's memory
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA GPU here: run with --cpu-smoke to check the code path on CPU", file=sys.stderr)
            return 2
        name = torch.cuda.get_device_name(device)
        capacity_gib = torch.cuda.get_device_properties(device).total_memory / GiB
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    shapes = TINY if args.cpu_smoke else None

    t0 = time.monotonic()
    left = lambda: args.time_budget_s - (time.monotonic() - t0)  # noqa: E731
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="opd_step_"))
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 1 << 17  # prompt + completion, not truncated
    data, prompt_len = prompt_dataset(tokenizer, 64, args.prompt_len)
    rows, skipped, models = [], [], {}
    try:
        # the models every arm uses (the recipes share student and teacher), each built and saved once
        dirs = {}
        for arm in arms:
            s, _ = predict(ARMS[arm][0], settings, prompt_len, shapes)
            for m in (s.model, s.teacher_model):
                if m.name not in dirs:
                    t = time.monotonic()
                    dirs[m.name] = workdir / m.name.replace("/", "_")
                    n = save_random_model(m, dirs[m.name], tokenizer, dtype, device, args.seed + len(dirs))
                    models[m.name] = {"params_b": n / 1e9, "build_and_save_s": time.monotonic() - t}
        print(f"device: {name} ({capacity_gib:.0f} GiB), torch {torch.__version__}, transformers "
              f"{transformers.__version__}; prompt {prompt_len} tokens; models built and saved in "
              f"{time.monotonic() - t0:.0f} s", flush=True)

        cost: dict[str, float] = {}  # the previous arm's setup and step times: what the next one needs
        for arm in arms:
            recipe_path, arm_settings = ARMS[arm]
            s, pred = predict(recipe_path, [*arm_settings, *settings], prompt_len, shapes)
            T = s.max_completion_length
            row = {"arm": arm, "recipe": Path(recipe_path).stem, "batch": s.per_device_train_batch_size,
                   "gen_batch": memory_model.gen_batch_per_device(s, 1), "prompt": prompt_len, "T": T,
                   "pred_gib": pred.total / GiB, "pred_phase": pred.peak_phase, "pred_train_gib": pred.train / GiB,
                   "pred_gen_gib": pred.gen / GiB, "pred_components_gib": {k: v / GiB for k, v in
                                                                            pred.components.items()}}
            rows.append(row)
            if memory_model.fits_in(pred.total, (capacity_gib,), args.headroom) is None:
                row["skipped"] = f"skipped: predicted {pred.total / GiB:.1f} GiB"
                skipped.append(f"{arm}: predicted {pred.total / GiB:.1f} GiB > {1 - args.headroom:.0%} of "
                               f"{capacity_gib:.0f} GiB")
                continue
            need = cost.get("setup_s", 0) + 1.2 * (args.warmup + 1) * cost.get("step_s", 0)
            if left() < need + 5:
                row["skipped"] = "time budget"
                skipped.append(f"{arm}: time budget ({left():.0f} s left, about {need:.0f} s needed)")
                continue
            overrides = [*arm_settings, *settings, f"model.name_or_path={dirs[s.model.name]}",
                         f"teacher.params.model={dirs[s.teacher_model.name]}", f"output_dir={workdir / arm}",
                         f"trainer.args.max_steps={args.warmup + args.steps}", "trainer.args.save_strategy='no'",
                         "trainer.args.report_to=none", f"trainer.args.generation_kwargs={{min_new_tokens: {T}}}"]
            t = time.monotonic()
            try:
                row.update(run_arm(recipe_path, overrides, data, device, args.warmup, left))
            except Exception as exc:  # OOM or a failure in one arm: report it, go on with the others
                oom = isinstance(exc, torch.cuda.OutOfMemoryError)
                row["error"] = "OOM" if oom else type(exc).__name__
                row["detail"] = str(exc)[:300]
            if "error" in row:
                free(device)  # here, once the exception (and the trainer its traceback holds) is gone
                continue
            timed = row["step_times_s"][args.warmup:]
            row["steps"] = len(timed)
            if timed:
                row["step_s"] = statistics.median(timed)
                row["tokens_per_s"] = row["gen_batch"] * T / row["step_s"]
                cost = {"setup_s": row["setup_s"], "step_s": max(row["step_times_s"])}
            row["ratio"] = row["peak_gib"] / row["pred_gib"]
            if row["stopped_early"]:
                skipped.append(f"{arm}: {args.steps - len(timed)} timed step(s), time budget")
            print(f"[{time.monotonic() - t0:.0f} s] {arm}: {time.monotonic() - t:.0f} s, step "
                  f"{fmt_cell(row.get('step_s'), 0)} s, peak {row['peak_gib']:.2f} GiB", file=sys.stderr, flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print_table(rows)
    for r in rows:
        if "detail" in r:
            print(f"{r['arm']}: {r['detail']}")
    for s_ in skipped:
        print(f"skipped {s_}")
    source = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "the process's peak RSS (CPU)"
    print(f"total {time.monotonic() - t0:.1f} s; peak_gib: {source}; pred_gib: benchmarks/memory_model.py, "
          "engine ddp, 1 GPU")
    if args.out:
        result = {"device": name, "capacity_gib": capacity_gib, "torch": torch.__version__,
                  "transformers": transformers.__version__, "args": vars(args), "settings": settings,
                  "prompt_len": prompt_len, "models": models, "rows": rows, "skipped": skipped}
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
