"""Correction weights of the divergence term, checked by enumeration on a tabular two-token policy.

The student π (tabular logits θ1 (V,) for the first token, θ2 (V, V) for the second given the first), a fixed
teacher τ and a behaviour policy μ ≠ π that sampled the completions. OPD's gradient treats each position's
divergence with its prefix fixed: g* = Σ_t E_{y_<t ~ π}[∇ D_t(y_<t)]. An estimator built from completions y ~ μ
follows E_μ[Σ_t w_t ∇ D_t(y_<t)]; it is computed exactly by summing over all V² completions with probability μ(y),
using the real divergence component and the real weights (``divergence_weights``).
"""

import math

import pytest
import torch

from opd_plugins.correction import CorrectionSpec, divergence_weights, importance_weights
from opd_plugins.divergences.base import StudentOutputs
from opd_plugins.divergences.forward_kl import ForwardKL
from opd_plugins.divergences.reverse_kl import ReverseKL
from opd_plugins.teachers.base import TeacherScores
from opd_plugins.testing import build_component

V = 4


def _tables(seed, scale):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g) * scale, torch.randn(V, V, generator=g) * scale


def _enumerated(theta1, theta2, teacher, behaviour):
    """Every completion (y1, y2): student logits (V², 2, V), teacher log-probs, tokens, and μ(y)."""
    y1, y2 = torch.meshgrid(torch.arange(V), torch.arange(V), indexing="ij")
    y1, y2 = y1.reshape(-1), y2.reshape(-1)
    logits = torch.stack([theta1.expand(V * V, V), theta2[y1]], 1)
    t1, t2 = teacher
    t_logps = torch.stack([torch.log_softmax(t1, -1).expand(V * V, V), torch.log_softmax(t2, -1)[y1]], 1)
    m1, m2 = (torch.log_softmax(x, -1) for x in behaviour)
    mu_logps = torch.stack([m1[y1], m2[y1, y2]], 1)
    return logits, t_logps, torch.stack([y1, y2], 1), mu_logps


def _reverse_kl(s, t):
    return (torch.softmax(s, -1) * (torch.log_softmax(s, -1) - torch.log_softmax(t, -1))).sum(-1)


def _forward_kl(s, t):
    return (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1)


def _expected_gradient(divergence, kl, spec, seed=0, scale=1.5):
    """E_μ[Σ_t w_t ∇D_t] (exactly) and g*, the prefix-fixed on-policy gradient, for one tabular problem."""
    theta1, theta2 = (x.requires_grad_() for x in _tables(seed, scale))
    teacher, behaviour = _tables(seed + 1, scale), _tables(seed + 2, scale)
    # μ: π's own logits perturbed, so that ratios stay moderate
    behaviour = (theta1.detach() + 0.7 * behaviour[0], theta2.detach() + 0.7 * behaviour[1])
    logits, t_logps, tokens, mu_logps = _enumerated(theta1, theta2, teacher, behaviour)
    s_logps = torch.log_softmax(logits, -1)
    token_logps = s_logps.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    mask = torch.ones(V * V, 2)
    student = StudentOutputs(token_logps=token_logps, mask=mask, logits=logits)
    terms = divergence.per_token(student, TeacherScores(token_logps=t_logps.gather(-1, tokens.unsqueeze(-1))
                                                        .squeeze(-1), mask=mask, logps=t_logps))
    pg = importance_weights(token_logps, mu_logps, mask, spec).weights
    w = divergence_weights(token_logps, mu_logps, mask, spec, per_state=True, policy_gradient=pg)
    w = torch.ones_like(mask) if w is None else w
    mu = mu_logps.sum(1).exp()
    estimate = torch.autograd.grad((mu.unsqueeze(1) * w * terms.loss).sum(), (theta1, theta2))
    # g*: the naive per-state divergence at each prefix, weighted by the prefix's probability under π (no gradient)
    p1 = torch.softmax(theta1, -1)
    objective = kl(theta1, teacher[0]) + (p1.detach() * kl(theta2, teacher[1])).sum()
    exact = torch.autograd.grad(objective, (theta1, theta2))
    flat = lambda gs: torch.cat([g.flatten() for g in gs])
    return flat(estimate), flat(exact)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


