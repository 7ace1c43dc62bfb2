"""Sampled-token divergences on tokens drawn by an OLDER policy (a generation batch reused across optimizer steps or
iterations): with ρ_t = π_θ/π_old their expected gradient, enumerated exactly over the vocabulary with x ~ π_old,
is the gradient of the divergence of the CURRENT policy (issue 12.3). Without ρ it is not."""

from __future__ import annotations

import pytest
import torch

from opd_plugins.divergences.base import StudentOutputs
from opd_plugins.manager import get_plugin_manager
from opd_plugins.teachers.base import TeacherScores
from opd_plugins.testing import random_pair

REGISTRY = get_plugin_manager().registry


def _kl(p_logits, q_logps):
    p = torch.log_softmax(p_logits, -1)
    return (p.exp() * (p - q_logps)).sum(-1)


def expected_grad_under_old(div, s_logits, old_logits, t_logps, use_old=True):
    """Σ_x π_old(x)·∇_θ loss(x): the expected gradient when the sampled tokens come from π_old."""
    V = s_logits.shape[-1]
    old_lp = torch.log_softmax(old_logits, -1)
    grad = torch.zeros_like(s_logits)
    for x in range(V):
        tokens = torch.full(s_logits.shape[:2], x, dtype=torch.long)
        z = s_logits.clone().requires_grad_(True)
        lp = torch.log_softmax(z, -1).gather(-1, tokens[..., None]).squeeze(-1)
        mask = torch.ones(tokens.shape)
        student = StudentOutputs(token_logps=lp, mask=mask, old_token_logps=old_lp.gather(-1, tokens[..., None])
                                 .squeeze(-1) if use_old else None)
        teacher = TeacherScores(token_logps=t_logps.gather(-1, tokens[..., None]).squeeze(-1), mask=mask.clone())
        (div.per_token(student, teacher).loss * old_lp[..., x].exp()).sum().backward()
        grad += z.grad
    return grad


def reference_grad(s_logits, fn):
    z = s_logits.clone().requires_grad_(True)
    fn(z).sum().backward()
    return z.grad


REVERSE = [("reverse_kl", {"estimator": "sampled"}), ("k1", {}), ("k2", {}), ("k3", {"surrogate": "score_function"}),
           ("g_opd", {"reward_scale": 1.0})]


@pytest.mark.parametrize("name,params", REVERSE, ids=[n for n, _ in REVERSE])
def test_expected_gradient_under_an_older_policy_is_the_current_reverse_kl_gradient(name, params):
    div = REGISTRY.build("divergence", (name, params))
    s_logits, t_logps, _ = random_pair(B=2, T=3, V=6, seed=3)
    old_logits = s_logits + torch.randn(s_logits.shape, generator=torch.Generator().manual_seed(4))  # π_old ≠ π_θ
    got = expected_grad_under_old(div, s_logits, old_logits, t_logps)
    want = reference_grad(s_logits, lambda z: _kl(z, t_logps))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    without = expected_grad_under_old(div, s_logits, old_logits, t_logps, use_old=False)
    assert (without - want).abs().max() > 1e-2  # the uncorrected surrogate is biased off-policy


def test_k3_pathwise_under_an_older_policy_follows_the_forward_kl_gradient_as_on_policy():
    div = REGISTRY.build("divergence", ("k3", {"surrogate": "pathwise"}))
    s_logits, t_logps, _ = random_pair(B=2, T=3, V=6, seed=5)
    old_logits = s_logits + torch.randn(s_logits.shape, generator=torch.Generator().manual_seed(6))
    got = expected_grad_under_old(div, s_logits, old_logits, t_logps)
    want = reference_grad(s_logits, lambda z: (t_logps.exp() * (t_logps - torch.log_softmax(z, -1))).sum(-1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_on_policy_the_ratio_is_one_and_the_gradient_is_the_plain_score_function():
    s_logits, t_logps, tokens = random_pair(B=2, T=3, V=6, seed=7)
    z = s_logits.clone().requires_grad_(True)
    lp = torch.log_softmax(z, -1).gather(-1, tokens[..., None]).squeeze(-1)
    st = StudentOutputs(token_logps=lp, mask=torch.ones(tokens.shape))
    assert torch.equal(st.policy_ratio().detach(), torch.ones_like(lp))
    te = TeacherScores(token_logps=t_logps.gather(-1, tokens[..., None]).squeeze(-1), mask=torch.ones(tokens.shape))
    REGISTRY.build("divergence", "k1").per_token(st, te).loss.sum().backward()
    z2 = s_logits.clone().requires_grad_(True)
    lp2 = torch.log_softmax(z2, -1).gather(-1, tokens[..., None]).squeeze(-1)
    ((lp2 - te.token_logps).detach() * lp2).sum().backward()  # sg(k1)·log π: the classic surrogate
    torch.testing.assert_close(z.grad, z2.grad)
