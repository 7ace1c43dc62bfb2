"""The mismatch statistics a low-precision rollout backend is judged by: the log-prob gap's quantiles."""

import math

import pytest
import torch

from opd_plugins.correction import combine_stats, importance_weights


def test_gap_quantiles_of_the_valid_tokens():
    gaps = torch.tensor([[0.0, 0.1, -0.2, 0.3, 9.0], [0.5, -0.6, 0.7, 0.8, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])  # the first row's 9.0 is padding
    behaviour = torch.full_like(gaps, -1.0)
    s = importance_weights(behaviour + gaps, behaviour, mask).stats
    valid = sorted(abs(g) for g, m in zip(gaps.flatten().tolist(), mask.flatten().tolist()) if m)
    want = torch.quantile(torch.tensor(valid, dtype=torch.float64), torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    for key, value in zip(("logp_diff_abs_p50", "logp_diff_abs_p90", "logp_diff_abs_p99"), want.tolist()):
        assert s[key] == pytest.approx(value, rel=1e-5), key
    assert s["logp_diff_abs_p50"] <= s["logp_diff_abs_p90"] <= s["logp_diff_abs_p99"] <= s["logp_diff_abs_max"]
    assert s["logp_diff_abs_max"] == pytest.approx(9.0, rel=1e-5)


def test_gap_quantiles_are_zero_on_policy_and_without_tokens():
    logps = torch.log(torch.rand(2, 4))
    on = importance_weights(logps, logps, torch.ones(2, 4)).stats
    empty = importance_weights(logps, logps + 1, torch.zeros(2, 4)).stats
    for key in ("logp_diff_abs_p50", "logp_diff_abs_p90", "logp_diff_abs_p99"):
        assert on[key] == 0 and empty[key] == 0
    merged = combine_stats([on, {**on, "logp_diff_abs_p90": 1.0}])
    assert merged["logp_diff_abs_p90"] == 0.5 and not math.isnan(merged["logp_diff_abs_p99"])
