"""Tests of ``example_tv``: the opd_plugins contract suite, plus numerics against a naive reference."""

from __future__ import annotations

import math

import torch

from opd_example_plugin.tv import TotalVariation
from opd_plugins.divergences.base import StudentOutputs
from opd_plugins.teachers.base import TeacherScores
from opd_plugins.testing import DivergenceContract


class TestTotalVariation(DivergenceContract):
    component = TotalVariation


def _inputs(B: int, T: int, V: int, seed: int, mask: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(B, T, V, generator=g) * 3
    t_logps = torch.log_softmax(torch.randn(B, T, V, generator=g) * 3, -1)
    tokens = torch.randint(V, (B, T), generator=g)
    mask = torch.ones(B, T) if mask is None else mask
    student = StudentOutputs(
        token_logps=torch.log_softmax(s_logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
        mask=mask, logits=s_logits,
    )
    teacher = TeacherScores(token_logps=t_logps.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), mask=mask.clone(),
                            logps=t_logps)
    return s_logits, t_logps, student, teacher


def _naive_tv(s_logits: torch.Tensor, t_logps: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    """½ Σ_v |p_s(v) − p_t(v)| with explicit loops over batch, position and vocabulary."""
    B, T, V = s_logits.shape
    out = []
    for b in range(B):
        row = []
        for t in range(T):
            logits = [float(x) for x in s_logits[b, t]]
            top = max(logits)
            z = sum(math.exp(x - top) for x in logits)
            total = 0.0
            for v in range(V):
                p_s = math.exp(logits[v] - top) / z
                p_t = math.exp(float(t_logps[b, t, v]))
                total += abs(p_s - p_t)
            row.append(0.5 * total * float(mask[b, t]))
        out.append(row)
    return out


def test_matches_naive_reference():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0]])
    s_logits, t_logps, student, teacher = _inputs(2, 4, 6, seed=0, mask=mask)
    terms = TotalVariation().per_token(student, teacher)
    expected = torch.tensor(_naive_tv(s_logits, t_logps, mask))
    assert torch.allclose(terms.value, expected, atol=1e-6)
    assert torch.allclose(terms.loss.detach(), expected, atol=1e-6)
    assert terms.value[0, 3] == 0 and terms.value[1, 1] == 0


def test_reward_depends_on_the_sampled_token_and_averages_to_minus_tv():
    """Σ_x π_s(x) · reward(x) = −TV exactly: the reward is an unbiased single-sample estimate."""
    s_logits, t_logps, student, teacher = _inputs(2, 3, 5, seed=1)
    div = TotalVariation()
    s_logps = torch.log_softmax(s_logits, -1)
    expected = torch.zeros(2, 3)
    for x in range(s_logits.shape[-1]):
        tokens = torch.full((2, 3), x)
        student_x = StudentOutputs(token_logps=s_logps[..., x], mask=student.mask, logits=s_logits)
        teacher_x = TeacherScores(token_logps=t_logps[..., x], mask=teacher.mask, logps=t_logps)
        reward = div.reward(student_x, teacher_x)
        assert reward.shape == tokens.shape and (reward <= 0).all()
        expected += s_logps[..., x].exp() * reward
    assert torch.allclose(expected, -div.per_token(student, teacher).value, atol=1e-6)


def test_reward_is_finite_and_masked():
    mask = torch.tensor([[1.0, 0.0]])
    student = StudentOutputs(token_logps=torch.tensor([[-200.0, -1e4]]), mask=mask, logits=torch.zeros(1, 2, 3))
    teacher = TeacherScores(token_logps=torch.tensor([[-0.1, -0.1]]), mask=mask.clone(),
                            logps=torch.log_softmax(torch.zeros(1, 2, 3), -1))
    reward = TotalVariation().reward(student, teacher)
    assert torch.isfinite(reward).all() and reward[0, 1] == 0 and reward[0, 0] < 0


def test_bounded_between_zero_and_one():
    for seed in range(5):
        _, _, student, teacher = _inputs(3, 5, 9, seed=seed)
        value = TotalVariation().per_token(student, teacher).value
        assert (value >= 0).all() and (value <= 1 + 1e-6).all()
    # Disjoint supports reach the upper bound: TV = 1.
    s_logits = torch.tensor([[[30.0, -30.0]]])
    t_logps = torch.log_softmax(torch.tensor([[[-30.0, 30.0]]]), -1)
    student = StudentOutputs(token_logps=torch.zeros(1, 1), mask=torch.ones(1, 1), logits=s_logits)
    teacher = TeacherScores(token_logps=torch.zeros(1, 1), mask=torch.ones(1, 1), logps=t_logps)
    assert torch.allclose(TotalVariation().per_token(student, teacher).value, torch.ones(1, 1), atol=1e-6)


def test_needs_full_teacher_scores():
    assert TotalVariation().requires() == "full"


def test_registered_by_the_example_plugin(opd_plugin_manager):
    entry = opd_plugin_manager.registry.entry("divergence", "example_tv")
    assert entry.cls is TotalVariation
    assert entry.plugin.name == "example" and entry.plugin.dist == "opd-example-plugin"
