"""Fault suite: hostile inputs, kills, broken teachers and corrupted caches, each tried for real on tiny random models.

Four groups (issue 13), each counted:

* **bad inputs** (in-process ``opd-plugins validate|train``): alias bombs, UTF-16/Latin-1 files, deep nesting,
  duplicate keys, huge files, bad ``trainer.args`` values, output directories that must not be used, ``--overwrite``
  of a directory that is not a run, plugins that ``sys.exit`` at import or define no hook, a changed recipe on
  ``--resume``. *Cleanly rejected* = exit status 2, no traceback, at most four lines naming the file (or the output
  directory), within 10 s, and nothing deleted.
* **kills** (subprocesses): SIGKILL in the middle of writing a checkpoint and at random moments of training, then
  ``--resume``. *Survived* = resume finishes at ``max_steps``; *checkpoints lost* = checkpoints published before the
  kill that are missing or changed afterwards, or published incomplete. The finished run is then resumed again
  (must be reported complete and left untouched).
* **teacher faults**: ``openai_server`` against a real ``serve-teacher`` behind a fault-injecting proxy (positive,
  −1e30, boolean, string, NaN log-probs, malformed top-k entries, another tokenizer, a drip server, misaligned or
  missing scores, HTTP 500, malformed JSON), and a NaN loss term from a plugin. *Steps trained on bad data* =
  optimizer steps completed after the first faulty response (every scoring response after the setup probe is
  faulty).
* **cache corruptions**: a precomputed offline cache with a flipped bit, swapped, truncated, deleted or
  corrupt-header shards, and shards rewritten with +5, −1e30, NaN or unsorted values whose manifest agrees with
  the bytes (a broken precompute). *Steps trained on corrupted data* = optimizer steps completed.

Goal: 100% / 0 / 0 / 0. A control run of each training group (no fault) must train every step.

    OMP_NUM_THREADS=1 python benchmarks/fault_suite.py [--out runs/fault_suite] [--kills 8]

Prints every case and a markdown table, and writes both (``fault_suite.json``, ``fault_suite.md``) into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))  # the test plugins (helpers.fake_plugins_pkg)

import yaml  # noqa: E402

ARGS = {"max_steps": 3, "per_device_train_batch_size": 4, "num_generations": 4, "max_completion_length": 6,
        "learning_rate": 1e-3, "save_steps": 1, "logging_steps": 1}


def base_recipe(model: Path, out: Path, **args) -> dict:
    return {"model": {"name_or_path": str(model), "lora": {"r": 4}},
            "data": {"task": {"name": "arithmetic", "params": {"digits": 2}}, "train_size": 32, "eval_size": 4},
            "trainer": {"args": {**ARGS, **args}},
            "teacher": {"name": "self_context"}, "divergence": {"name": "reverse_kl"},
            "objective": {"policy_gradient": 1.0, "divergence": 0.5},
            "evaluation": {"enabled": False}, "output_dir": str(out)}


def dump(path: Path, data) -> Path:
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(argv: list[str], cwd: Path | None = None) -> tuple[object, str, float]:
    """``opd-plugins ARGV`` in this process: (exit status or "traceback", stderr, seconds)."""
    from opd_plugins import cli

    err, out = io.StringIO(), io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), contextlib.chdir(cwd or Path.cwd()):
        try:
            code: object = cli.main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException:  # noqa: BLE001 - anything but a clean refusal is what this suite looks for
            code = "traceback"
            err.write(traceback.format_exc())
    return code, err.getvalue(), time.monotonic() - t0


def loss_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return sorted({r["step"] for r in rows if "loss" in r})


def train_quietly(path: Path, out: Path) -> tuple[str, int]:
    """Validate and train a recipe in this process: ("" or the error's first line, optimizer steps logged)."""
    from opd_plugins.errors import OPDError
    from opd_plugins.recipe import load_recipe
    from opd_plugins.runs import train

    error = ""
    try:
        recipe, pm = load_recipe(path)
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            train(recipe, pm)
    except OPDError as exc:
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    except Exception as exc:  # noqa: BLE001 - a traceback is what this suite looks for
        error = f"TRACEBACK {type(exc).__name__}: {exc}"
    return error, len(loss_steps(out))


def record(results: list[dict], group: str, case: str, ok: bool, detail: str, **extra) -> None:
    results.append({"group": group, "case": case, "ok": ok, "detail": detail, **extra})
    print(f"[{group}] {'ok  ' if ok else 'FAIL'} {case}: {detail}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# 1. Bad inputs
# ---------------------------------------------------------------------------------------------------------------


def alias_bomb(key: str = "description") -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines) + f"\n{key}: *l8\n"


def bad_inputs(work: Path, model: Path, results: list[dict]) -> None:
    group = "bad input"
    d = work / "inputs"
    d.mkdir()
    base = base_recipe(model, d / "run")
    text = yaml.safe_dump(base, sort_keys=False)

    def variant(**changes):
        r = json.loads(json.dumps(base))
        for dotted, value in changes.items():
            node = r
            *head, last = dotted.split(".")
            for part in head:
                node = node[part]
            node[last] = value
        return r

    big = d / "big.yaml"
    with open(big, "w") as f:
        f.write("description: |\n")
        for _ in range(50_000):
            f.write("  " + "x" * 1000 + "\n")
    nobase = yaml.safe_dump({k: v for k, v in base.items() if k != "trainer"}, sort_keys=False)
    cases = [
        ("alias bomb in description", text + alias_bomb(), "alias"),
        ("alias bomb in trainer.args", nobase + alias_bomb().replace("description: *l8", "trainer: {args: {x: *l8}}"),
         "alias"),
        ("recursive alias", text.replace("output_dir:", "description: &a [*a]\noutput_dir:"), "recursive"),
        ("UTF-16 file", text.encode("utf-16"), "UTF-16"),
        ("Latin-1 file", ("description: caf\xe9\n" + text).encode("latin-1"), "UTF-8"),
        ("deep flow nesting", "description: " + "[" * 50_000 + "]" * 50_000 + "\n" + text, "levels deep"),
        ("duplicate key", text + "output_dir: /tmp/elsewhere\n", "duplicate key"),
        ("50 MB recipe", big, "bytes, more than"),
        ("25,000 values", "description: [" + "1, " * 25_000 + "]\n" + text, "values"),
        ("not a mapping", "- a\n- b\n", "mapping"),
        ("learning_rate 'fast'", variant(**{"trainer.args.learning_rate": "fast"}), "trainer.args.learning_rate"),
        ("learning_rate 0", variant(**{"trainer.args.learning_rate": 0}), "trainer.args.learning_rate"),
        ("learning_rate -1e-4", variant(**{"trainer.args.learning_rate": -1e-4}), "trainer.args.learning_rate"),
        ("learning_rate .nan", text.replace("learning_rate: 0.001", "learning_rate: .nan"),
         "trainer.args.learning_rate"),
        ("learning_rate .inf", text.replace("learning_rate: 0.001", "learning_rate: .inf"),
         "trainer.args.learning_rate"),
        ("batch size 0", variant(**{"trainer.args.per_device_train_batch_size": 0}),
         "trainer.args.per_device_train_batch_size"),
        ("max_steps 'ten'", variant(**{"trainer.args.max_steps": "ten"}), "trainer.args.max_steps"),
        ("max_steps 0", variant(**{"trainer.args.max_steps": 0}), "trainer.args.max_steps"),
        ("temperature 0", variant(**{"trainer.args.temperature": 0}), "trainer.args.temperature"),
        ("temperature -inf", variant(**{"trainer.args.temperature": float("-inf")}), "trainer.args.temperature"),
        ("top_p 2", variant(**{"trainer.args.top_p": 2}), "trainer.args.top_p"),
        ("lr_scheduler_type 'cosin'", variant(**{"trainer.args.lr_scheduler_type": "cosin"}), "Did you mean"),
        ("output_dir ''", variant(output_dir=""), "output_dir"),
        ("output_dir '/'", variant(output_dir="/"), "output_dir"),
        ("output_dir '~'", variant(output_dir="~"), "output_dir"),
        ("unknown divergence", variant(**{"divergence.name": "revers_kl"}), "Did you mean"),
        ("plugin calling sys.exit(0) at import", variant(plugins=["helpers.fake_plugins_pkg.exits"]), "plugins[0]"),
        ("plugin module with no hook", variant(plugins=["helpers.fake_plugins_pkg.no_hooks"]), "plugins[0]"),
    ]
    for i, (case, data, needle) in enumerate(cases):
        path = data if isinstance(data, Path) else dump(d / f"case{i}.yaml", data)
        code, err, secs = run_cli(["validate", str(path)])
        ok = code == 2 and "Traceback" not in err and needle in err and str(path) in err and secs < 10 \
            and len(err.strip().splitlines()) <= 4
        record(results, group, case, ok, f"exit {code}, {secs:.1f} s: {err.strip().splitlines()[-1][:110] if err else ''}")

    override = ["trainer.args.learning_rate=1e-4"]
    code, err, _ = run_cli(["validate", str(dump(d / "good.yaml", base)), *override])
    record(results, "control", "override learning_rate=1e-4 accepted as a number", code == 0, f"exit {code}")
    bomb = "[" + ", ".join(["&a0 [" + ", ".join(["lol"] * 9) + "]"]
                           + [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]) + "]"
    code, err, secs = run_cli(["validate", str(d / "good.yaml"), f"description={bomb}"])
    record(results, group, "alias bomb in a command-line override",
           code == 2 and "Traceback" not in err and "refused YAML" in err and secs < 10, f"exit {code}, {secs:.1f} s")

    # train-time checks of the output directory, before any model loads
    blocker = d / "afile"
    blocker.write_text("x")
    precious = d / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    for case, out, flags, cwd in [
        ("output_dir under a file", blocker / "run", [], None),
        ("--overwrite of a directory that is not a run", precious, ["--overwrite"], None),
        ("--overwrite of '.' (not a run)", Path("."), ["--overwrite"], precious),
        ("--allow-recipe-change without --resume", d / "fresh", ["--allow-recipe-change"], None),
    ]:
        path = dump(d / f"train-{len(results)}.yaml", variant(output_dir=str(out)))
        code, err, secs = run_cli(["train", str(path), *flags], cwd=cwd)
        ok = code == 2 and "Traceback" not in err and (precious / "thesis.tex").exists() and secs < 10
        record(results, group, case, ok, f"exit {code}, {secs:.1f} s: {err.strip().splitlines()[-1][:110] if err else ''}")


# ---------------------------------------------------------------------------------------------------------------
# 2. Kills
# ---------------------------------------------------------------------------------------------------------------


def subprocess_env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra}


