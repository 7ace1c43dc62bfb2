"""Component numerics against naive reference implementations and hand-computed cases."""

import math

import pytest
import torch

from opd_plugins.advantages import GRPOAdvantage, degenerate_groups
from opd_plugins.divergences import ReverseKL, StudentOutputs
from opd_plugins.schedules import Constant, Cosine, Linear, WarmupDecay
from opd_plugins.teachers.base import TeacherScores
from opd_plugins.testing.contracts import DivergenceContract, make_inputs, random_pair


def naive_reverse_kl(p_logits, q_logps):
    """Σ_v p(v) (log p(v) − log q(v)) with explicit loops."""
    B, T, V = p_logits.shape
    out = torch.zeros(B, T)
    for b in range(B):
        for t in range(T):
            logp = torch.log_softmax(p_logits[b, t].double(), -1)
            out[b, t] = sum(math.exp(logp[v]) * (logp[v] - q_logps[b, t, v].double()) for v in range(V))
    return out


def test_full_reverse_kl_matches_naive_values_and_gradients():
    s_logits, t_logps, tokens = random_pair(B=2, T=3, V=7, seed=11)
    ref_logits = s_logits.clone().requires_grad_(True)
    logits, student, teacher = make_inputs(s_logits, t_logps, tokens)
    terms = ReverseKL(ReverseKL.Params(estimator="full")).per_token(student, teacher)
    assert torch.allclose(terms.value, naive_reverse_kl(s_logits, t_logps), atol=1e-5)
    terms.loss.sum().backward()
    ref_logp = torch.log_softmax(ref_logits, -1)
    (ref_logp.exp() * (ref_logp - t_logps)).sum().backward()
    assert torch.allclose(logits.grad, ref_logits.grad, atol=1e-5)


def test_sampled_reverse_kl_gradient_is_exact_in_expectation():
    """Σ_x p(x)·∇surrogate(x) equals ∇KL(p‖q): the score-function surrogate is unbiased per position."""
    s_logits, t_logps, _ = random_pair(B=2, T=2, V=6, seed=12)
    div = ReverseKL()
    V = s_logits.shape[-1]
    probs = torch.softmax(s_logits, -1).detach()
    grad = torch.zeros_like(s_logits)
    expected_value = torch.zeros(2, 2)
    for x in range(V):
        tokens = torch.full((2, 2), x, dtype=torch.long)
        logits, student, teacher = make_inputs(s_logits, t_logps, tokens)
        terms = div.per_token(student, teacher)
        (terms.loss * probs[..., x]).sum().backward()
        grad += logits.grad
        expected_value += probs[..., x] * terms.value
    ref = s_logits.clone().requires_grad_(True)
    lp = torch.log_softmax(ref, -1)
    (lp.exp() * (lp - t_logps)).sum().backward()
    assert torch.allclose(grad, ref.grad, atol=1e-5)
    assert torch.allclose(expected_value, naive_reverse_kl(s_logits, t_logps), atol=1e-5)


def test_naive_log_ratio_loss_would_fail_the_contract():
    """The contract catches the classic bug: a sampled-token penalty whose gradient ignores the teacher."""

    class Wrong(ReverseKL):
        """Wrong: loss = log p_s − log p_t (zero expected gradient)."""

        def per_token(self, student, teacher):
            terms = super().per_token(student, teacher)
            terms.loss = (student.token_logps - teacher.token_logps) * student.mask
            return terms

    class Check(DivergenceContract):
        component = Wrong

    with pytest.raises(AssertionError):
        Check().test_zero_when_teacher_equals_student()


def test_sampled_reward_is_minus_log_ratio_of_sampled_token():
    s_logits, t_logps, tokens = random_pair(seed=13)
    _, student, teacher = make_inputs(s_logits, t_logps, tokens, requires_grad=False)
    r = ReverseKL().reward(student, teacher)
    assert torch.allclose(r, -(student.token_logps - teacher.token_logps))


def test_grpo_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0])
    adv = GRPOAdvantage().sequence_advantages(rewards, 2)
    # group 0: mean .5, std (Bessel) .7071 -> ±.5/.7072; group 1: all equal -> 0; group 2: all equal -> 0
    s = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert torch.allclose(adv, torch.tensor([s, -s, 0, 0, 0, 0]), atol=1e-6)
    none = GRPOAdvantage(GRPOAdvantage.Params(scale="none")).sequence_advantages(rewards, 2)
    assert torch.allclose(none, torch.tensor([0.5, -0.5, 0, 0, 0, 0]))
    batch = GRPOAdvantage(GRPOAdvantage.Params(scale="batch")).sequence_advantages(rewards, 2)
    assert torch.allclose(batch, none / (rewards.std() + 1e-4), atol=1e-6)


def test_grpo_matches_trl_formula():
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(16, generator=g)
    rewards[3] = float("nan")
    G = 4
    mean = torch.nanmean(rewards.view(-1, G), 1).repeat_interleave(G)
    std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G)
    ref = torch.nan_to_num((rewards - mean) / (std + 1e-4), nan=0.0)
    assert torch.allclose(GRPOAdvantage().sequence_advantages(rewards, G), ref, atol=1e-6)


def test_grpo_zero_variance_group_gets_zero_advantage():
    from opd_plugins.advantages import AdvantageInputs

    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])
    adv = GRPOAdvantage().compute(AdvantageInputs(rewards, 2, local=slice(0, 2)))
    assert torch.equal(adv, torch.zeros(2))


def test_degenerate_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, float("nan"), float("nan"), 0.0, float("nan")])
    assert degenerate_groups(rewards, 2) == [0, 2, 3]


def test_schedules():
    assert Constant(Constant.Params(value=0.3)).value(7, 10) == 0.3
    lin = Linear(Linear.Params(start=1.0, end=0.0))
    assert lin.value(0, 10) == 1.0 and abs(lin.value(5, 10) - 0.5) < 1e-9 and lin.value(20, 10) == 0.0
    cos = Cosine(Cosine.Params(start=1.0, end=0.0))
    assert abs(cos.value(5, 10) - 0.5) < 1e-9 and abs(cos.value(10, 10)) < 1e-9
    wd = WarmupDecay(WarmupDecay.Params(peak=2.0, warmup_steps=4, end=0.0, decay="linear"))
    assert [wd.value(s, 8) for s in (0, 2, 4, 6, 8)] == [0.0, 1.0, 2.0, 1.0, 0.0]


def test_teacher_scores_validation_refuses_nan_and_misalignment():
    from opd_plugins.errors import TeacherError
    from opd_plugins.teachers.base import TeacherBatch

    batch = TeacherBatch(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.zeros(2, 4, dtype=torch.long),
                         torch.ones(2, 4))
    bad = TeacherScores(token_logps=torch.zeros(2, 3), mask=torch.ones(2, 3))
    with pytest.raises(TeacherError, match="misaligned"):
        bad.validate(batch, "t")
    nan = TeacherScores(token_logps=torch.tensor([[0.0, float("nan"), 0, 0], [0, 0, 0, 0]]), mask=torch.ones(2, 4))
    with pytest.raises(TeacherError, match="rows \\[0\\]"):
        nan.validate(batch, "t")
    assert nan.validate(batch, "t", allow_nonfinite=True) == 1
    assert nan.mask[0, 1] == 0 and torch.isfinite(nan.token_logps).all()


def test_student_outputs_dataclass_roundtrip():
    s = StudentOutputs(token_logps=torch.zeros(1, 2), mask=torch.ones(1, 2))
    assert s.logits is None
