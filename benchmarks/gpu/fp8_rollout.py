"""FP8 rollout copy vs bfloat16: ``model.generate`` throughput, weight-sync time and GPU memory, Qwen3 shapes.

Random-weight models are built in-process (no download) from Qwen3-0.6B / 1.7B / 8B shaped configs in bfloat16.
For each model the arms are:

* ``bf16``: the model itself;
* ``fp8_per_block`` / ``fp8_per_channel``: the ``fp8`` rollout backend's ``rollout_only`` copy, made by its own
  conversion path (``opd_plugins.rollout.fp8.build_fp8_copy``: a private copy, lm_head left in bf16), whose
  matmul kernel (``FP8Linear.kernel``: ``scaled_mm_blockwise``, ``scaled_mm_rowwise`` or ``dequant``) is reported.

Per (model, arm, batch size): new tokens/s of the backend's generation (``generate_with_logprobs``: sampling at
temperature 1 with the sampled tokens' log-probs recorded, as in training; prompt ``--prompt-len`` random tokens,
``min_new_tokens = max_new_tokens = --new-tokens`` so every row has the same length, one warm-up call,
CUDA-synchronised timing); ``weights_gib`` (the arm's own parameters and buffers) and ``peak_gib``
(``weights_gib`` + the rise of ``torch.cuda.max_memory_allocated`` during generation, the peak stats reset before
each call, so other arms' resident weights are not counted). Per FP8 arm: ``sync_ms``, the median time of the
backend's weight sync (``requantize_from_state(fp8_copy, effective_state(bf16_model))``), and two numerics checks
on a probe batch: ``err_vs_bf16`` (relative Frobenius error of the logits against the bf16 model) and
``err_vs_dequant`` (against the same FP8 copy with every layer forced onto the ``dequant`` path, i.e. fake
quantization: it measures what the real FP8 kernels and their activation quantization add; 0 when the kernel is
``dequant``). The GPU machine has no pydantic, which ``opd_plugins`` imports: carry its wheels (docs/fp8.md).

Measurements stop being added once ``--time-budget-s`` is nearly spent (the skipped ones are listed), so the
default run stays under 8 minutes on one H200::

    python benchmarks/gpu/fp8_rollout.py [--models 0.6B,1.7B,8B --batch-sizes 8,32,128 --out fp8.json]
    python benchmarks/gpu/fp8_rollout.py --cpu-smoke      # tiny config on CPU: checks the code path only
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, if opd_plugins is not installed

QWEN3 = {
    "0.6B": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True),
    "1.7B": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=6144, vocab_size=151936, tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False),
}
TINY = {"tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, intermediate_size=128, vocab_size=512, tie_word_embeddings=True)}
ARMS = ("bf16", "fp8_per_block", "fp8_per_channel")
COLUMNS = [("model", 6), ("arm", 16), ("kernel", 20), ("batch", 5), ("tok/s", 9), ("vs_bf16", 7), ("sync_ms", 8),
           ("weights_gib", 11), ("peak_gib", 8), ("err_vs_bf16", 11), ("err_vs_dequant", 14)]


def build_model(name: str, shape: dict, device, seed: int):
    import torch

    try:
        from transformers import Qwen3Config as Config
        from transformers import Qwen3ForCausalLM as Model
    except ImportError:  # older transformers: the same shapes as Qwen2 (no q/k norms)
        from transformers import Qwen2Config as Config
        from transformers import Qwen2ForCausalLM as Model
    cfg = Config(**shape, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Model(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    return model


def own_gib(model) -> float:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 2**30


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def kernels_of(model) -> str:
    from opd_plugins.rollout._fp8 import FP8Linear

    kinds = sorted({m.kernel for m in model.modules() if isinstance(m, FP8Linear)})
    return "+".join(kinds) if kinds else "-"


def set_kernel(model, request: str) -> None:
    from opd_plugins.rollout._fp8 import FP8Linear

    for m in model.modules():
        if isinstance(m, FP8Linear):
            m.kernel_request = request


class _Tokenizer:
    """What the backend's generation reads of a tokenizer (the random models have none)."""

    pad_token_id, eos_token_id = 0, 1