def snapshot(out: Path) -> dict[str, str]:
    """Published checkpoints -> digest of their files (only complete ones count as published)."""
    shots = {}
    for ckpt in sorted(out.glob("checkpoint-*")):
        h = hashlib.sha256()
        for f in sorted(p for p in ckpt.rglob("*") if p.is_file()):
            h.update(f.relative_to(ckpt).as_posix().encode() + f.read_bytes())
        shots[ckpt.name] = h.hexdigest() if (ckpt / "opd_checkpoint_complete").exists() else "INCOMPLETE"
    return shots


def kills(work: Path, model: Path, results: list[dict], n: int, seed: int) -> None:
    group = "kill"
    rng = random.Random(seed)
    plans = [(f"SIGKILL while writing checkpoint-{k}", {"OPD_TEST_KILL_AT_STEP": str(k)}, None) for k in (4, 2, 6)]
    while len(plans) < n:
        when = rng.choice(["staging", "metrics"])
        at = rng.randint(1, 5)
        plans.append((f"SIGKILL at a random moment ({'checkpoint staged' if when == 'staging' else 'step'} {at} "
                      "seen)", {}, (when, at)))
    for i, (case, kill_env, trigger) in enumerate(plans[:n]):
        out = work / f"kill{i}"
        recipe = base_recipe(model, out, max_steps=6, save_steps=2)
        recipe["plugins"] = ["helpers.fake_plugins_pkg.killer"]
        recipe["sampler"] = {"name": "counting"}
        path = dump(work / f"kill{i}.yaml", recipe)
        env = subprocess_env(OPD_TEST_SAMPLER_LOG=str(work / f"kill{i}.log"))
        proc = subprocess.Popen([sys.executable, "-m", "opd_plugins", "train", str(path)], env={**env, **kill_env},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if trigger is not None:
            when, at = trigger
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                staged = list((out / ".staging").glob("checkpoint-*")) if (out / ".staging").exists() else []
                if (when == "staging" and any(int(p.name.split("-")[1]) >= at for p in staged)) or \
                        (when == "metrics" and loss_steps(out) and max(loss_steps(out)) >= at):
                    time.sleep(rng.uniform(0, 0.4))  # somewhere in the step that follows
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.02)
        proc.wait(600)
        before = snapshot(out)
        if proc.returncode != -9:
            record(results, group, case, False, f"the run was not killed (exit {proc.returncode})", lost=0)
            continue
        resumed = subprocess.run([sys.executable, "-m", "opd_plugins", "train", str(path), "--resume"], env=env,
                                 capture_output=True, text=True, timeout=600)
        restart = ""
        if not before:  # killed before any checkpoint was published: nothing to resume, a clean refusal, restart
            clean = resumed.returncode == 2 and "nothing to resume" in resumed.stderr and "Traceback" not in resumed.stderr
            resumed = subprocess.run([sys.executable, "-m", "opd_plugins", "train", str(path), "--overwrite"],
                                     env=env, capture_output=True, text=True, timeout=600)
            restart = f"no checkpoint yet: resume refused cleanly={clean}, restarted with --overwrite; "
            if not clean:
                resumed.returncode = 1
        after = snapshot(out)
        lost = sum(1 for name, digest in before.items() if digest == "INCOMPLETE" or after.get(name) != digest)
        summary = json.loads((out / "eval_summary.json").read_text()) if (out / "eval_summary.json").exists() else {}
        steps = loss_steps(out)
        survived = resumed.returncode == 0 and summary.get("steps") == 6 and steps == list(range(1, 7))
        record(results, group, case, survived and lost == 0,
               f"published before: {sorted(before)}; {restart}exit {resumed.returncode}, steps {steps}; lost {lost}",
               lost=lost)
        if i == 0 and survived:  # the finished run, resumed again: reported complete, untouched
            final = snapshot(out)
            again = subprocess.run([sys.executable, "-m", "opd_plugins", "train", str(path), "--resume"], env=env,
                                   capture_output=True, text=True, timeout=600)
            ok = again.returncode == 0 and "complete" in again.stderr and snapshot(out) == final
            record(results, "control", "--resume of a finished run reports it complete, changes nothing", ok,
                   f"exit {again.returncode}")
            changed = subprocess.run([sys.executable, "-m", "opd_plugins", "train", str(path), "--resume",
                                      "trainer.args.learning_rate=5e-4"], env=env, capture_output=True, text=True,
                                     timeout=600)
            ok = changed.returncode == 2 and "learning_rate: 0.001 -> 0.0005" in changed.stderr \
                and "Traceback" not in changed.stderr
            record(results, "bad input", "--resume with a changed learning rate", ok, f"exit {changed.returncode}")


