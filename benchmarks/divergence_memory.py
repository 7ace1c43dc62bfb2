"""Peak memory of a full-vocabulary divergence's forward + backward: chunked vs unchunked vs TRL's GKD loss.

Each variant runs in its own child process (so they do not share a high-water mark) on the same inputs, built
chunk by chunk so that building them leaves no high-water mark above the inputs themselves:

* ``trl``: ``GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, beta, reduction="none").sum(-1)``
  (only for ``--kind jsd``; it takes teacher logits, which are the teacher log-probs here);
* ``unchunked``: ``full_vocab_divergence(..., chunk_size=0)``, plain autograd;
* ``chunked``: ``full_vocab_divergence(..., chunk_size=--chunk)``, the recomputing autograd function.

Peak = the child's max RSS (``ru_maxrss``); "over inputs" subtracts the RSS measured once the inputs exist, so it
counts what the divergence itself holds (including the (B, T, V) gradient of the logits, which every variant
must return). Values and gradients of every variant are compared with the chunked ones (max abs difference).

    OMP_NUM_THREADS=2 python benchmarks/divergence_memory.py [--batch 8 --seq 1024 --vocab 49152 --chunk 256
                                                              --kind jsd --beta 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args: argparse.Namespace) -> None:
    import torch

    from opd_plugins.divergences.chunked import full_vocab_divergence

    def run(s_logits, t_logps):
        if args.variant == "trl":
            from trl.experimental.gkd import GKDTrainer

            return GKDTrainer.generalized_jsd_loss(s_logits, t_logps, beta=args.beta, reduction="none").sum(-1)
        chunk = 0 if args.variant == "unchunked" else args.chunk
        return full_vocab_divergence(s_logits, t_logps, args.kind, args.beta, chunk_size=chunk)

    # Warm up on a tiny input first: imports and first-call allocations are not the divergence's memory.
    tiny = torch.randn(2, 3, 16, requires_grad=True)
    run(tiny, torch.log_softmax(torch.randn(2, 3, 16), -1)).sum().backward()

    B, T, V = args.batch, args.seq, args.vocab
    s_logits = torch.empty(B, T, V)
    t_logps = torch.empty(B, T, V)
    g = torch.Generator().manual_seed(0)
    for b in range(B):
        for t0 in range(0, T, 64):
            s_logits[b, t0:t0 + 64] = torch.randn(min(64, T - t0), V, generator=g) * 2
            t_logps[b, t0:t0 + 64] = torch.log_softmax(torch.randn(min(64, T - t0), V, generator=g) * 2, -1)
    weights = torch.rand(B, T, generator=g)
    s_logits.requires_grad_(True)
    base = _rss_mib()
    start = time.perf_counter()
    value = run(s_logits, t_logps)
    (value * weights).sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    value.detach().numpy().tofile(os.path.join(args.out, f"{args.variant}.value"))
    s_logits.grad.numpy().tofile(os.path.join(args.out, f"{args.variant}.grad"))
    print(json.dumps({"variant": args.variant, "peak_mib": round(peak), "inputs_mib": round(base),
                      "over_inputs_mib": round(peak - base), "seconds": round(seconds, 2)}))


def _max_abs_diff(path_a: str, path_b: str, n: int = 1 << 24) -> float:
    import numpy as np

    a, b = np.memmap(path_a, dtype=np.float32, mode="r"), np.memmap(path_b, dtype=np.float32, mode="r")
    return max((float(np.abs(a[i:i + n] - b[i:i + n]).max()) for i in range(0, a.shape[0], n)), default=0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--kind", default="jsd", choices=["reverse_kl", "forward_kl", "jsd", "tv", "skew_forward_kl",
                                                     "skew_reverse_kl"])
    p.add_argument("--beta", type=float, default=0.5, help="β for jsd (α for skew kinds)")
    p.add_argument("--variants", default="chunked,unchunked,trl")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return child(args)

    variants = [v for v in args.variants.split(",") if v != "trl" or args.kind == "jsd"]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="divmem_") as out:
        for variant in variants:
            cmd = [sys.executable, __file__, "--variant", variant, "--out", out, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--vocab", str(args.vocab), "--chunk", str(args.chunk),
                   "--kind", args.kind, "--beta", str(args.beta)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                results[variant] = {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
                continue
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        ok = [v for v in variants if "error" not in results[v]]
        if "chunked" in ok:
            for v in ok:
                if v != "chunked":
                    results[v]["value_max_abs_diff"] = _max_abs_diff(f"{out}/{v}.value", f"{out}/chunked.value")
                    results[v]["grad_max_abs_diff"] = _max_abs_diff(f"{out}/{v}.grad", f"{out}/chunked.grad")
    summary = {"batch": args.batch, "seq": args.seq, "vocab": args.vocab, "chunk": args.chunk, "kind": args.kind,
               "beta": args.beta, "input_tensor_mib": round(args.batch * args.seq * args.vocab * 4 / 2**20),
               "results": results}
    if "chunked" in ok:
        c = results["chunked"]
        for v in ok:
            if v != "chunked":
                results[v]["chunked_peak_ratio"] = round(c["peak_mib"] / results[v]["peak_mib"], 3)
                results[v]["chunked_over_inputs_ratio"] = round(c["over_inputs_mib"] / results[v]["over_inputs_mib"], 3)
    print(json.dumps(summary, indent=2))
    print("\n| kind | B×T×V | chunk | variant | peak MiB | over inputs MiB | s | max |Δvalue| | max |Δgrad| |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v in ok:
        r = results[v]
        print(f"| {args.kind}{f' β={args.beta}' if args.kind == 'jsd' else ''} | {args.batch}×{args.seq}×{args.vocab} "
              f"| {args.chunk if v == 'chunked' else '–'} | {v} | {r['peak_mib']} | {r['over_inputs_mib']} "
              f"| {r['seconds']} | {r.get('value_max_abs_diff', 0):.1e} | {r.get('grad_max_abs_diff', 0):.1e} |")


if __name__ == "__main__":
    main()