def generate_once(model, ids, new_tokens: int, device) -> float:
    """One timed call of the ``fp8`` backend's generation (sampled, behaviour log-probs recorded)."""
    from transformers import GenerationConfig

    from opd_plugins.context import SetupContext
    from opd_plugins.rollout._private_copy import generate_with_logprobs

    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, top_k=0,
                              top_p=1.0, pad_token_id=0, eos_token_id=1)
    ctx = SetupContext(model=model, tokenizer=_Tokenizer(), device=device, eos_token_ids=[1])
    sync(device)
    t = time.perf_counter()
    completions, logps = generate_with_logprobs(model, ctx, ids.tolist(), temperature=1.0, who="fp8", config=config)
    sync(device)
    elapsed = time.perf_counter() - t
    assert all(len(c) == len(lp) == new_tokens for c, lp in zip(completions, logps)), "rows of unequal length"
    return elapsed


def prepare_arm(arm: str, source, probe, device) -> tuple[object, dict]:
    """The arm's model and its one-off numbers (kernel, sync time, numerics checks)."""
    import torch

    from opd_plugins.rollout._fp8 import requantize_from_state
    from opd_plugins.rollout._private_copy import effective_state
    from opd_plugins.rollout.fp8 import FP8Rollout, build_fp8_copy

    if arm == "bf16":
        return source, {"kernel": "-", "sync_ms": None, "err_vs_bf16": 0.0, "err_vs_dequant": None}
    model = build_fp8_copy(source, FP8Rollout.Params(format=arm.removeprefix("fp8_")))
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    info: dict = {"kernel": kernels_of(model), "skipped": sorted(model.fp8_skipped)}
    with torch.no_grad():
        ref = source(probe).logits
        set_kernel(model, "dequant")
        dequant = model(probe).logits
        set_kernel(model, "auto")
        try:
            logits = model(probe).logits
        except Exception as exc:  # a kernel torch refuses on this GPU: report it, measure the dequant path
            info["kernel_error"] = f"{type(exc).__name__}: {exc}"[:300]
            set_kernel(model, "dequant")
            info["kernel"] = "dequant (kernel failed)"
            logits = dequant
    info["err_vs_bf16"], info["err_vs_dequant"] = rel_err(logits, ref), rel_err(logits, dequant)
    times = []
    for _ in range(3):
        sync(device)
        t = time.perf_counter()
        requantize_from_state(model, effective_state(source))
        sync(device)
        times.append(time.perf_counter() - t)
    info["sync_ms"] = 1e3 * statistics.median(times)
    return model, info


def measure(model, batch: int, args, device, vocab: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(args.seed + batch)
    ids = torch.randint(2, vocab, (batch, args.prompt_len), generator=g).to(device)
    generate_once(model, ids, min(8, args.new_tokens), device)  # warm-up
    row = {"batch": batch, "weights_gib": own_gib(model), "peak_gib": None}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = [generate_once(model, ids, args.new_tokens, device) for _ in range(args.repeats)]
    if device.type == "cuda":
        row["peak_gib"] = row["weights_gib"] + (torch.cuda.max_memory_allocated(device) - base) / 2**30
    row["seconds"] = statistics.median(times)
    row["tokens_per_s"] = batch * args.new_tokens / row["seconds"]
    return row


def fmt_cell(v, width: int) -> str:
    if v is None:
        s = "-"
    elif isinstance(v, float):
        s = f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}" if abs(v) < 1e4 else f"{v:.0f}"
    else:
        s = str(v)
    return s.rjust(width) if isinstance(v, (int, float)) else s.ljust(width)


