"""Divergence numerics: naive references, TRL's generalized JSD, chunked == unchunked, estimator (un)biasedness by
enumeration and Monte Carlo, gradients where claimed, rewards, and bad input."""

import math

import pytest
import torch
from pydantic import ValidationError

from opd_plugins.divergences import GOPD, JSD, K1, K2, K3, TV, ForwardKL, ReverseKL, SkewKL, TopKKL
from opd_plugins.divergences._kernels import chunked_divergence
from opd_plugins.divergences.chunked import KINDS, full_vocab_divergence, sampled_reward
from opd_plugins.teachers.base import TeacherScores
from opd_plugins.testing.contracts import make_inputs, random_pair

FULL = [
    (ForwardKL, {}), (JSD, {"beta": 0.0}), (JSD, {"beta": 0.3}), (JSD, {"beta": 0.9}), (JSD, {"beta": 1.0}),
    (TV, {}), (SkewKL, {"alpha": 0.1, "direction": "forward"}), (SkewKL, {"alpha": 0.2, "direction": "reverse"}),
    (SkewKL, {"alpha": 0.0, "direction": "reverse"}),
]
KIND_COEF = [("reverse_kl", 0.0), ("forward_kl", 0.0), ("jsd", 0.3), ("jsd", 0.7), ("tv", 0.0),
             ("skew_forward_kl", 0.1), ("skew_reverse_kl", 0.1), ("skew_forward_kl", 0.0)]


def _ids(cases):
    return [f"{c.name}-{'-'.join(f'{k}={v}' for k, v in p.items())}" for c, p in cases]


# ---------------------------------------------------------------------------------------------------------------
# Naive references (explicit loops, float64)
# ---------------------------------------------------------------------------------------------------------------


def naive(kind: str, coef: float, s_logits: torch.Tensor, t_logps: torch.Tensor) -> torch.Tensor:
    B, T, V = s_logits.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            s = torch.softmax(s_logits[b, t].double(), -1).tolist()
            q = t_logps[b, t].double().exp().tolist()
            total = 0.0
            for v in range(V):
                if kind == "reverse_kl":
                    total += s[v] * math.log(s[v] / q[v])
                elif kind == "forward_kl":
                    total += q[v] * math.log(q[v] / s[v])
                elif kind == "jsd":
                    m = (1 - coef) * s[v] + coef * q[v]
                    total += coef * q[v] * math.log(q[v] / m) + (1 - coef) * s[v] * math.log(s[v] / m)
                elif kind == "tv":
                    total += 0.5 * abs(s[v] - q[v])
                elif kind == "skew_forward_kl":
                    total += q[v] * math.log(q[v] / (coef * q[v] + (1 - coef) * s[v]))
                elif kind == "skew_reverse_kl":
                    total += s[v] * math.log(s[v] / (coef * s[v] + (1 - coef) * q[v]))
            out[b, t] = total
    return out.float()