CASES = {"reverse_kl_full": (ReverseKL, {"estimator": "full"}, _reverse_kl), "forward_kl": (ForwardKL, {}, _forward_kl)}


@pytest.mark.parametrize("case", list(CASES))
def test_prefix_weights_make_a_full_vocabulary_divergence_unbiased_under_mismatch(case):
    cls, params, kl = CASES[case]
    divergence = build_component(cls, params)

    def bias(**spec):
        est, exact = _expected_gradient(divergence, kl, CorrectionSpec(**spec))
        return _rel(est, exact)

    assert bias(mode="token_tis", clip_max=1e8, divergence="prefix") < 1e-5  # W_<t: exactly unbiased
    assert bias(mode="sequence_tis", clip_max=1e8, divergence="prefix") < 1e-5  # the mode's level does not matter
    none = bias(mode="token_tis", clip_max=2.0)  # auto: a full-vocabulary divergence is not weighted
    token = bias(mode="token_tis", clip_max=2.0, divergence="policy_gradient")  # ρ_t: the old behaviour
    truncated = bias(mode="token_tis", clip_max=2.0, divergence="prefix")
    masked = bias(mode="icepop", clip_min=0.5, clip_max=5.0, divergence="prefix")
    print(f"\n{case}: relative bias none {none:.3f}, token TIS(2) {token:.3f}, prefix TIS(2) {truncated:.3f}, "
          f"prefix IcePop {masked:.3f}")
    assert none > 0.05 and token > 0.05  # the states are visited under μ: both miss the prefix's weight
    assert truncated < min(none, token) and masked < min(none, token)
    assert bias(mode="none", divergence="prefix") == pytest.approx(none)  # mode none weights nothing


def test_divergence_weights_by_hand():
    # log ρ = [0.5, -1, 0.2] on a row whose last token is padding; a second row on-policy.
    train = torch.tensor([[0.0, -1.0, 0.2], [-1.0, -2.0, -3.0]])
    behaviour = torch.tensor([[-0.5, 0.0, 0.0], [-1.0, -2.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    prefix = CorrectionSpec(mode="token_tis", clip_max=1e8, divergence="prefix")
    per_state = divergence_weights(train, behaviour, mask, prefix, per_state=True)
    sampled = divergence_weights(train, behaviour, mask, prefix, per_state=False)
    assert per_state.flatten().tolist() == pytest.approx([1.0, math.exp(0.5), 0.0, 1.0, 1.0, 1.0])
    assert sampled.flatten().tolist() == pytest.approx([math.exp(0.5), math.exp(-0.5), 0.0, 1.0, 1.0, 1.0])
    capped = CorrectionSpec(mode="token_tis", clip_max=1.5, clip_min=0.8, divergence="prefix")
    assert divergence_weights(train, behaviour, mask, capped, per_state=False)[0].tolist() == \
        pytest.approx([1.5, 0.8, 0.0])
    band = CorrectionSpec(mode="token_mis", clip_max=1.5, clip_min=0.8, divergence="prefix")
    assert divergence_weights(train, behaviour, mask, band, per_state=False)[0].tolist() == pytest.approx([0, 0, 0])
    pg = torch.full_like(mask, 0.3)
    assert divergence_weights(train, behaviour, mask, CorrectionSpec(mode="token_tis"), per_state=False,
                              policy_gradient=pg) is pg  # auto, sampled-token: the policy gradient's weights
    assert divergence_weights(train, behaviour, mask, CorrectionSpec(mode="token_tis"), per_state=True) is None
    assert divergence_weights(train, behaviour, mask, CorrectionSpec(mode="token_tis", divergence="none"),
                              per_state=False) is None
