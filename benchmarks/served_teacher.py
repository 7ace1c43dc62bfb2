"""Served teacher: bytes moved per scored token (top-k vs full vocabulary) and scoring throughput vs concurrency.

Starts ``opd-plugins serve-teacher`` on a free loopback port (the tiny random test model by default, or any
model reference such as ``smollm2-135m-instruct``) and measures:

(a) response bytes per scored token of ``POST /v1/completions`` with ``prompt_logprobs`` = 0, 8 and 64, against
    the full vocabulary: ``V * 4`` bytes as raw float32, and an estimate of the same as JSON (V entries at the
    measured bytes per top-k entry);
(b) scoring throughput of the ``openai_server`` teacher (tokens per second) with 1, 2, 4 and 8 requests in
    flight (one sequence per request; the server micro-batches up to ``--max-batch`` sequences per forward).

    OMP_NUM_THREADS=1 python benchmarks/served_teacher.py [--model tiny|smollm2-135m-instruct|PATH]
        [--seqs 32 --prompt-len 64 --completion-len 128 --repeats 3]

Prints a JSON object, then a markdown table. Keep OMP_NUM_THREADS=1 on a small shared machine: the server and the
client share the cores, and oversubscribed torch threads make the numbers mostly noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FULL_VOCAB = 49_152  # SmolLM2's vocabulary


def post(url: str, body: dict) -> bytes:
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return r.read()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (random test model), an alias, a path or a hub id")
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=8)
    args = ap.parse_args()

    import torch

    from opd_plugins.models import load_tokenizer
    from opd_plugins.teachers._local_server import spawn_server
    from opd_plugins.teachers.base import TeacherBatch
    from opd_plugins.teachers.openai_server import OpenAIServerTeacher
    from opd_plugins.testing.contracts import fake_trainer

    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if model == "tiny":
        from opd_plugins.testing import save_tiny_model

        model = str(save_tiny_model(os.path.join(tmp.name, "tiny"), seed=0))
    tokenizer = load_tokenizer(model)
    server = spawn_server(model, extra_args=["--max-batch", str(args.max_batch), "--max-logprobs", "64"],
                          timeout_s=900)
    try:
        g = torch.Generator().manual_seed(0)
        V = len(tokenizer)
        L = args.prompt_len + args.completion_len
        seqs = torch.randint(0, V, (args.seqs, L), generator=g)

        # (a) bytes per scored token
        sample = seqs[:8].tolist()
        n_tok = sum(len(s) for s in sample)
        size = {}
        for k in (0, 8, 64):
            body = post(server.url, {"prompt": sample, "max_tokens": 1, "prompt_logprobs": k})
            size[k] = len(body) / n_tok
        per_entry = (size[64] - size[8]) / 56
        bytes_result = {
            "tokens_measured": n_tok,
            "bytes_per_token": {f"k={k}": round(v, 1) for k, v in size.items()},
            "bytes_per_extra_topk_entry": round(per_entry, 1),
            "full_vocab_V": FULL_VOCAB,
            "full_vocab_float32_bytes_per_token": FULL_VOCAB * 4,
            "full_vocab_json_bytes_per_token_est": round(FULL_VOCAB * per_entry),
        }

        # (b) throughput vs concurrency, through the teacher itself
        P = args.prompt_len
        batch = TeacherBatch(prompt_ids=seqs[:, :P], prompt_mask=torch.ones(args.seqs, P, dtype=torch.long),
                             completion_ids=seqs[:, P:], completion_mask=torch.ones(args.seqs, L - P, dtype=torch.long))
        throughput = []
        for c in (1, 2, 4, 8):
            teacher = OpenAIServerTeacher(OpenAIServerTeacher.Params(
                base_url=server.url, concurrency=c, sequences_per_request=1, timeout_s=600, check_tokenizer=False))
            teacher.setup(fake_trainer(None, tokenizer))
            teacher.score(batch)  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                teacher.score(batch)
                times.append(time.perf_counter() - t0)
            teacher.close()
            t = statistics.median(times)
            throughput.append({"concurrency": c, "seconds": round(t, 3),
                               "sequence_tokens_per_s": round(args.seqs * L / t),
                               "completion_tokens_per_s": round(args.seqs * (L - P) / t)})
    finally:
        server.stop()
        tmp.cleanup()

    result = {
        "model": args.model, "vocab": V, "seqs": args.seqs, "prompt_len": P, "completion_len": L - P,
        "max_batch": args.max_batch, "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
        "bytes": bytes_result, "throughput": throughput,
    }
    print(json.dumps(result, indent=1))
    print(f"\n**Bytes per scored token** (model {args.model}, V={V}; JSON over HTTP)\n")
    print("| payload | bytes/token |")
    print("|---|---:|")
    for k, v in bytes_result["bytes_per_token"].items():
        print(f"| prompt_logprobs {k} | {v:,.0f} |")
    print(f"| full vocab V={FULL_VOCAB}, raw float32 | {FULL_VOCAB * 4:,} |")
    print(f"| full vocab V={FULL_VOCAB}, JSON (est. {per_entry:.0f} B/entry) | "
          f"{bytes_result['full_vocab_json_bytes_per_token_est']:,} |")
    print(f"\n**Scoring throughput** ({args.seqs} sequences x {L} tokens, one per request, server max batch "
          f"{args.max_batch})\n")
    print("| concurrency | seconds | sequence tokens/s | completion tokens/s |")
    print("|---:|---:|---:|---:|")
    for row in throughput:
        print(f"| {row['concurrency']} | {row['seconds']} | {row['sequence_tokens_per_s']:,} | "
              f"{row['completion_tokens_per_s']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
