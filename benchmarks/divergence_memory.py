"""Peak memory of a full-vocabulary divergence's forward + backward: chunked vs unchunked vs TRL's GKD loss.

Each variant runs in its own child process (so they do not share a high-water mark) on the same inputs, built
chunk by chunk so that building them leaves no high-water mark above the inputs themselves:

* ``trl``: ``GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, beta, reduction="none").sum(-1)``
  (only for ``--kind jsd``; it takes teacher logits, which are the teacher log-probs here);
* ``unchunked``: ``full_vocab_divergence(..., chunk_size=0)``, plain autograd;
* ``chunked``: ``full_vocab_divergence(..., chunk_size=--chunk)``, the recomputing autograd function.

and, from the student's final hidden states ``(B, T, --hidden)`` and its lm-head weight ``(V, --hidden)`` instead
of its logits (the whole loss computation after the model body, which is what training runs):

* ``naive_from_hidden``: ``logits = hidden @ weight.T``, then ``full_vocab_divergence(..., chunk_size=0)``;
* ``fused``: ``fused_full_vocab_divergence(hidden, weight, ..., chunk_size=--chunk)``, which computes the logits
  chunk by chunk too (``fused_lm_head: true``).

Peak = the child's max RSS (``VmHWM``); "over inputs" subtracts the RSS measured once the inputs exist, so it
counts what the divergence itself holds (for the logits variants, including the (B, T, V) gradient of the logits,
which they must return; the hidden-state variants return gradients of the hidden states and the weight).
Values and gradients are compared with ``chunked`` (logits variants) or ``fused`` (hidden-state variants) by max
abs difference.

    OMP_NUM_THREADS=2 python benchmarks/divergence_memory.py [--batch 8 --seq 1024 --vocab 49152 --chunk 256
                                                              --kind jsd --beta 0.5 --hidden 576
                                                              --variants chunked,unchunked,trl,fused,naive_from_hidden]

``--case step`` measures one whole ``OPDTrainer`` optimizer step instead (generation, teacher scoring, the
divergence's per-token reward and the loss), on a tiny random model whose vocabulary is ``--vocab`` (default there:
Qwen3's 151,936) with hidden size ``--hidden``: ``--ga`` micro-batches of ``--batch`` rows make a generation
batch, completions are exactly ``--seq`` tokens, the teacher is the student with the hint in its context
(``self_context``, initial weights), the divergence is ``--kind`` (full vocabulary) with ``objective:
{policy_gradient: --pg-weight (default 1), divergence: 1, divergence_reward: 1}``. Variants: ``generation`` (``teacher_scoring:
generation``: the whole generation batch's ``(B, T, V)`` teacher log-probs kept in the batch) and ``loss``
(``teacher_scoring: loss``: scored per micro-batch). ``--src DIR`` runs the children on another checkout of
opd_plugins (e.g. ``git worktree add /tmp/old <commit>``, which has no ``teacher_scoring`` and scores the whole
generation batch). Peak = max RSS over the RSS after the trainer is built; values = the first step's loss and the
parameters after one SGD step with learning rate 1 (so their difference is the gradients' difference), compared
with the first variant's.

    OMP_NUM_THREADS=2 python benchmarks/divergence_memory.py --case step [--batch 4 --ga 4 --seq 128 --hidden 64
                                                                          --kind forward_kl --fused --div-chunk 64
                                                                          --src DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _util import peak_rss_mib


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


LOGIT_VARIANTS = ("chunked", "unchunked", "trl")
HIDDEN_VARIANTS = ("fused", "naive_from_hidden")
REFERENCE = {**{v: "chunked" for v in LOGIT_VARIANTS}, **{v: "fused" for v in HIDDEN_VARIANTS}}
GRADS = {**{v: ("logits",) for v in LOGIT_VARIANTS}, **{v: ("hidden", "weight") for v in HIDDEN_VARIANTS}}


def child(args: argparse.Namespace) -> None:
    import torch

    from opd_plugins.divergences.chunked import full_vocab_divergence, fused_full_vocab_divergence

    def run(inputs, t_logps):
        if args.variant == "trl":
            from trl.experimental.gkd import GKDTrainer

            return GKDTrainer.generalized_jsd_loss(inputs[0], t_logps, beta=args.beta, reduction="none").sum(-1)
        if args.variant == "fused":
            return fused_full_vocab_divergence(inputs[0], inputs[1], t_logps, args.kind, args.beta,
                                               chunk_size=args.chunk)
        if args.variant == "naive_from_hidden":
            return full_vocab_divergence(inputs[0] @ inputs[1].T, t_logps, args.kind, args.beta, chunk_size=0)
        chunk = 0 if args.variant == "unchunked" else args.chunk
        return full_vocab_divergence(inputs[0], t_logps, args.kind, args.beta, chunk_size=chunk)

    # Warm up on a tiny input first: imports and first-call allocations are not the divergence's memory.
    from_hidden = args.variant in HIDDEN_VARIANTS
    tiny = [torch.randn(2, 3, 4, requires_grad=True), torch.randn(16, 4, requires_grad=True)] if from_hidden else \
        [torch.randn(2, 3, 16, requires_grad=True)]
    run(tiny, torch.log_softmax(torch.randn(2, 3, 16), -1)).sum().backward()

    B, T, V, H = args.batch, args.seq, args.vocab, args.hidden
    g = torch.Generator().manual_seed(0)
    if from_hidden:  # logits = hidden @ weight.T with a std of about 2, like the logits variants' inputs
        inputs = [torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * (2 / H ** 0.5)]
    else:
        inputs = [torch.empty(B, T, V)]
    t_logps = torch.empty(B, T, V)
    for b in range(B):
        for t0 in range(0, T, 64):
            if not from_hidden:
                inputs[0][b, t0:t0 + 64] = torch.randn(min(64, T - t0), V, generator=g) * 2
            t_logps[b, t0:t0 + 64] = torch.log_softmax(torch.randn(min(64, T - t0), V, generator=g) * 2, -1)
    weights = torch.rand(B, T, generator=g)
    for x in inputs:
        x.requires_grad_(True)
    base = _rss_mib()
    start = time.perf_counter()
    value = run(inputs, t_logps)
    (value * weights).sum().backward()
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    value.detach().numpy().tofile(os.path.join(args.out, f"{args.variant}.value"))
    for name, x in zip(GRADS[args.variant], inputs):
        x.grad.numpy().tofile(os.path.join(args.out, f"{args.variant}.grad_{name}"))
    print(json.dumps({"variant": args.variant, "peak_mib": round(peak), "inputs_mib": round(base),
                      "over_inputs_mib": round(peak - base), "seconds": round(seconds, 2)}))


def step_child(args: argparse.Namespace) -> None:
    """One OPDTrainer optimizer step; prints its peak memory, writes the loss and the parameters after it."""
    import dataclasses
    import tempfile as tf

    import torch
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from opd_plugins.testing import build_tokenizer
    from opd_plugins.trainers import Components, OPDConfig, OPDTrainer

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq + 64, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None))
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    n = args.batch * args.ga
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(n)],
                              "hint": [f"(Hint: {2 * i}.)" for i in range(n)]})
    settings = dict(output_dir=tf.mkdtemp(), max_steps=1, per_device_train_batch_size=args.batch,
                    gradient_accumulation_steps=args.ga, num_generations=args.batch, max_completion_length=args.seq,
                    generation_kwargs={"min_new_tokens": args.seq}, optim="sgd", learning_rate=1.0, logging_steps=1,
                    report_to="none", save_strategy="no", bf16=False, use_cpu=True, seed=0, disable_tqdm=True,
                    temperature=1.0)
    if any(f.name == "teacher_scoring" for f in dataclasses.fields(OPDConfig)):
        settings["teacher_scoring"] = args.variant
    elif args.variant != "generation":
        raise SystemExit(f"this checkout has no teacher_scoring: only the 'generation' variant runs on it")
    teacher = {"weights": "initial", **({"chunk_size": args.teacher_chunk} if args.teacher_chunk else {})}
    comps = Components.build(teacher=("self_context", teacher),
                             divergence=(args.kind, {**({"fused_lm_head": True} if args.fused else {}),
                                                     **({"chunk_size": args.div_chunk} if args.div_chunk else {})}),
                             pg_weight=args.pg_weight, div_weight=1.0, div_reward_weight=1.0)
    tr = OPDTrainer(model=model, args=OPDConfig(**settings), components=comps, train_dataset=data,
                    processing_class=tok, reward_funcs=[lambda completion_ids, **kw: [float(len(c)) for c in
                                                                                      completion_ids]])
    base = _rss_mib()
    start = time.perf_counter()
    tr.train()
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    loss = [h["loss"] for h in tr.state.log_history if "loss" in h][0]
    torch.cat([p.detach().flatten() for p in model.parameters()]).numpy().tofile(
        os.path.join(args.out, f"{args.variant}.params"))
    print(json.dumps({"variant": args.variant, "peak_mib": round(peak), "base_mib": round(base),
                      "over_base_mib": round(peak - base), "seconds": round(seconds, 1), "loss": loss}))


def step_main(args: argparse.Namespace) -> None:
    variants = args.variants.split(",") if args.variants != "chunked,unchunked,trl" else ["generation", "loss"]
    runs = [(v, v, None) for v in variants]  # (label, variant, PYTHONPATH)
    if args.src:  # the other checkout first: the reference the others are compared with
        runs.insert(0, ("before", "generation", os.pathsep.join([args.src, os.environ.get("PYTHONPATH", "")])))
    results = {}
    with tempfile.TemporaryDirectory(prefix="stepmem_") as out:
        for label, variant, path in runs:
            cmd = [sys.executable, __file__, "--case", "step", "--variant", variant, "--out", f"{out}/{label}",
                   "--batch", str(args.batch), "--ga", str(args.ga), "--seq", str(args.seq), "--vocab",
                   str(args.vocab), "--hidden", str(args.hidden), "--kind", args.kind, "--pg-weight", str(args.pg_weight),
                   "--teacher-chunk", str(args.teacher_chunk or 0), "--div-chunk", str(args.div_chunk or 0),
                   *(["--fused"] if args.fused else [])]
            os.makedirs(f"{out}/{label}")
            env = {**os.environ, "PYTHONPATH": path} if path else None
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{label}: exit {proc.returncode}: {proc.stderr.strip()[-600:]}")
            results[label] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[label]["params_file"] = f"{out}/{label}/{variant}.params"
        first = runs[0][0]
        for label, _, _ in runs:
            r, f = results[label], results[first]
            if label != first:
                r["params_max_abs_diff"] = _max_abs_diff(r["params_file"], f["params_file"])
                r["loss_abs_diff"] = abs(r["loss"] - f["loss"])
                r[f"{first}_over_base_ratio"] = round(f["over_base_mib"] / max(r["over_base_mib"], 1), 2)
        for r in results.values():
            r.pop("params_file")
    B, T, V = args.batch * args.ga, args.seq, args.vocab
    print(json.dumps({"generation_batch": B, "micro_batch": args.batch, "seq": T, "vocab": V, "hidden": args.hidden,
                      "kind": args.kind, "fused_lm_head": args.fused, "pg_weight": args.pg_weight, "teacher_chunk": args.teacher_chunk, "div_chunk": args.div_chunk, "src": args.src, "teacher_tensor_mib": round(B * T * V * 4 / 2**20),
                      "results": results}, indent=2))
    print(f"\n| variant | generation batch × T × V | peak over base MiB | ratio {first} / variant | s | loss "
          "| max |Δparams| |")
    print("|---|---|---|---|---|---|---|")
    for label, _, _ in runs:
        r = results[label]
        ratio = "1" if label == first else f"{r[f'{first}_over_base_ratio']}"
        delta = "(reference)" if label == first else f"{r['params_max_abs_diff']:.1e}"
        print(f"| {label} | {B}×{T}×{V} | {r['over_base_mib']} | {ratio} | {r['seconds']} | {r['loss']:.6f} "
              f"| {delta} |")


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
    p.add_argument("--hidden", type=int, default=576, help="hidden size H of the hidden-state variants "
                                                            "(576 = SmolLM2-135M's)")
    p.add_argument("--variants", default="chunked,unchunked,trl",
                   help=f"comma-separated, of: {', '.join(LOGIT_VARIANTS + HIDDEN_VARIANTS)}")
    p.add_argument("--case", default="divergence", choices=["divergence", "step"],
                   help="the divergence alone (default) or one whole OPDTrainer step")
    p.add_argument("--ga", type=int, default=4, help="--case step: micro-batches per generation batch")
    p.add_argument("--src", help="--case step: run the 'generation' variant on this opd_plugins checkout")
    p.add_argument("--fused", action="store_true", help="--case step: the divergence with fused_lm_head: true")
    p.add_argument("--pg-weight", type=float, default=1.0,
                   help="--case step: objective.policy_gradient (0: pure distillation, no policy-gradient forward)")
    p.add_argument("--div-chunk", type=int, default=0,
                   help="--case step: the divergence's chunk_size, tokens per chunk (0: its default, 256)")
    p.add_argument("--teacher-chunk", type=int, default=0,
                   help="--case step: the teacher's chunk_size, rows per forward (0: its default, 8)")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case == "step":
        for key, default in (("batch", 4), ("seq", 128), ("vocab", 151936), ("hidden", 64), ("kind", "forward_kl")):
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, default)
        return step_child(args) if args.variant else step_main(args)
    if args.variant:
        return child(args)

    variants = [v for v in args.variants.split(",") if v != "trl" or args.kind == "jsd"]
    unknown = set(variants) - set(REFERENCE)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(REFERENCE)}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="divmem_") as out:
        for variant in variants:
            cmd = [sys.executable, __file__, "--variant", variant, "--out", out, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--vocab", str(args.vocab), "--chunk", str(args.chunk),
                   "--kind", args.kind, "--beta", str(args.beta), "--hidden", str(args.hidden)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                results[variant] = {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
                continue
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        ok = [v for v in variants if "error" not in results[v]]
        for v in ok:
            ref = REFERENCE[v]
            if v != ref and ref in ok:
                results[v]["value_max_abs_diff"] = _max_abs_diff(f"{out}/{v}.value", f"{out}/{ref}.value")
                for name in GRADS[v]:
                    results[v][f"grad_{name}_max_abs_diff"] = _max_abs_diff(f"{out}/{v}.grad_{name}",
                                                                            f"{out}/{ref}.grad_{name}")
                r, c = results[v], results[ref]
                r[f"{ref}_peak_ratio"] = round(c["peak_mib"] / r["peak_mib"], 3)
                r[f"{ref}_over_inputs_ratio"] = round(c["over_inputs_mib"] / r["over_inputs_mib"], 3)
    summary = {"batch": args.batch, "seq": args.seq, "vocab": args.vocab, "hidden": args.hidden, "chunk": args.chunk,
               "kind": args.kind, "beta": args.beta,
               "input_tensor_mib": round(args.batch * args.seq * args.vocab * 4 / 2**20), "results": results}
    print(json.dumps(summary, indent=2))
    print("\n| kind | B×T×V | inputs | chunk | variant | peak MiB | over inputs MiB | s | max |Δvalue| | max |Δgrad| |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for v in ok:
        r = results[v]
        label = f"{args.kind}{f' β={args.beta}' if args.kind == 'jsd' else ''}"
        inputs = "logits" if v in LOGIT_VARIANTS else f"hidden (H={args.hidden})"
        chunked = v in ("chunked", "fused")
        if v == REFERENCE[v]:
            delta_v = delta_g = "(reference)"
        elif "value_max_abs_diff" in r:
            delta_v = f"{r['value_max_abs_diff']:.1e}"
            delta_g = ", ".join(f"{n} {r[f'grad_{n}_max_abs_diff']:.1e}" for n in GRADS[v])
        else:
            delta_v = delta_g = "–"
        print(f"| {label} | {args.batch}×{args.seq}×{args.vocab} | {inputs} | {args.chunk if chunked else '–'} | {v} "
              f"| {r['peak_mib']} | {r['over_inputs_mib']} | {r['seconds']} | {delta_v} | {delta_g} |")
    for v in variants:
        if v not in ok:
            print(f"{v}: {results[v]['error']}", file=sys.stderr)


if __name__ == "__main__":
    main()
