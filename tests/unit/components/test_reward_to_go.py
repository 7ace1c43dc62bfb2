"""Reward-to-go for the dense-reward path, on a tabular toy where everything is enumerated exactly.

A tabular student π and teacher τ over V tokens with a three-token horizon (each position's distribution depends on
the whole prefix). The sequence-level objective is J = E_{y~π}[Σ_t D_t(y_<t)], D_t the divergence between π and τ
at the state y_<t, differentiated through the states' probabilities too. The policy gradient of a dense advantage
A_t is E_π[Σ_t A_t ∇log π(y_t | y_<t)], computed by summing over all V³ completions. With the reward-to-go advantage
it equals −∇J exactly; with OPD's per-position reward d_t it does not (it is −∇ with each prefix held fixed).
"""

import itertools

import pytest
import torch

from opd_plugins.advantages.base import AdvantageInputs, reward_to_go
from opd_plugins.advantages.teacher_dense import TeacherDenseAdvantage
from opd_plugins.divergences.base import StudentOutputs
from opd_plugins.divergences.forward_kl import ForwardKL
from opd_plugins.divergences.reverse_kl import ReverseKL
from opd_plugins.teachers.base import TeacherScores
from opd_plugins.testing import build_component

V, T = 3, 3


def _table(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*(V,) * (t + 1), generator=g) * 1.5 for t in range(T)]  # logits of y_t given y_<t


def _per_position(table, seqs):
    """(N, T, V) logits of every position of every sequence."""
    return torch.stack([torch.stack([table[t][tuple(y[:t])] for t in range(T)]) for y in seqs])


def _reverse(s, t):
    return (torch.softmax(s, -1) * (torch.log_softmax(s, -1) - torch.log_softmax(t, -1))).sum(-1)


def _forward(s, t):
    return (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1)


def _gradients(divergence, naive, dense):
    student = [x.requires_grad_() for x in _table(0)]
    teacher = _table(1)
    seqs = list(itertools.product(range(V), repeat=T))
    tokens = torch.tensor(seqs)
    logits, t_logits = _per_position(student, seqs), _per_position(teacher, seqs)
    s_logps = torch.log_softmax(logits, -1)
    token_logps = s_logps.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    t_logps = torch.log_softmax(t_logits, -1)
    mask = torch.ones(len(seqs), T)
    scores = TeacherScores(token_logps=t_logps.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), mask=mask, logps=t_logps)
    detached = StudentOutputs(token_logps=token_logps.detach(), mask=mask, logits=logits.detach())
    d = divergence.reward(detached, scores)
    value = divergence.per_token(detached, scores).value
    advantage = dense(d, mask, value)
    prob = token_logps.sum(1).exp().detach()  # π(y): the samples' weight, no gradient
    pg = torch.autograd.grad((prob.unsqueeze(1) * advantage.detach() * token_logps).sum(), student, retain_graph=True)
    # −∇J: J = Σ_t Σ_{y_<t} π(y_<t) D_t(y_<t), with gradient through π(y_<t) as well (each prefix y_<t is in
    # V^(T−t) of the enumerated sequences)
    J = sum((token_logps[:, :t].sum(1).exp() * naive(logits[:, t], t_logits[:, t])).sum() / V ** (T - t)
            for t in range(T))
    exact = [-g for g in torch.autograd.grad(J, student)]
    flat = lambda gs: torch.cat([g.flatten() for g in gs])
    return flat(pg), flat(exact)


CASES = {"reverse_kl_sampled": (ReverseKL, {}, _reverse), "forward_kl": (ForwardKL, {}, _forward),
         "reverse_kl_full": (ReverseKL, {"estimator": "full"}, _reverse)}


@pytest.mark.parametrize("case", list(CASES))
def test_reward_to_go_is_the_sequence_level_gradient_and_the_per_position_reward_is_not(case):
    cls, params, naive = CASES[case]
    divergence = build_component(cls, params)
    pg, exact = _gradients(divergence, naive, reward_to_go)
    assert torch.allclose(pg, exact, atol=1e-5), float((pg - exact).abs().max())
    per_position, _ = _gradients(divergence, naive, lambda d, mask, value: d)
    assert float((per_position - exact).norm() / exact.norm()) > 0.05  # 0.10 (forward KL) to 0.3 here


def test_reward_to_go_by_hand_and_in_teacher_dense():
    d = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert reward_to_go(d, mask).tolist() == [[6.0, 5.0, 3.0], [-0.5, -1.0, 0.0]]  # Σ_{t'≥t} d_t'
    value = torch.tensor([[0.1, 0.2, 0.4], [1.0, 2.0, 9.0]])  # the last 9.0 is padding
    assert torch.allclose(reward_to_go(d, mask, value), torch.tensor([[0.4, 1.6, 3.0], [-1.5, -1.0, 0.0]]))
    dense = TeacherDenseAdvantage(TeacherDenseAdvantage.Params(sparse=None, reward_to_go=True, dense_coef=2.0))
    assert dense.needs_token_value() and not build_component(TeacherDenseAdvantage, {}).needs_token_value()
    inputs = AdvantageInputs(rewards=torch.full((2,), float("nan")), num_generations=1, mask=mask, token_reward=d,
                             token_value=value)
    assert torch.allclose(dense.compute(inputs), 2 * reward_to_go(d, mask, value))
    with pytest.raises(ValueError, match="needs inputs.token_value"):
        dense.compute(AdvantageInputs(rewards=inputs.rewards, num_generations=1, mask=mask, token_reward=d))