def print_table(rows: list[dict]) -> None:
    print("  ".join(name.ljust(w) if i < 3 else name.rjust(w) for i, (name, w) in enumerate(COLUMNS)))
    keys = {"tok/s": "tokens_per_s"}
    for r in rows:
        cells = [r.get("error", "") if name == "tok/s" and "error" in r else r.get(keys.get(name, name))
                 for name, _ in COLUMNS]
        print("  ".join(fmt_cell(c, w) for c, (_, w) in zip(cells, COLUMNS)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="0.6B,1.7B,8B", help=f"comma-separated, from {list(QWEN3)}")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {list(ARMS)}")
    p.add_argument("--batch-sizes", default="8,32,128")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="timed generate calls per cell (median)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget-s", type=float, default=420.0)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny config on CPU, batch 1 and 2, 8 new tokens")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)

    import torch
    import transformers

    if args.cpu_smoke:
        shapes, args.device, args.new_tokens = TINY, "cpu", 8
        batches = [1, 2]
    else:
        unknown = [m for m in args.models.split(",") if m not in QWEN3]
        if unknown:
            p.error(f"unknown --models {unknown}; choose from {list(QWEN3)}")
        shapes = {m: QWEN3[m] for m in args.models.split(",")}
        batches = [int(b) for b in args.batch_sizes.split(",")]
    arms = args.arms.split(",")
    if set(arms) - set(ARMS):
        p.error(f"unknown --arms {sorted(set(arms) - set(ARMS))}; choose from {list(ARMS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --cpu-smoke to check the code path on CPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"prompt {args.prompt_len} + {args.new_tokens} new tokens, sampled through the fp8 backend's generation")

    t0 = time.monotonic()
    left = lambda: args.time_budget_s - (time.monotonic() - t0)  # noqa: E731
    rows, skipped, models = [], [], {}
    for mi, (mname, shape) in enumerate(shapes.items()):
        if mi and left() < 0.25 * args.time_budget_s:
            skipped.append(f"{mname}: time budget")
            continue
        t = time.monotonic()
        source = build_model(mname, shape, device, args.seed)
        probe = torch.randint(2, shape["vocab_size"], (2, args.prompt_len),
                              generator=torch.Generator().manual_seed(args.seed)).to(device)
        minfo = models[mname] = {"params_b": sum(x.numel() for x in source.parameters()) / 1e9,
                                 "build_s": time.monotonic() - t, "arms": {}}
        prepared = {}
        for arm in arms:
            try:
                prepared[arm] = prepare_arm(arm, source, probe, device)
                minfo["arms"][arm] = prepared[arm][1]
            except Exception as exc:  # e.g. OOM while copying the model
                minfo["arms"][arm] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        cost: dict[str, float] = {}
        for batch in batches:
            bf16_tps = None
            for arm, (model, info) in prepared.items():
                estimate = 1.3 * cost.get(arm, 0.0) * (batch / cost.get(arm + "_batch", batch)) ** 0.5
                if left() < estimate + 5:
                    skipped.append(f"{mname}/{arm}/batch {batch}: time budget")
                    continue
                base = {"model": mname, "arm": arm, **{k: info.get(k) for k in
                                                       ("kernel", "sync_ms", "err_vs_bf16", "err_vs_dequant")}}
                t = time.monotonic()
                try:
                    row = {**base, **measure(model, batch, args, device, shape["vocab_size"])}
                except Exception as exc:  # OOM or a kernel failing mid-run: keep going with the other cells
                    oom = isinstance(exc, torch.cuda.OutOfMemoryError)
                    row = {**base, "batch": batch, "error": "OOM" if oom else type(exc).__name__,
                           "detail": str(exc)[:300]}
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                cost[arm], cost[arm + "_batch"] = time.monotonic() - t, batch
                if arm == "bf16":
                    bf16_tps = row.get("tokens_per_s")
                if bf16_tps and row.get("tokens_per_s"):
                    row["vs_bf16"] = row["tokens_per_s"] / bf16_tps
                rows.append(row)
                print(f"[{time.monotonic() - t0:.0f} s] {mname} {arm} batch {batch}: "
                      f"{fmt_cell(row.get('tokens_per_s') or row.get('error'), 0)} tok/s", file=sys.stderr, flush=True)
        del prepared, source
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print()
    print_table(rows)
    for mname, minfo in models.items():
        for arm, info in minfo["arms"].items():
            if "kernel_error" in info or "error" in info:
                print(f"{mname}/{arm}: {info.get('kernel_error') or info.get('error')}")
    for r in rows:
        if "detail" in r:
            print(f"{r['model']}/{r['arm']}/batch {r['batch']}: {r['detail']}")
    for s in skipped:
        print(f"skipped {s}")
    print(f"total {time.monotonic() - t0:.1f} s")
    if args.out:
        result = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
                  "args": vars(args), "models": models, "rows": rows, "skipped": skipped}
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