# ---------------------------------------------------------------------------------------------------------------
# 3. Teacher faults
# ---------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultProxy:
    """Forwards to ``upstream``; from the second POST on (the first is the setup probe), ``fault(payload)`` edits
    the decoded answer, or ``fault`` is one of "drip", "http500", "badjson"."""

    def __init__(self, upstream: str):
        self.fault = None
        self.posts = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self, body: bytes | None) -> bytes:
                req = urllib.request.Request(upstream + self.path, data=body, method=self.command,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=120) as r:
                    return r.read()

            def _reply(self, status: int, data: bytes, drip: bool = False):
                head = (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                        "\r\n").encode()
                if not drip:
                    self.wfile.write(head + data)
                    return
                for i in range(len(head) + len(data)):
                    self.wfile.write((head + data)[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.5)

            def do_GET(self):
                self._reply(200, self._forward(None))

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                proxy.posts += 1
                fault = proxy.fault if proxy.posts > 1 else None
                if fault == "http500":
                    return self._reply(500, b'{"error": {"message": "engine dead"}}')
                data = self._forward(body)
                if fault == "badjson":
                    return self._reply(200, data[: len(data) // 2])
                if fault == "drip":
                    return self._reply(200, data, drip=True)
                if callable(fault):
                    payload = json.loads(data)
                    fault(payload)
                    data = json.dumps(payload).encode()  # json writes NaN as NaN, as a careless server would
                self._reply(200, data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *a: None
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def each_entry(edit):
    """A fault that edits every completion-position entry of every choice: ``edit(token_id, entry_dict)``."""
    def fault(payload):
        for choice in payload["choices"]:
            for entry in choice["prompt_logprobs"][1:]:
                for tok, value in list(entry.items()):
                    edit(tok, value, entry)
    return fault


def _second(edit):
    """Apply ``edit`` to the second-best entry of a position (a non-sampled top-k entry when k > 1)."""
    def apply(tok, value, entry):
        if value.get("rank") == 2:
            edit(tok, value, entry)
    return apply


TEACHER_FAULTS = [
    ("positive log-probs", each_entry(lambda t, v, e: v.update(logprob=abs(v["logprob"]) + 5.0))),
    ("log-probs of -1e30", each_entry(lambda t, v, e: v.update(logprob=-1e30))),
    ("boolean log-probs", each_entry(lambda t, v, e: v.update(logprob=True))),
    ("string log-probs", each_entry(lambda t, v, e: v.update(logprob=str(v["logprob"])))),
    ("NaN in a non-sampled top-k entry", each_entry(_second(lambda t, v, e: v.update(logprob=float("nan"))))),
    ("top-k entry that is not a mapping", each_entry(_second(lambda t, v, e: e.__setitem__(t, [v["logprob"]])))),
    ("another tokenizer (decoded text differs)", each_entry(lambda t, v, e: v.update(decoded_token="\u2581zz"))),
    ("one entry missing (misaligned)", lambda p: p["choices"][0]["prompt_logprobs"].pop()),
    ("no prompt_logprobs", lambda p: [c.pop("prompt_logprobs") for c in p["choices"]]),
    ("server drips one byte every 0.5 s", "drip"),
    ("HTTP 500 forever", "http500"),
    ("truncated JSON", "badjson"),
]


def teacher_faults(work: Path, model: Path, teacher: Path, results: list[dict]) -> None:
    port = free_port()
    log = open(work / "serve.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "opd_plugins", "serve-teacher", str(teacher), "--port",
                               str(port)], stdout=log, stderr=subprocess.STDOUT, env=subprocess_env())
    upstream = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"{upstream}/health", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("serve-teacher did not start: " + (work / "serve.log").read_text()) from None
            time.sleep(0.3)
    proxy = FaultProxy(upstream)
    try:
        for case, fault in [("no fault (control)", None), *TEACHER_FAULTS]:
            out = work / f"teacher-{len(results)}"
            recipe = base_recipe(model, out)
            recipe["teacher"] = {"name": "openai_server", "params": {
                "base_url": proxy.url, "top_k": 4, "timeout_s": 3.0, "max_retries": 1, "backoff_s": 0.05}}
            recipe["divergence"] = {"name": "topk_kl"}
            recipe["objective"] = {"policy_gradient": 0.0, "divergence": 1.0}
            path = dump(work / f"{out.name}.yaml", recipe)
            proxy.fault, proxy.posts = fault, 0
            t0 = time.monotonic()
            error, steps = train_quietly(path, out)
            secs = time.monotonic() - t0
            if fault is None:
                record(results, "control", f"teacher: {case}", steps == 3 and not error, f"{steps} steps {error}")
                continue
            ok = steps == 0 and error.startswith("TeacherError") and not list(out.glob("checkpoint-*"))
            record(results, "teacher fault", case, ok, f"{steps} steps trained, {secs:.1f} s; {error}", steps=steps)
    finally:
        proxy.stop()
        server.terminate()
        server.wait(30)
        log.close()

    # A plugin's loss term that turns NaN at step 2: the gradient guard stops before the optimizer applies it.
    (work / "nan_term.py").write_text(
        "import torch\nfrom opd_plugins import hookimpl\n\n@hookimpl\ndef opd_loss_terms(trainer, inputs, terms):\n"
        "    if trainer.state.global_step >= 1:\n        p = next(q for q in trainer.model.parameters() if "
        "q.requires_grad)\n        return {'nan_term': p.sum() * float('nan')}\n")
    sys.path.insert(0, str(work))
    out = work / "nan-term"
    recipe = base_recipe(model, out)
    recipe["plugins"] = ["nan_term"]
    path = dump(work / "nan-term.yaml", recipe)
    code, err, _ = run_cli(["train", str(path)])
    finite = True
    for ckpt in out.glob("checkpoint-*"):
        from safetensors.torch import load_file

        for f in ckpt.glob("*.safetensors"):
            finite &= all(bool(t.isfinite().all()) for t in load_file(str(f)).values() if t.is_floating_point())
    steps = loss_steps(out)
    applied = len([s for s in steps if s >= 2])
    ok = code == 2 and "TrainingError" in err and "step 2" in err and finite and not (out / "final").exists()
    record(results, "teacher fault", "NaN loss term from a plugin at step 2", ok,
           f"exit {code}, NaN steps applied {applied}, checkpoints {sorted(p.name for p in out.glob('checkpoint-*'))}"
           f" finite={finite}", steps=applied)


# ---------------------------------------------------------------------------------------------------------------
# 4. Cache corruptions
# ---------------------------------------------------------------------------------------------------------------


def cache_corruptions(work: Path, model: Path, teacher: Path, results: list[dict]) -> None:
    from safetensors.torch import load_file, save_file

    from opd_plugins.errors import OPDError
    from opd_plugins.commands.precompute_teacher import precompute_teacher
    from opd_plugins.recipe import load_recipe
    from opd_plugins.runs import train
    from opd_plugins.teachers.cache.format import FORMAT, MANIFEST, file_sha256

    rollouts = work / "rollouts.jsonl"
    with open(rollouts, "w") as f:
        for q in ("What is 3 + 4?", "What is 6 times 8?", "Which is larger: 31 or 57?", "What is 12 + 30?"):
            for c in ("The answer is 7.", "48", "57 is larger", "one two", "42", "I think 7"):
                f.write(json.dumps({"prompt": [{"role": "user", "content": q}], "completion": c}) + "\n")

    def recipe_for(out: Path, teacher_spec: dict, **extra) -> Path:
        r = {"model": {"name_or_path": str(model)}, "data": {"dataset": {"path": str(rollouts)}},
             "trainer": {"args": {**ARGS, "max_steps": 2, "max_completion_length": 12, "num_generations": 2}},
             "teacher": teacher_spec, "divergence": {"name": "topk_kl"},
             "objective": {"policy_gradient": 0.0, "divergence": 1.0}, "evaluation": {"enabled": False},
             "output_dir": str(out), **extra}
        return dump(work / f"{out.name}.yaml", r)

    pristine = work / "cache"
    r, pm = load_recipe(recipe_for(work / "pre", {"name": "hf_model", "params": {"model": str(teacher)}}))
    precompute_teacher(r, pm, rollouts=str(rollouts), out_dir=pristine, shard_size=6, top_k=4, progress=False,
                       provenance={"sft_teacher": str(teacher)})
    manifest = json.loads((pristine / MANIFEST).read_text())

    def rehash(cache: Path) -> None:
        m = json.loads((cache / MANIFEST).read_text())
        for s in m["shards"]:
            s["sha256"] = file_sha256(cache / s["file"])
        (cache / MANIFEST).write_text(json.dumps(m))

    def rewrite(edit):
        def apply(cache: Path) -> None:
            for s in manifest["shards"]:
                file = cache / s["file"]
                tensors = load_file(str(file))
                edit(tensors)
                save_file(tensors, str(file), metadata={FORMAT: json.dumps({"shard": s["index"], "top_k": 4},
                                                                           sort_keys=True)})
            rehash(cache)
        return apply

    def flip(cache: Path) -> None:
        for s in manifest["shards"]:
            data = bytearray((cache / s["file"]).read_bytes())
            data[-9] ^= 0x04
            (cache / s["file"]).write_bytes(bytes(data))

    def swap(cache: Path) -> None:
        a, b = cache / manifest["shards"][0]["file"], cache / manifest["shards"][1]["file"]
        a.rename(cache / "tmp")
        b.rename(a)
        (cache / "tmp").rename(b)

    def truncate(cache: Path) -> None:
        for s in manifest["shards"]:
            data = (cache / s["file"]).read_bytes()
            (cache / s["file"]).write_bytes(data[: len(data) // 2])

    def header(cache: Path) -> None:
        for s in manifest["shards"]:
            data = (cache / s["file"]).read_bytes()
            (cache / s["file"]).write_bytes(b"\xff" * 8 + data[8:])
        rehash(cache)

    def delete(cache: Path) -> None:
        (cache / manifest["shards"][-1]["file"]).unlink()

    def unsort(t):
        t["topk_logps"] = t["topk_logps"].flip(-1).contiguous()
        t["topk_ids"] = t["topk_ids"].flip(-1).contiguous()

    corruptions = [
        ("no corruption (control)", None),
        ("one flipped bit per shard", flip),
        ("two shard files swapped", swap),
        ("truncated shards", truncate),
        ("corrupt safetensors header (manifest re-hashed)", header),
        ("deleted shard", delete),
        ("token log-probs +5 (manifest re-hashed)", rewrite(lambda t: t["token_logps"].add_(5.0))),
        ("top-k log-probs +5 (manifest re-hashed)", rewrite(lambda t: t["topk_logps"].add_(5.0))),
        ("token log-probs -1e30 (manifest re-hashed)", rewrite(lambda t: t["token_logps"].fill_(-1e30))),
        ("NaN in cached top-k (manifest re-hashed)", rewrite(lambda t: t["topk_logps"][:, -1].fill_(float("nan")))),
        ("top-k reversed (manifest re-hashed)", rewrite(unsort)),
    ]
    for case, corrupt in corruptions:
        cache = work / f"cache-{len(results)}"
        shutil.copytree(pristine, cache)
        if corrupt is not None:
            corrupt(cache)
        out = work / f"train-{cache.name}"
        spec = {"name": "offline_cache", "params": {"path": str(cache), "teacher": str(teacher)}}
        path = recipe_for(out, spec, rollout={"name": "replay", "params": {"path": str(cache)}})
        error, steps = train_quietly(path, out)
        if corrupt is None:
            record(results, "control", f"cache: {case}", steps == 2 and not error, f"{steps} steps {error}")
            continue
        ok = steps == 0 and error.startswith("TeacherError") and not list(out.glob("checkpoint-*"))
        record(results, "cache corruption", case, ok, f"{steps} steps trained; {error}", steps=steps)


# ---------------------------------------------------------------------------------------------------------------


def table(results: list[dict]) -> str:
    def of(group):
        return [r for r in results if r["group"] == group]

    bad, kill, teach, cache, control = (of(g) for g in ("bad input", "kill", "teacher fault", "cache corruption",
                                                         "control"))
    rows = [
        ("bad inputs tried / cleanly rejected", f"{len(bad)} / {sum(r['ok'] for r in bad)} "
         f"({100 * sum(r['ok'] for r in bad) / max(len(bad), 1):.0f}%)"),
        ("kills survived / checkpoints lost", f"{sum(r['ok'] for r in kill)} of {len(kill)} / "
         f"{sum(r.get('lost', 0) for r in kill)}"),
        ("teacher faults injected / steps trained on bad data", f"{len(teach)} / {sum(r.get('steps', 0) for r in teach)}"),
        ("cache corruptions / steps trained on corrupted data", f"{len(cache)} / {sum(r.get('steps', 0) for r in cache)}"),
        ("control runs and checks that must succeed", f"{sum(r['ok'] for r in control)} of {len(control)}"),
    ]
    lines = ["| fault | result |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]
    failed = [r for r in results if not r["ok"]]
    if failed:
        lines += ["", "Failed cases:", *(f"- [{r['group']}] {r['case']}: {r['detail']}" for r in failed)]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "fault_suite"), help="where the results are written")
    p.add_argument("--kills", type=int, default=8, help="kills to try (the first three in the middle of writing a checkpoint)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", choices=["inputs", "kills", "teacher", "cache"], help="run only these groups")
    args = p.parse_args()

    from opd_plugins.testing import build_tokenizer, save_tiny_model

    groups = set(args.only or ["inputs", "kills", "teacher", "cache"])
    work = Path(tempfile.mkdtemp(prefix="opd-fault-suite-"))
    t0 = time.monotonic()
    results: list[dict] = []
    try:
        tok = build_tokenizer()
        model = save_tiny_model(work / "student", seed=0, tokenizer=tok)
        teacher = save_tiny_model(work / "teacher", seed=3, hidden=96, tokenizer=tok)
        if "inputs" in groups:
            bad_inputs(work, model, results)
        if "kills" in groups:
            kills(work, model, results, args.kills, args.seed)
        if "teacher" in groups:
            teacher_faults(work, model, teacher, results)
        if "cache" in groups:
            cache_corruptions(work, model, teacher, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = table(results)
    minutes = (time.monotonic() - t0) / 60
    print(f"\n{text}\n\n{len(results)} cases in {minutes:.1f} min")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fault_suite.json").write_text(json.dumps({"results": results, "minutes": round(minutes, 1)}, indent=1))
    (out / "fault_suite.md").write_text(text + "\n")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
