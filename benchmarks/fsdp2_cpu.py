"""FSDP2 on two CPU processes against one process: the per-step loss and gradient norm of the same recipe.

The recipe is launched with the shipped ``recipes/accelerate/fsdp2.yaml`` (made to run 2 CPU processes over gloo
in float32) and, for the reference, as one plain process, with the same global batch (2 prompts × 4 completions:
4 per process under FSDP2, 8 in one process), the same seed and near-greedy sampling (``top_k: 1``), so both
runs sample the same completions and any difference is the sharded arithmetic. A tiny random model is built
in-process. accelerate enables FSDP only on accelerators (on CPU it silently runs DDP), so the launch uses the test
plugin ``helpers.fake_plugins_pkg.sharding_probe`` (on ``PYTHONPATH=tests``, ``OPD_TEST_CPU_FSDP=1``), which
switches accelerate's state to FSDP; the wrapping is accelerate's own, and the probe records that every parameter
of the student (and of a sharded teacher) is a DTensor shard.

Arms: ``opd`` (an ``hf_model`` teacher sharded with the student, ``forward_kl`` with ``fused_lm_head``), ``opsd``
(``self_context`` with frozen initial weights on a full fine-tune), ``grpo`` (a fixed-rollout GRPO with a varied
reward). Prints one table row per step and arm, and per arm the largest absolute loss difference and the
largest relative grad-norm difference (GRPO's loss is about 0 by construction, so relative loss differences mean
nothing there).

    OMP_NUM_THREADS=1 python benchmarks/fsdp2_cpu.py [--steps 5 --arms opd,opsd,grpo --out fsdp2.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = {
    "opd": dict(teacher={"name": "hf_model", "params": {"model": "{model}"}},
                divergence={"name": "forward_kl", "params": {"fused_lm_head": True}},
                objective={"policy_gradient": 0.0, "divergence": 1.0}),
    "opsd": dict(teacher={"name": "self_context", "params": {"template": "{prompt} = {answer}", "weights": "initial"}},
                 divergence={"name": "reverse_kl"}, objective={"policy_gradient": 0.0, "divergence": 1.0},
                 args={"learning_rate": 5.0e-3}),
    "grpo": dict(rollout={"name": "test_fixed_rollout"}, objective={"policy_gradient": 1.0},
                 data={"task": {"name": "test_varied_reward", "params": {"digits": 2}}, "train_size": 32,
                       "eval_size": 4}),
}


def _recipe(work: Path, arm: str, model_dir: Path, processes: int, steps: int) -> Path:
    extra = json.loads(json.dumps(ARMS[arm]).replace("{model}", str(model_dir)))
    recipe = {
        "plugins": ["helpers.fake_plugins_pkg.sharding_probe"],
        "model": {"name_or_path": str(model_dir)},
        "data": {"task": {"name": "arithmetic", "params": {"digits": 2}}, "train_size": 32, "eval_size": 4},
        "trainer": {"args": {"max_steps": steps, "per_device_train_batch_size": 8 // processes, "num_generations": 4,
                             "max_completion_length": 6, "learning_rate": 1.0e-3, "top_k": 1,
                             "save_strategy": "no"}},
        "seed": 0,
        "evaluation": {"num_prompts": 4, "max_new_tokens": 4},
        "output_dir": str(work / f"{arm}{processes}"),
    }
    recipe["trainer"]["args"].update(extra.pop("args", {}))
    recipe.update(extra)
    path = work / f"{arm}{processes}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(work: Path, recipe: Path, processes: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": str(ROOT / "tests"), "OPD_TEST_CPU_FSDP": "1", "OPD_TEST_PROBE": str(work / f"probe-{recipe.stem}")}
    if processes == 1:
        cmd = [sys.executable, "-m", "opd_plugins", "train", str(recipe)]
    else:
        config = yaml.safe_load((ROOT / "recipes" / "accelerate" / "fsdp2.yaml").read_text())
        config.update(num_processes=processes, use_cpu=True, mixed_precision="no")
        cfg = work / "fsdp2_cpu.yaml"
        cfg.write_text(yaml.safe_dump(config))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "--main_process_port",
               "29541", "-m", "opd_plugins", "train", str(recipe)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{out.stderr[-3000:]}")
    rows = [json.loads(line) for line in (work / recipe.stem / "metrics.jsonl").read_text().splitlines()]
    probes = [json.loads(p.read_text()) for p in sorted(work.glob(f"probe-{recipe.stem}.*"))]
    if processes > 1 and not (probes and all(p["sharding"] == "fsdp" and p["student"]["dtensor"] == p["student"]["n"]
                                             for p in probes)):
        raise SystemExit(f"{recipe.stem}: the student was not sharded on every rank: {probes}")
    return [r for r in rows if "loss" in r]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--arms", default="opd,opsd,grpo")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from opd_plugins.testing import save_tiny_model

    result = {"steps": args.steps, "arms": {}}
    with tempfile.TemporaryDirectory(prefix="opd-fsdp2-") as tmp:
        work = Path(tmp)
        model_dir = save_tiny_model(work / "tiny-model")
        for arm in args.arms.split(","):
            one = _run(work, _recipe(work, arm, model_dir, 1, args.steps), 1)
            two = _run(work, _recipe(work, arm, model_dir, 2, args.steps), 2)
            rows = [{"step": a["step"], "loss_1": a["loss"], "loss_fsdp2": b["loss"],
                     "grad_norm_1": a.get("grad_norm"), "grad_norm_fsdp2": b.get("grad_norm")}
                    for a, b in zip(one, two, strict=True)]

            def rel(x, y):
                return abs(x - y) / max(abs(x), abs(y), 1e-12)

            # GRPO's loss is ~0 by construction (zero-mean advantages): compare losses absolutely, grad norms relatively
            loss_abs = max(abs(r["loss_1"] - r["loss_fsdp2"]) for r in rows)
            grad_rel = max(rel(r["grad_norm_1"], r["grad_norm_fsdp2"]) for r in rows)
            result["arms"][arm] = {"rows": rows, "max_loss_abs_diff": loss_abs, "max_grad_norm_rel_diff": grad_rel}
            print(f"[{arm}] {len(rows)} steps, |Δloss| ≤ {loss_abs:.2e}, grad norm rel. diff ≤ {grad_rel:.2e}",
                  file=sys.stderr)
    print(f"{'arm':6s}{'step':>5s}{'loss, 1 process':>18s}{'loss, FSDP2 x2':>18s}{'grad norm, 1':>15s}"
          f"{'grad norm, FSDP2':>18s}")
    for arm, data in result["arms"].items():
        for r in data["rows"]:
            print(f"{arm:6s}{r['step']:5d}{r['loss_1']:18.6g}{r['loss_fsdp2']:18.6g}{r['grad_norm_1']:15.6g}"
                  f"{r['grad_norm_fsdp2']:18.6g}")
        print(f"{arm:6s} largest |loss difference| {data['max_loss_abs_diff']:.2e}, largest relative grad-norm "
              f"difference {data['max_grad_norm_rel_diff']:.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