def exact_kl(p_logits: torch.Tensor, q_logps: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p_logits) ‖ exp(q_logps)) per position, differentiable."""
    lp = torch.log_softmax(p_logits, -1)
    return (lp.exp() * (lp - q_logps)).sum(-1)


def enumerate_tokens(s_logits, t_logps, fn):
    """Σ_x p_s(x)·fn(student, teacher, x) over the vocabulary, for fn returning a (B, T) tensor."""
    V = s_logits.shape[-1]
    probs = torch.softmax(s_logits, -1).detach()
    total = 0.0
    for x in range(V):
        tokens = torch.full(s_logits.shape[:2], x, dtype=torch.long)
        logits, student, teacher = make_inputs(s_logits, t_logps, tokens)
        total = total + probs[..., x] * fn(logits, student, teacher)
    return total


def expected_grad(s_logits, t_logps, loss_fn):
    """Σ_x p_s(x)·∇_logits loss(x): the expected gradient of a sampled-token loss."""
    V = s_logits.shape[-1]
    probs = torch.softmax(s_logits, -1).detach()
    grad = torch.zeros_like(s_logits)
    for x in range(V):
        tokens = torch.full(s_logits.shape[:2], x, dtype=torch.long)
        logits, student, teacher = make_inputs(s_logits, t_logps, tokens)
        (loss_fn(student, teacher) * probs[..., x]).sum().backward()
        grad += logits.grad
    return grad


def autograd_of(s_logits, fn):
    z = s_logits.clone().requires_grad_(True)
    fn(z).sum().backward()
    return z.grad


# ---------------------------------------------------------------------------------------------------------------
# Full-vocabulary divergences
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,coef", KIND_COEF)
def test_kernels_match_naive_loops(kind, coef):
    s_logits, t_logps, _ = random_pair(B=2, T=3, V=7, seed=21)
    for chunk in (0, 2):
        got = full_vocab_divergence(s_logits, t_logps, kind, coef, chunk_size=chunk)
        assert torch.allclose(got, naive(kind, coef, s_logits, t_logps), atol=1e-5), (kind, chunk)


@pytest.mark.parametrize("kind,coef", KIND_COEF)
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_equals_unchunked_values_and_gradients(kind, coef, chunk):
    s_logits, t_logps, _ = random_pair(B=3, T=7, V=50, seed=22, sharp=3.0)
    weights = torch.rand(3, 7, generator=torch.Generator().manual_seed(0))
    z0, z1 = s_logits.clone().requires_grad_(True), s_logits.clone().requires_grad_(True)
    ref = full_vocab_divergence(z0, t_logps, kind, coef, chunk_size=0)
    got = full_vocab_divergence(z1, t_logps, kind, coef, chunk_size=chunk)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    (ref * weights).sum().backward()
    (got * weights).sum().backward()
    assert torch.allclose(z1.grad, z0.grad, atol=1e-6, rtol=1e-5)


def test_chunked_accepts_bf16_logits_and_returns_a_bf16_gradient():
    s_logits, t_logps, _ = random_pair(B=2, T=5, V=40, seed=48)
    z = s_logits.bfloat16().requires_grad_(True)
    value = full_vocab_divergence(z, t_logps.bfloat16(), "jsd", 0.5, chunk_size=3)
    value.sum().backward()
    ref_z = s_logits.bfloat16().float().requires_grad_(True)
    ref = full_vocab_divergence(ref_z, t_logps.bfloat16().float(), "jsd", 0.5, chunk_size=0)
    ref.sum().backward()
    assert value.dtype == torch.float32 and z.grad.dtype == torch.bfloat16
    assert torch.allclose(value, ref, atol=1e-5)
    assert torch.allclose(z.grad.float(), ref_z.grad, atol=1e-2)


def test_chunked_saves_only_its_inputs():
    """The memory claim, checked structurally: autograd keeps exactly the two (N, V) inputs for the chunked
    function, while plain autograd keeps several (B, T, V) intermediates."""
    s_logits, t_logps, _ = random_pair(B=2, T=8, V=64, seed=23)

    def saved_bytes(chunk):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        z = s_logits.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            full_vocab_divergence(z, t_logps, "jsd", 0.5, chunk_size=chunk)
        return sum(sizes)

    one = s_logits.numel() * 4
    assert saved_bytes(4) == 2 * one
    assert saved_bytes(0) >= 5 * one


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_equals_trl_generalized_jsd_loss(beta):
    from trl.experimental.gkd import GKDTrainer

    g = torch.Generator().manual_seed(24)
    s_logits, t_logits = torch.randn(2, 5, 33, generator=g) * 2, torch.randn(2, 5, 33, generator=g) * 2
    ref_z = s_logits.clone().requires_grad_(True)
    ref = GKDTrainer.generalized_jsd_loss(ref_z, t_logits, beta=beta, reduction="none").sum(-1)
    tokens = torch.zeros(2, 5, dtype=torch.long)
    logits, student, teacher = make_inputs(s_logits, torch.log_softmax(t_logits, -1), tokens)
    terms = JSD(JSD.Params(beta=beta, chunk_size=3)).per_token(student, teacher)
    assert torch.allclose(terms.value, ref.detach(), atol=1e-5)
    terms.loss.sum().backward()
    ref.sum().backward()
    assert torch.allclose(logits.grad, ref_z.grad, atol=1e-5)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    s_logits, t_logps, tokens = random_pair(seed=25)
    _, student, teacher = make_inputs(s_logits, t_logps, tokens, requires_grad=False)
    fwd = ForwardKL().per_token(student, teacher).value
    assert torch.allclose(JSD(JSD.Params(beta=0.0)).per_token(student, teacher).value, fwd, atol=1e-6)
    rev = ReverseKL(ReverseKL.Params(estimator="full")).per_token(student, teacher).value
    assert torch.allclose(JSD(JSD.Params(beta=1.0)).per_token(student, teacher).value, rev, atol=1e-6)
    # alpha = 0 skew KL is the plain KL in both directions
    skew_f = SkewKL(SkewKL.Params(alpha=0.0, direction="forward")).per_token(student, teacher).value
    skew_r = SkewKL(SkewKL.Params(alpha=0.0, direction="reverse")).per_token(student, teacher).value
    assert torch.allclose(skew_f, fwd, atol=1e-6) and torch.allclose(skew_r, rev, atol=1e-6)


def test_forward_kl_gradient_is_student_minus_teacher_probs():
    s_logits, t_logps, tokens = random_pair(seed=26)
    logits, student, teacher = make_inputs(s_logits, t_logps, tokens)
    ForwardKL().per_token(student, teacher).loss.sum().backward()
    assert torch.allclose(logits.grad, torch.softmax(s_logits, -1) - t_logps.exp(), atol=1e-6)


def test_tv_is_bounded_and_symmetric():
    s_logits, t_logps, tokens = random_pair(seed=27, sharp=6.0)
    _, student, teacher = make_inputs(s_logits, t_logps, tokens, requires_grad=False)
    tv = TV().per_token(student, teacher).value
    assert (tv >= 0).all() and (tv <= 1 + 1e-6).all()
    swapped = full_vocab_divergence(t_logps, torch.log_softmax(s_logits, -1), "tv")
    assert torch.allclose(tv, swapped, atol=1e-6)


@pytest.mark.parametrize("cls,params", FULL, ids=_ids(FULL))
def test_full_vocab_components_mask_and_require_full(cls, params):
    div = cls(cls.Params(**params, chunk_size=4))
    assert div.requires() == "full"
    s_logits, t_logps, tokens = random_pair(seed=28)
    mask = torch.ones(tokens.shape)
    mask[0, 2:] = 0
    logits, student, teacher = make_inputs(s_logits, t_logps, tokens, mask=mask)
    terms = div.per_token(student, teacher)
    assert (terms.value[0, 2:] == 0).all() and (terms.value[mask.bool()] > 0).all()
    terms.loss.sum().backward()
    assert (logits.grad[0, 2:] == 0).all()
    student.logits = None
    with pytest.raises(ValueError, match="needs student logits"):
        div.per_token(student, teacher)


@pytest.mark.parametrize("cls,params", FULL, ids=_ids(FULL))
def test_score_reward_policy_gradient_is_minus_divergence_gradient(cls, params):
    """Σ_x p_s(x)·reward(x)·∇log p_s(x) = −∇D: REINFORCE with the per-token reward follows the divergence."""
    div = cls(cls.Params(**params))
    s_logits, t_logps, _ = random_pair(B=2, T=2, V=6, seed=29)
    grad = expected_grad(s_logits, t_logps, lambda st, te: -div.reward(st, te) * st.token_logps)
    ref = autograd_of(s_logits, lambda z: chunked_divergence(z, t_logps, div.formula(), chunk_size=0))
    assert torch.allclose(grad, ref, atol=1e-5)


@pytest.mark.parametrize("cls,params", FULL, ids=_ids(FULL))
def test_estimate_reward_is_unbiased_and_non_negative(cls, params):
    div = cls(cls.Params(**params, reward="estimate"))
    s_logits, t_logps, _ = random_pair(B=2, T=2, V=6, seed=30)
    est = enumerate_tokens(s_logits, t_logps, lambda z, st, te: -div.reward(st, te))
    _, student, teacher = make_inputs(s_logits, t_logps, torch.zeros(2, 2, dtype=torch.long), requires_grad=False)
    assert torch.allclose(est, div.per_token(student, teacher).value, atol=1e-5)
    for x in range(6):
        _, st, te = make_inputs(s_logits, t_logps, torch.full((2, 2), x, dtype=torch.long), requires_grad=False)
        assert (div.reward(st, te) <= 1e-6).all()


@pytest.mark.parametrize("cls,params", [(JSD, {"beta": 1.0}), (SkewKL, {"alpha": 0.0, "direction": "reverse"}),
                                        (ForwardKL, {})], ids=["jsd_beta1", "skew_alpha0_reverse", "forward_kl"])
def test_estimate_reward_policy_gradient_is_biased_even_where_the_divergence_is_reverse_kl(cls, params):
    """``reward: estimate`` is unbiased for the value but not for the gradient, also for jsd β=1 and skew α=0
    reverse, which equal reverse KL (their estimate reward is −k3); ``score`` follows −∇D exactly (as the docs say)."""
    s_logits, t_logps, _ = random_pair(B=2, T=2, V=6, seed=32)
    ref = autograd_of(s_logits, lambda z: chunked_divergence(z, t_logps, cls(cls.Params(**params)).formula(),
                                                             chunk_size=0))
    grads = {}
    for form in ("score", "estimate"):
        div = cls(cls.Params(**params, reward=form))
        grads[form] = expected_grad(s_logits, t_logps, lambda st, te, div=div: -div.reward(st, te) * st.token_logps)
    assert torch.allclose(grads["score"], ref, atol=1e-5)
    assert (grads["estimate"] - ref).norm() > 0.1 * ref.norm()


@pytest.mark.parametrize("kind,coef", KIND_COEF)
def test_rewards_are_zero_where_teacher_equals_student(kind, coef):
    zero = torch.zeros(4)
    for form in ("score", "estimate"):
        assert torch.equal(sampled_reward(kind, coef, zero, form).abs(), zero), (kind, form)


def test_reward_ignores_padding_with_extreme_log_ratios():
    s_logits, t_logps, tokens = random_pair(seed=31)
    mask = torch.ones(tokens.shape)
    mask[:, -1] = 0
    _, student, teacher = make_inputs(s_logits, t_logps, tokens, mask=mask, requires_grad=False)
    student.token_logps = student.token_logps.clone()
    student.token_logps[:, -1] = -1e4  # what a padding position may hold
    for cls, params in FULL:
        r = cls(cls.Params(**params)).reward(student, teacher)
        assert torch.isfinite(r).all() and (r[:, -1] == 0).all()


def test_reverse_jsd_reward_equals_reverse_kl_reward():
    s_logits, t_logps, tokens = random_pair(seed=32)
    _, student, teacher = make_inputs(s_logits, t_logps, tokens, requires_grad=False)
    assert torch.allclose(JSD(JSD.Params(beta=1.0)).reward(student, teacher), ReverseKL().reward(student, teacher))


# ---------------------------------------------------------------------------------------------------------------
# Sampled-token estimators k1, k2, k3
# ---------------------------------------------------------------------------------------------------------------


def test_k_estimators_by_enumeration():
    """E_s[k1] = E_s[k3] = KL(s‖t) exactly; E_s[k2] ≠ KL (biased), k2 and k3 ≥ 0 at every sample."""
    s_logits, t_logps, _ = random_pair(B=2, T=3, V=7, seed=33)
    kl = exact_kl(s_logits, t_logps)
    value = lambda div: (lambda z, st, te: div.per_token(st, te).value)  # noqa: E731
    assert torch.allclose(enumerate_tokens(s_logits, t_logps, value(K1())), kl, atol=1e-5)
    assert torch.allclose(enumerate_tokens(s_logits, t_logps, value(K3())), kl, atol=1e-5)
    k2 = enumerate_tokens(s_logits, t_logps, value(K2()))
    assert (k2 - kl).abs().max() > 1e-2
    for x in range(7):
        _, st, te = make_inputs(s_logits, t_logps, torch.full((2, 3), x, dtype=torch.long), requires_grad=False)
        assert (K2().per_token(st, te).value >= 0).all() and (K3().per_token(st, te).value >= -1e-6).all()


def test_k1_k3_monte_carlo_means_match_exact_kl():
    g = torch.Generator().manual_seed(34)
    V, N = 20, 200_000
    s_logits = torch.randn(V, generator=g) * 1.5
    t_logps = torch.log_softmax(torch.randn(V, generator=g) * 1.5, -1)
    s_lp = torch.log_softmax(s_logits, -1)
    kl = float((s_lp.exp() * (s_lp - t_logps)).sum())
    x = torch.multinomial(s_lp.exp(), N, replacement=True, generator=g)
    student_tokens = s_lp[x].view(1, N)
    teacher = TeacherScores(token_logps=t_logps[x].view(1, N), mask=torch.ones(1, N))
    from opd_plugins.divergences import StudentOutputs

    student = StudentOutputs(token_logps=student_tokens, mask=torch.ones(1, N))
    for div in (K1(), K3()):
        v = div.per_token(student, teacher).value
        stderr = float(v.std()) / math.sqrt(N)
        assert abs(float(v.mean()) - kl) < 4 * stderr, (div.name, float(v.mean()), kl, stderr)
    # with π_t close to π_s, k3 has much lower variance than k1
    near = s_lp + 0.1 * torch.randn(V, generator=g)
    near = near - near.logsumexp(-1)
    teacher = TeacherScores(token_logps=near[x].view(1, N), mask=torch.ones(1, N))
    assert K3().per_token(student, teacher).value.var() < 0.1 * K1().per_token(student, teacher).value.var()


@pytest.mark.parametrize("div", [K1(), K2(), K3(K3.Params(surrogate="score_function"))], ids=["k1", "k2", "k3_score"])
def test_k_loss_gradients_are_exact_reverse_kl_gradient_in_expectation(div):
    s_logits, t_logps, _ = random_pair(B=2, T=2, V=6, seed=35)
    grad = expected_grad(s_logits, t_logps, lambda st, te: div.per_token(st, te).loss)
    assert torch.allclose(grad, autograd_of(s_logits, lambda z: exact_kl(z, t_logps)), atol=1e-5)


def test_k3_pathwise_gradient_is_the_forward_kl_gradient_so_biased_for_reverse_kl():
    s_logits, t_logps, _ = random_pair(B=2, T=2, V=6, seed=36)
    grad = expected_grad(s_logits, t_logps, lambda st, te: K3().per_token(st, te).loss)
    forward = autograd_of(s_logits, lambda z: full_vocab_divergence(z, t_logps, "forward_kl", chunk_size=0))
    reverse = autograd_of(s_logits, lambda z: exact_kl(z, t_logps))
    assert torch.allclose(grad, forward, atol=1e-5)
    assert (grad - reverse).abs().max() > 1e-2


def test_k2_per_sample_gradient_equals_k1_surrogate():
    s_logits, t_logps, tokens = random_pair(seed=37)
    grads = []
    for div in (K1(), K2()):
        logits, student, teacher = make_inputs(s_logits, t_logps, tokens)
        div.per_token(student, teacher).loss.sum().backward()
        grads.append(logits.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_k_rewards_are_minus_values():
    s_logits, t_logps, tokens = random_pair(seed=38)
    _, student, teacher = make_inputs(s_logits, t_logps, tokens, requires_grad=False)
    for div in (K1(), K2(), K3()):
        assert torch.allclose(div.reward(student, teacher), -div.per_token(student, teacher).value)
        assert div.requires() == "sampled"
    assert torch.equal(K1().reward(student, teacher), ReverseKL().reward(student, teacher))


# ---------------------------------------------------------------------------------------------------------------
# Top-k
# ---------------------------------------------------------------------------------------------------------------


def naive_topk(s_logits, t_logps, ids, mode, direction):
    B, T, K = ids.shape
    out = torch.zeros(B, T)
    for b in range(B):
        for t in range(T):
            s_full = torch.softmax(s_logits[b, t].double(), -1)
            s = [float(s_full[i]) for i in ids[b, t]]
            q = [math.exp(float(t_logps[b, t, i])) for i in ids[b, t]]
            if mode == "renormalized":
                s = [v / sum(s) for v in s]
                q = [v / sum(q) for v in q]
            else:
                s.append(max(1 - sum(s), 1e-30))
                q.append(max(1 - sum(q), 1e-30))
            p, r = (q, s) if direction == "forward" else (s, q)
            out[b, t] = sum(pi * math.log(pi / ri) for pi, ri in zip(p, r))
    return out


@pytest.mark.parametrize("mode", ["renormalized", "tail"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_topk_matches_naive(mode, direction):
    s_logits, t_logps, tokens = random_pair(B=2, T=3, V=9, seed=39)
    _, student, teacher = make_inputs(s_logits, t_logps, tokens, requires_grad=False)
    div = TopKKL(TopKKL.Params(mode=mode, direction=direction))
    assert div.requires() == "topk"
    got = div.per_token(student, teacher).value
    assert torch.allclose(got, naive_topk(s_logits, t_logps, teacher.topk_ids, mode, direction), atol=1e-5)


@pytest.mark.parametrize("mode", ["renormalized", "tail"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_topk_with_k_equal_v_is_the_full_kl(mode, direction):
    s_logits, t_logps, tokens = random_pair(B=2, T=3, V=9, seed=40)
    logits, student, teacher = make_inputs(s_logits, t_logps, tokens)
    teacher.topk_logps, teacher.topk_ids = t_logps.topk(9, -1)
    full_kind = "forward_kl" if direction == "forward" else "reverse_kl"
    ref_z = s_logits.clone().requires_grad_(True)
    ref = full_vocab_divergence(ref_z, t_logps, full_kind, chunk_size=0)
    terms = TopKKL(TopKKL.Params(mode=mode, direction=direction)).per_token(student, teacher)
    assert torch.allclose(terms.value, ref.detach(), atol=1e-5)
    terms.loss.sum().backward()
    ref.sum().backward()
    assert torch.allclose(logits.grad, ref_z.grad, atol=1e-5)


def test_topk_tail_is_a_lower_bound_of_the_full_kl():
    s_logits, t_logps, tokens = random_pair(B=3, T=4, V=30, seed=41)
    _, student, teacher = make_inputs(s_logits, t_logps, tokens, requires_grad=False)
    tail = TopKKL(TopKKL.Params(mode="tail", direction="forward")).per_token(student, teacher).value
    full = full_vocab_divergence(s_logits, t_logps, "forward_kl")
    assert (tail <= full + 1e-6).all() and (tail < full - 1e-4).any()


def test_topk_needs_student_logits_and_topk():
    s_logits, t_logps, tokens = random_pair(seed=42)
    _, student, teacher = make_inputs(s_logits, t_logps, tokens, requires_grad=False)
    student.logits = None
    with pytest.raises(ValueError, match="needs the student's logits"):
        TopKKL().per_token(student, teacher)
    _, student, teacher = make_inputs(s_logits, t_logps, tokens, requires_grad=False)
    teacher.topk_ids = teacher.topk_logps = None
    with pytest.raises(ValueError, match="top-k ids"):
        TopKKL().per_token(student, teacher)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_topk_reward_policy_gradient_is_minus_full_kl_gradient(direction):
    div = TopKKL(TopKKL.Params(direction=direction))
    s_logits, t_logps, _ = random_pair(B=2, T=2, V=6, seed=43)
    grad = expected_grad(s_logits, t_logps, lambda st, te: -div.reward(st, te) * st.token_logps)
    kind = "forward_kl" if direction == "forward" else "reverse_kl"
    assert torch.allclose(grad, autograd_of(s_logits, lambda z: full_vocab_divergence(z, t_logps, kind, 0.0, 0)),
                          atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# G-OPD
# ---------------------------------------------------------------------------------------------------------------


def _with_ref(teacher, ref):
    teacher.ref_token_logps = ref
    return teacher


def test_g_opd_lambda_one_is_exactly_reverse_kl():
    s_logits, t_logps, tokens = random_pair(seed=44)
    mask = torch.ones(tokens.shape)
    mask[1, 3:] = 0
    _, student, teacher = make_inputs(s_logits, t_logps, tokens, mask=mask, requires_grad=False)
    g_opd = GOPD()
    assert g_opd.requires() == "sampled"
    expected = ReverseKL().reward(student, teacher)
    assert torch.equal(g_opd.reward(student, teacher), expected)
    ref = torch.log_softmax(torch.randn(s_logits.shape, generator=torch.Generator().manual_seed(1)), -1)
    _with_ref(teacher, ref.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
    assert torch.equal(g_opd.reward(student, teacher), expected)
    assert torch.equal(g_opd.per_token(student, teacher).value, ReverseKL().per_token(student, teacher).value)


def test_g_opd_reward_formula_with_and_without_reference():
    s_logits, t_logps, tokens = random_pair(seed=45)
    _, student, teacher = make_inputs(s_logits, t_logps, tokens, requires_grad=False)
    lam = 1.25
    div = GOPD(GOPD.Params(reward_scale=lam, uniform_reference=True))  # the reference arrives in the scores below
    s, t = student.token_logps, teacher.token_logps
    assert torch.allclose(div.reward(student, teacher), lam * t - s, atol=1e-6)
    ref = -torch.rand(tokens.shape, generator=torch.Generator().manual_seed(2)) * 3
    _with_ref(teacher, ref)
    assert torch.allclose(div.reward(student, teacher), lam * (t - ref) - (s - ref), atol=1e-6)


def test_g_opd_loss_gradient_is_minus_objective_gradient_in_expectation():
    """J = λ·E_s[log π_T − log π_ref] − KL(π_s ‖ π_ref) per position; E[∇loss] = −∇J."""
    s_logits, t_logps, _ = random_pair(B=2, T=2, V=6, seed=46)
    ref_logps = torch.log_softmax(torch.randn(2, 2, 6, generator=torch.Generator().manual_seed(3)), -1)
    lam = 1.5
    div = GOPD(GOPD.Params(reward_scale=lam, uniform_reference=True))  # ref_token_logps set on the scores below
    V = 6
    probs = torch.softmax(s_logits, -1)
    grad = torch.zeros_like(s_logits)
    for x in range(V):
        tokens = torch.full((2, 2), x, dtype=torch.long)
        logits, student, teacher = make_inputs(s_logits, t_logps, tokens)
        _with_ref(teacher, ref_logps.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
        (div.per_token(student, teacher).loss * probs[..., x]).sum().backward()
        grad += logits.grad

    def neg_j(z):
        lp = torch.log_softmax(z, -1)
        p = lp.exp()
        return -(lam * (p * (t_logps - ref_logps)).sum(-1) - (p * (lp - ref_logps)).sum(-1))

    assert torch.allclose(grad, autograd_of(s_logits, neg_j), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Bad input and requirements
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [-0.1, 1.5])
def test_jsd_beta_outside_unit_interval_is_a_validation_error(beta):
    with pytest.raises(ValidationError) as err:
        JSD.Params(beta=beta)
    msg = str(err.value)
    assert "beta" in msg and ("greater than or equal to 0" in msg or "less than or equal to 1" in msg)


@pytest.mark.parametrize("cls,bad,words", [
    (SkewKL, {"alpha": 1.0}, "less than 1"),
    (SkewKL, {"direction": "sideways"}, "'forward' or 'reverse'"),
    (ForwardKL, {"chunk_size": -1}, "greater than or equal to 0"),
    (TV, {"reward": "value"}, "'score' or 'estimate'"),
    (TopKKL, {"mode": "truncate"}, "'renormalized' or 'tail'"),
    (K3, {"surrogate": "reinforce"}, "'pathwise' or 'score_function'"),
    (GOPD, {"reward_scale": -1.0}, "greater than or equal to 0"),
])
def test_bad_params_are_validation_errors(cls, bad, words):
    with pytest.raises(ValidationError, match=words):
        cls.Params(**bad)


def test_requires():
    assert {c.name: c(c.Params(**p)).requires() for c, p in FULL} == {
        "forward_kl": "full", "jsd": "full", "tv": "full", "skew_kl": "full"}
    assert [d.requires() for d in (K1(), K2(), K3(), GOPD())] == ["sampled"] * 4
    assert TopKKL().requires() == "topk"


def test_kernel_bad_input():
    s_logits, t_logps, _ = random_pair(seed=47)
    with pytest.raises(ValueError, match="unknown divergence kind 'kl'"):
        full_vocab_divergence(s_logits, t_logps, "kl")
    with pytest.raises(ValueError, match="same shape"):
        full_vocab_divergence(s_logits, t_logps[..., :-1], "forward_kl")
    with pytest.raises(ValueError, match="must not require grad"):
        full_vocab_divergence(s_logits, t_logps.clone().requires_grad_(True), "forward_kl")
    assert set(KINDS) == {"reverse_kl", "forward_kl", "jsd", "tv", "skew_forward_kl", "skew_reverse_kl"}


# ---------------------------------------------------------------------------------------------------------------
# reverse_kl (full) through the chunked kernel; the fused lm-head path
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [0, 1, 4, 256])
def test_reverse_kl_full_equals_the_naive_formula_in_values_and_gradients(chunk):
    s_logits, t_logps, tokens = random_pair(B=3, T=6, V=40, seed=60, sharp=3.0)
    mask = torch.ones(tokens.shape)
    mask[2, 3:] = 0
    weights = torch.rand(3, 6, generator=torch.Generator().manual_seed(1))
    ref_z = s_logits.clone().requires_grad_(True)
    s_lp = torch.log_softmax(ref_z.float(), dim=-1)  # the formula reverse_kl used before the chunked kernel
    ref = (s_lp.exp() * (s_lp - t_logps)).sum(-1) * mask
    (ref * weights).sum().backward()
    logits, student, teacher = make_inputs(s_logits, t_logps, tokens, mask=mask)
    terms = ReverseKL(ReverseKL.Params(estimator="full", chunk_size=chunk)).per_token(student, teacher)
    (terms.loss * weights).sum().backward()
    assert torch.allclose(terms.value, ref.detach(), atol=1e-6, rtol=1e-6)
    assert torch.allclose(logits.grad, ref_z.grad, atol=1e-7, rtol=1e-5)


def _head_inputs(seed, B=3, T=5, H=12, V=37, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.6
    b = torch.randn(V, generator=g) if bias else None
    t_logps = torch.log_softmax(torch.randn(B, T, V, generator=g) * 2, -1)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 3:] = 0  # masked rows: zero value and zero gradient there
    mask[-1, 0] = 0
    w_div, w_tok = torch.rand(B, T, generator=g), torch.randn(B, T, generator=g)
    return hidden, weight, b, t_logps, targets, mask, w_div, w_tok


def _naive_from_hidden(hidden, weight, bias, t_logps, targets, kind, coef, temperature):
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
    value = full_vocab_divergence(logits, t_logps, kind, coef, chunk_size=0)
    tok = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return value, tok


def _leaves(*tensors):
    return [None if t is None else t.clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("kind,coef", KIND_COEF)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_equals_naive_values_and_gradients(kind, coef, temperature, bias):
    from opd_plugins.divergences.chunked import fused_full_vocab_divergence

    hidden, weight, b, t_logps, targets, mask, w_div, w_tok = _head_inputs(61, bias=bias)
    ref_in, got_in = _leaves(hidden, weight, b), _leaves(hidden, weight, b)
    ref, ref_tok = _naive_from_hidden(*ref_in, t_logps, targets, kind, coef, temperature)
    ((ref * mask * w_div).sum() + (ref_tok * w_tok).sum()).backward()
    got, got_tok = fused_full_vocab_divergence(got_in[0], got_in[1], t_logps, kind, coef, temperature, chunk_size=4,
                                               target_ids=targets, bias=got_in[2])
    ((got * mask * w_div).sum() + (got_tok * w_tok).sum()).backward()
    assert got.dtype == got_tok.dtype == torch.float32 and got.shape == got_tok.shape == (3, 5)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5) and torch.allclose(got_tok, ref_tok, atol=1e-5, rtol=1e-5)
    for name, r, g in zip(("hidden", "weight", "bias"), ref_in, got_in):
        if r is not None:
            assert torch.allclose(g.grad, r.grad, atol=1e-5, rtol=1e-5), name


@pytest.mark.parametrize("kind,coef", [("jsd", 0.5), ("reverse_kl", 0.0)])
def test_fused_gradients_through_each_output_alone(kind, coef):
    from opd_plugins.divergences.chunked import fused_full_vocab_divergence, fused_token_logps

    hidden, weight, b, t_logps, targets, mask, w_div, w_tok = _head_inputs(62)
    # divergence only (no target ids: a single output), masked rows get no gradient
    ref_in, got_in = _leaves(hidden, weight, b), _leaves(hidden, weight, b)
    ref, _ = _naive_from_hidden(*ref_in, t_logps, targets, kind, coef, 0.8)
    (ref * mask * w_div).sum().backward()
    got = fused_full_vocab_divergence(got_in[0], got_in[1], t_logps, kind, coef, 0.8, chunk_size=2, bias=got_in[2])
    (got * mask * w_div).sum().backward()
    assert torch.allclose(got, ref, atol=1e-5)
    for r, g in zip(ref_in, got_in):
        assert torch.allclose(g.grad, r.grad, atol=1e-5, rtol=1e-5)
    assert (got_in[0].grad[0, 3:] == 0).all() and (got_in[0].grad[-1, 0] == 0).all()
    # token log-probs only: as a returned-but-unused divergence, and through fused_token_logps
    for use_divergence_fn in (True, False):
        ref_in, got_in = _leaves(hidden, weight, b), _leaves(hidden, weight, b)
        _, ref_tok = _naive_from_hidden(*ref_in, t_logps, targets, kind, coef, 0.8)
        (ref_tok * w_tok).sum().backward()
        if use_divergence_fn:
            _, tok = fused_full_vocab_divergence(got_in[0], got_in[1], t_logps, kind, coef, 0.8, chunk_size=3,
                                                 target_ids=targets, bias=got_in[2])
        else:
            tok = fused_token_logps(got_in[0], got_in[1], targets, 0.8, chunk_size=3, bias=got_in[2])
        (tok * w_tok).sum().backward()
        assert torch.allclose(tok, ref_tok, atol=1e-5)
        for r, g in zip(ref_in, got_in):
            assert torch.allclose(g.grad, r.grad, atol=1e-5, rtol=1e-5)


def test_fused_with_a_frozen_head_gives_only_the_hidden_gradient():
    from opd_plugins.divergences.chunked import fused_full_vocab_divergence

    hidden, weight, _, t_logps, targets, mask, w_div, _ = _head_inputs(63, bias=False)
    h = hidden.clone().requires_grad_(True)
    fused_full_vocab_divergence(h, weight, t_logps, "forward_kl", chunk_size=4).sum().backward()
    ref_h = hidden.clone().requires_grad_(True)
    _naive_from_hidden(ref_h, weight, None, t_logps, targets, "forward_kl", 0.0, 1.0)[0].sum().backward()
    assert weight.grad is None and torch.allclose(h.grad, ref_h.grad, atol=1e-5)


def test_fused_accepts_bf16_and_returns_bf16_gradients():
    from opd_plugins.divergences.chunked import fused_full_vocab_divergence

    hidden, weight, b, t_logps, targets, mask, w_div, w_tok = _head_inputs(64)
    got_in = [t.bfloat16().requires_grad_(True) for t in (hidden, weight, b)]
    ref_in = [t.bfloat16().float().requires_grad_(True) for t in (hidden, weight, b)]
    got, tok = fused_full_vocab_divergence(got_in[0], got_in[1], t_logps, "jsd", 0.5, chunk_size=4, target_ids=targets,
                                           bias=got_in[2])
    ((got * w_div).sum() + (tok * w_tok).sum()).backward()
    ref, ref_tok = _naive_from_hidden(*ref_in, t_logps, targets, "jsd", 0.5, 1.0)
    ((ref * w_div).sum() + (ref_tok * w_tok).sum()).backward()
    assert got.dtype == torch.float32 and all(t.grad.dtype == torch.bfloat16 for t in got_in)
    assert torch.allclose(got, ref, atol=2e-2) and torch.allclose(tok, ref_tok, atol=5e-2)
    for r, g in zip(ref_in, got_in):
        assert torch.allclose(g.grad.float(), r.grad, atol=5e-2, rtol=2e-2)


def test_fused_saves_only_its_inputs():
    """The memory claim, structurally: autograd keeps the hidden states, the weight, the bias, the teacher
    log-probs and the target ids, and no (N, V) student tensor."""
    from opd_plugins.divergences.chunked import fused_full_vocab_divergence

    hidden, weight, b, t_logps, targets, *_ = _head_inputs(65, B=2, T=8, H=6, V=64)
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    h, w, bb = _leaves(hidden, weight, b)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused_full_vocab_divergence(h, w, t_logps, "jsd", 0.5, chunk_size=4, target_ids=targets, bias=bb)
    inputs = [hidden, weight, b, t_logps, targets]
    assert sum(sizes) == sum(t.numel() * t.element_size() for t in inputs)


def test_fused_bad_input():
    from opd_plugins.divergences.chunked import fused_full_vocab_divergence

    hidden, weight, b, t_logps, targets, *_ = _head_inputs(66)
    with pytest.raises(ValueError, match="unknown divergence kind 'kl'"):
        fused_full_vocab_divergence(hidden, weight, t_logps, "kl")
    with pytest.raises(ValueError, match=r"must be \(\.\.\., H\) and \(V, H\)"):
        fused_full_vocab_divergence(hidden, weight[:, :-1], t_logps, "jsd", 0.5)
    with pytest.raises(ValueError, match="teacher log-probs .* must be"):
        fused_full_vocab_divergence(hidden, weight, t_logps[..., :-1], "jsd", 0.5)
    with pytest.raises(ValueError, match="bias"):
        fused_full_vocab_divergence(hidden, weight, t_logps, "jsd", 0.5, bias=b[:-1])
    with pytest.raises(ValueError, match="chunk_size must be > 0"):
        fused_full_vocab_divergence(hidden, weight, t_logps, "jsd", 0.5, chunk_size=0)
    with pytest.raises(ValueError, match="target ids"):
        fused_full_vocab_divergence(hidden, weight, t_logps, "jsd", 0.5, target_ids=targets[:, :-1])
    with pytest.raises(ValueError, match="must not require grad"):
        fused_full_vocab_divergence(hidden, weight, t_logps.clone().requires_grad_(True), "jsd", 0.5)


FUSED_COMPONENTS = FULL + [(ReverseKL, {"estimator": "full"})]


@pytest.mark.parametrize("cls,params", FUSED_COMPONENTS, ids=_ids(FUSED_COMPONENTS))
def test_components_take_hidden_states_and_lm_head_with_fused_lm_head(cls, params):
    from opd_plugins.divergences import StudentOutputs
    from opd_plugins.divergences.base import LMHead

    div = cls(cls.Params(**params, chunk_size=4, fused_lm_head=True))
    assert div.uses_hidden_states() and not cls(cls.Params(**params)).uses_hidden_states()
    hidden, weight, b, t_logps, targets, mask, w_div, _ = _head_inputs(67)
    temperature = 0.9
    ref_in = _leaves(hidden, weight, b)
    logits = torch.nn.functional.linear(*ref_in).float() / temperature
    _, ref_student, teacher = make_inputs(logits.detach(), t_logps, targets, mask=mask, requires_grad=False)
    ref_student.logits = logits
    ref = cls(cls.Params(**params, chunk_size=0)).per_token(ref_student, teacher)
    (ref.loss * w_div).sum().backward()
    h, w, bb = _leaves(hidden, weight, b)
    student = StudentOutputs(token_logps=ref_student.token_logps, mask=mask, hidden=h,
                             lm_head=LMHead(w, bb, temperature))
    terms = div.per_token(student, teacher)
    (terms.loss * w_div).sum().backward()
    assert torch.allclose(terms.value, ref.value, atol=1e-5) and (terms.value[0, 3:] == 0).all()
    for r, g in zip(ref_in, (h, w, bb)):
        assert torch.allclose(g.grad, r.grad, atol=1e-5, rtol=1e-5)
    student.hidden = None
    with pytest.raises(ValueError, match="needs student logits, or its final hidden states"):
        div.per_token(student, teacher)


def test_fused_lm_head_param_errors():
    with pytest.raises(ValidationError, match="chunk_size must be > 0"):
        JSD.Params(fused_lm_head=True, chunk_size=0)
    with pytest.raises(ValidationError, match="applies to estimator: full only"):
        ReverseKL.Params(fused_lm_head=True)
    with pytest.raises(ValidationError, match="chunk_size must be > 0"):
        ReverseKL.Params(estimator="full", fused_lm_head=True, chunk_size=0)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        ReverseKL.Params(chunk_size=-1)
    assert not ReverseKL().uses_hidden_states() and not K1().uses_hidden_states()
