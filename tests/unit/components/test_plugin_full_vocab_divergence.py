"""A plugin's full-vocabulary divergence that only defines its per-position value runs on the shared kernels:
chunked and fused (hidden-state) paths give the values and gradients of plain autograd on the whole tensors."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from opd_plugins.divergences._kernels import chunked_divergence, fused_divergence
from opd_plugins.divergences.base import LMHead, StudentOutputs
from opd_plugins.divergences.full_vocab import FullVocabDivergence, FullVocabFormula, FullVocabParams
from opd_plugins.teachers.base import TeacherScores
from opd_plugins.testing import DivergenceContract, random_pair


class HellingerFormula(FullVocabFormula):
    """Squared Hellinger distance 1 − Σ √(s·t): only the value is given, so the kernels use autograd."""

    name = "hellinger"

    def value(self, s_lp, t_lp):
        return 1 - torch.exp(0.5 * (s_lp + t_lp)).sum(-1)

    def sampled_reward(self, log_r, form="score"):
        # f(r) = 1 − √r, f'(r) = −1/(2√r), f'(1) = −1/2: score −(f − r·f' + f'(1)) = (√r − 1)/2
        return (torch.exp(0.5 * log_r) - 1) / 2


class Hellinger(FullVocabDivergence):
    """Squared Hellinger distance per token (a test plugin)."""

    name: ClassVar[str] = "test_hellinger"

    class Params(FullVocabParams):
        pass

    def formula(self):
        return HellingerFormula()


class TestHellingerContract(DivergenceContract):
    component = Hellinger
    require_registered = False


def naive(logits, t_logps):
    return HellingerFormula().value(torch.log_softmax(logits.float(), -1), t_logps)


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_autograd_fallback_equals_plain_autograd(chunk):
    s_logits, t_logps, _ = random_pair(B=3, T=5, V=17, seed=1)
    a = s_logits.clone().requires_grad_(True)
    b = s_logits.clone().requires_grad_(True)
    weights = torch.rand(3, 5, generator=torch.Generator().manual_seed(2))
    got = chunked_divergence(a, t_logps, HellingerFormula(), chunk)
    want = naive(b, t_logps)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_fused_autograd_fallback_equals_plain_autograd():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 4, 8, generator=g, requires_grad=True)
    weight = torch.randn(13, 8, generator=g, requires_grad=True)
    bias = torch.randn(13, generator=g, requires_grad=True)
    t_logps = torch.log_softmax(torch.randn(2, 4, 13, generator=g), -1)
    target = torch.randint(0, 13, (2, 4), generator=g)
    div, tok = fused_divergence(hidden, weight, t_logps, HellingerFormula(), temperature=0.7, chunk_size=3,
                                target_ids=target, bias=bias)
    grads = torch.autograd.grad((div * 2 + tok).sum(), (hidden, weight, bias))
    logits = (hidden @ weight.T + bias) / 0.7
    ref_div = naive(logits, t_logps)
    ref_tok = torch.log_softmax(logits, -1).gather(-1, target[..., None]).squeeze(-1)
    ref = torch.autograd.grad((ref_div * 2 + ref_tok).sum(), (hidden, weight, bias))
    torch.testing.assert_close(div, ref_div, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tok, ref_tok, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_component_serves_logits_and_hidden_states_alike():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 3, 8, generator=g)
    weight = torch.randn(11, 8, generator=g)
    t_logps = torch.log_softmax(torch.randn(2, 3, 11, generator=g), -1)
    tokens = torch.randint(0, 11, (2, 3), generator=g)
    mask = torch.ones(2, 3)
    teacher = TeacherScores(token_logps=t_logps.gather(-1, tokens[..., None]).squeeze(-1), mask=mask, logps=t_logps)
    logits = hidden @ weight.T
    s_lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    by_logits = Hellinger(Hellinger.Params(chunk_size=2)).per_token(
        StudentOutputs(token_logps=s_lp, mask=mask, logits=logits), teacher).value
    by_hidden = Hellinger(Hellinger.Params(chunk_size=2, fused_lm_head=True)).per_token(
        StudentOutputs(token_logps=s_lp, mask=mask, hidden=hidden, lm_head=LMHead(weight)), teacher).value
    torch.testing.assert_close(by_logits, by_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(by_logits, naive(logits, t_logps), rtol=1e-5, atol=1e-6)


def test_a_formula_without_a_reward_says_so():
    class ValueOnly(FullVocabFormula):
        name = "value_only"

        def value(self, s_lp, t_lp):
            return (s_lp.exp() - t_lp.exp()).pow(2).sum(-1)

    with pytest.raises(NotImplementedError, match="'value_only' has no sampled-token reward"):
        ValueOnly().sampled_reward(torch.zeros(2))
