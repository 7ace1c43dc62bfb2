"""benchmarks/plugin_overhead.py: the lockstep (``--paired``) mode really alternates the two trainers step by step,
and its summary is the median of the paired ratios (never a timing assertion)."""

import json
import threading
import time

from helpers.benchmarks import run

import plugin_overhead  # benchmarks/, on sys.path through helpers.benchmarks


def test_turns_alternate_and_never_overlap():
    turns = plugin_overhead.Turns()
    log: list[tuple[int, str, int]] = []
    active = []

    callbacks = [turns.callback(0), turns.callback(1)]
    overlaps = []

    def trainer(me: int, steps: int):
        cb = callbacks[me]
        try:
            for step in range(steps):
                cb.on_step_begin(None, None, None)
                active.append(me)
                if len(set(active)) > 1:
                    overlaps.append(step)          # both trainers inside a step at once
                log.append((me, "step", step))
                time.sleep(0.002)
                active.remove(me)
        finally:
            cb.on_train_end(None, None, None)

    threads = [threading.Thread(target=trainer, args=(0, 4)), threading.Thread(target=trainer, args=(1, 6))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads)   # (threads here; the benchmark runs the trainers as processes)
    assert overlaps == []
    # 0, 1, 0, 1, ... while both run, then the longer one alone (the other's end hands it the turn for good).
    assert [m for m, _, _ in log] == [0, 1, 0, 1, 0, 1, 0, 1, 1, 1]
    assert [s for m, _, s in log if m == 1] == list(range(6))


def test_paired_summary_is_the_median_of_step_ratios():
    trl = [(9.0, 9.0)] + [(0.1 * k, 0.2 * k) for k in range(1, 6)]
    opd = [(1.0, 1.0)] + [(0.1 * k * r, 0.2 * k * r) for k, r in zip(range(1, 6), [1.0, 1.1, 0.9, 1.2, 1.05])]
    s = plugin_overhead.paired_summary({"trl": trl, "opd": opd})
    assert s["pairs"] == 5                                   # the warm-up pair is left out
    assert abs(s["wall"]["median_ratio"] - 1.05) < 1e-9 and abs(s["cpu"]["median_ratio"] - 1.05) < 1e-9
    lo, hi = s["wall"]["ci95"]
    assert 0.9 <= lo <= 1.05 <= hi <= 1.2


def test_paired_mode_runs_both_trainers(tmp_path):
    proc = run("plugin_overhead.py", tmp_path, "--paired", "4", "--hidden", "32", "--layers", "1")
    r = json.loads(proc.stdout[proc.stdout.rindex("\n{\n") + 1:])   # after the trainers' own log lines
    assert r["pairs"] == 3
    assert set(r["wall"]) == {"median_ratio", "ci95", "median_ms"} and r["wall"]["median_ms"]["trl"] > 0
