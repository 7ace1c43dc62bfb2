"""benchmarks/samplers.py: ``--quick`` end to end (every arm, the JSON, equal token budgets, the samplers acting;
never an accuracy), and the token counter leaving forced prefix tokens out."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.benchmarks import check_arms, quick, table_rows

import _arms  # benchmarks/, on sys.path through helpers.benchmarks

ARMS = ["grpo", "oracle_prefix", "guide", "hint_ladder", "prefix_rl"]


def test_quick_runs_every_sampler_to_the_same_budget(tmp_path):
    proc, r = quick("samplers.py", tmp_path)
    check_arms(r, ARMS)
    for name, arm in r["arms"].items():
        (run,) = arm["runs"]
        assert run["groups"] == run["rollouts"] // 2  # num_generations 2 in --quick
        assert 0.0 <= run["non_degenerate_share"] <= 1.0
        # one record per training generation batch, tokens rising to the run's total
        assert len(run["per_batch"]) == run["generation_batches"]
        assert [b["tokens"] for b in run["per_batch"]] == sorted(b["tokens"] for b in run["per_batch"])
        assert run["per_batch"][-1]["tokens"] == run["tokens"]
        shares = [b["non_degenerate_share"] for b in run["per_batch"]]
        assert sum(s * run["groups"] / len(shares) for s in shares) == pytest.approx(
            run["non_degenerate_share"] * run["groups"])  # equal-size batches: their mean is the run's share
        # the tiny model fails every prompt, so every sampler guides the prompts it sees again; GRPO never does
        assert (run["guided_share"] > 0) == (name != "grpo"), name
    assert all(set(row) >= {"accuracy", "se", "non_degenerate_share", "guided_share", "tokens_used"}
               for row in r["table"])
    header, arms = table_rows(proc.stdout)
    assert header == ["arm", "held-out accuracy ± SE (no hint)", "non-degenerate groups", "guided rollouts",
                      "tokens used", "steps"]
    assert arms == ARMS
    assert Path(r["per_batch_png"]).stat().st_size > 0


def _trainer(guided=None, training=True, num_generations=2):
    return SimpleNamespace(model=SimpleNamespace(training=training), step=SimpleNamespace(guided=guided),
                           num_generations=num_generations, reward_weights=torch.ones(1))


def test_student_tokens_leave_forced_prefixes_out_and_count_non_degenerate_groups():
    counter = _arms.StudentTokens()
    completions = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11]]
    guided = SimpleNamespace(prefix_ids=[[1, 2], [], [8, 9, 10], [99, 98]], roles=["prefix", "none", "prefix", "swap"])
    counter.opd_rollout_end(_trainer(guided), {"completion_ids": completions})
    # naive: every kept completion token that is not one of the forced prefix's (cut at the completion's length)
    want = sum(len(c) - min(len(p), len(c)) for c, p in zip(completions, guided.prefix_ids))
    assert counter.tokens == want == 3 + 2 + 0 + 0
    assert counter.guided == 3 and counter.rollouts == 4 and counter.batches == 1
    counter.opd_rollout_end(_trainer(None), {"completion_ids": completions})  # unguided: every token
    assert counter.tokens == want + 11
    counter.opd_rollout_end(_trainer(None, training=False), {"completion_ids": completions})  # evaluation: not counted
    assert counter.tokens == want + 11 and counter.batches == 2

    rewards = torch.tensor([[0.0], [1.0], [1.0], [1.0], [1.0], [float("nan")], [0.5], [0.5]])
    counter.opd_rewards_scored(_trainer(), rewards, ["r"])
    assert counter.groups == 4 and counter.non_degenerate == 1  # [0, 1] only; [1, nan] has one scored reward
    # the batch's record: its share of non-degenerate groups and the mean of its scored rewards (NaN left out)
    (record,) = counter.per_batch
    assert record["batch"] == 2 and record["tokens"] == want + 11
    assert record["non_degenerate_share"] == 0.25
    assert record["reward"] == pytest.approx((0 + 1 + 1 + 1 + 1 + 0.5 + 0.5) / 7)
    counter.opd_rewards_scored(_trainer(training=False), rewards, ["r"])
    assert counter.groups == 4 and len(counter.per_batch) == 1
