"""The teacher's full vocabulary in factored form (hidden states + lm head, ``TeacherScores.hidden``): the fused
kernel computes the same divergence and gradients from it as from the teacher's log-probs, the local teachers'
scores from their hidden states equal the scores from their logits, and the checks refuse malformed ones.
References are plain autograd over explicit ``(N, V)`` tensors."""

import pytest
import torch

from opd_plugins.divergences._kernels import fused_divergence
from opd_plugins.divergences.forward_kl import ForwardKLFormula
from opd_plugins.divergences.jsd import JSDFormula
from opd_plugins.errors import TeacherError
from opd_plugins.lm_head import LMHead, head_scores
from opd_plugins.teachers.base import TeacherBatch, TeacherScores, score_with_causal_lm
from opd_plugins.testing import build_tiny_model


def _inputs(seed, n=11, h=6, h_t=9, v=23):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight, bias = torch.randn(v, h, generator=g) * 0.7, torch.randn(v, generator=g) * 0.3
    t_hidden = torch.randn(n, h_t, generator=g)
    t_head = LMHead(torch.randn(v, h_t, generator=g) * 0.9, torch.randn(v, generator=g) * 0.2, temperature=0.7)
    return hidden, weight, bias, t_hidden, t_head


@pytest.mark.parametrize("formula", [ForwardKLFormula(), JSDFormula(beta=0.3)], ids=["forward_kl", "jsd"])
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_a_teacher_head_gives_the_divergence_and_gradients_of_its_log_probs(formula, chunk):
    hidden, weight, bias, t_hidden, t_head = _inputs(5)
    w = torch.rand(hidden.shape[0], generator=torch.Generator().manual_seed(1))
    # reference: the teacher's (N, V) log-probs written out, the student's logits too, plain autograd
    t_logps = torch.log_softmax((t_hidden @ t_head.weight.T + t_head.bias) / t_head.temperature, -1)
    ref_leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    s_lp = torch.log_softmax((ref_leaves[0] @ ref_leaves[1].T + ref_leaves[2]) / 0.8, -1)
    ref = formula.value(s_lp, t_logps)
    (ref * w).sum().backward()
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    got = fused_divergence(leaves[0], leaves[1], None, formula, 0.8, chunk, bias=leaves[2],
                           teacher_head=(t_hidden, t_head))
    (got * w).sum().backward()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for name, r, g in zip(("hidden", "weight", "bias"), ref_leaves, leaves):
        torch.testing.assert_close(g.grad, r.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_a_teacher_head_is_refused_when_it_does_not_fit_or_carries_gradient():
    hidden, weight, bias, t_hidden, t_head = _inputs(6)
    formula = ForwardKLFormula()
    with pytest.raises(ValueError, match="teacher hidden states"):
        fused_divergence(hidden, weight, None, formula, 1.0, 4, teacher_head=(t_hidden[:-1], t_head))
    with pytest.raises(ValueError, match="teacher hidden states"):
        fused_divergence(hidden, weight, torch.zeros(11, 23), formula, 1.0, 4, teacher_head=(t_hidden, t_head))
    with pytest.raises(ValueError, match="must not require grad"):
        fused_divergence(hidden, weight, None, formula, 1.0, 4,
                         teacher_head=(t_hidden.requires_grad_(True), t_head))


def test_head_scores_match_the_log_softmax_of_the_logits():
    _, _, _, t_hidden, head = _inputs(7, n=12)
    hidden, targets = t_hidden.view(3, 4, -1), torch.randint(0, 23, (3, 4), generator=torch.Generator().manual_seed(2))
    lp = torch.log_softmax((hidden @ head.weight.T + head.bias) / head.temperature, -1)
    got = head_scores(hidden, head, targets, chunk=5, top_k=3)
    torch.testing.assert_close(got["token_logps"], lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(got["entropy"], -(lp.exp() * lp).sum(-1))
    vals, ids = lp.topk(3, dim=-1)
    assert torch.equal(got["topk_ids"], ids)
    torch.testing.assert_close(got["topk_logps"], vals)
    torch.testing.assert_close(got["topk_mass"], vals.exp().sum(-1))


@pytest.fixture(scope="module")
def model_and_batch(opd_tokenizer):
    model = build_tiny_model(opd_tokenizer, seed=3, arch="llama").eval()
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(3, 60, (5, 6), generator=g)
    completion = torch.randint(3, 60, (5, 7), generator=g)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[0, :2] = 0  # left padding
    completion_mask = torch.ones_like(completion)
    completion_mask[1, 4:] = 0  # right padding
    return model, prompt, prompt_mask, completion, completion_mask


@pytest.mark.parametrize("want", ["sampled", "topk", "full"])
def test_local_teacher_scores_from_hidden_states_equal_those_from_logits(model_and_batch, want):
    model, prompt, prompt_mask, completion, completion_mask = model_and_batch
    ids, mask = torch.cat([prompt, completion], 1), torch.cat([prompt_mask, completion_mask], 1)
    kwargs = {"want": want, "temperature": 0.9, "top_k": 2, "chunk_size": 2}
    plain = score_with_causal_lm(model, ids, mask, completion, completion_mask, **kwargs)
    factored = score_with_causal_lm(model, ids, mask, completion, completion_mask, head_chunk=3,
                                    full_as_hidden=True, **kwargs)
    for name in ("token_logps", "entropy", "topk_logps", "topk_mass", "mask"):
        torch.testing.assert_close(getattr(factored, name), getattr(plain, name), atol=1e-5, rtol=1e-5, msg=name)
    valid = completion_mask.bool()
    assert torch.equal(factored.topk_ids[valid], plain.topk_ids[valid])
    if want != "full":
        assert factored.hidden is None and factored.lm_head is None and factored.logps is None
        return
    assert factored.logps is None and factored.capability == "full"
    assert factored.hidden.shape == (*completion.shape, model.config.hidden_size)
    rebuilt = torch.log_softmax(factored.lm_head.logits(factored.hidden.reshape(-1, factored.hidden.shape[-1])), -1)
    torch.testing.assert_close(rebuilt.view_as(plain.logps)[valid], plain.logps[valid], atol=1e-5, rtol=1e-5)
    # without full_as_hidden a full request is answered with log-probs, as before
    again = score_with_causal_lm(model, ids, mask, completion, completion_mask, head_chunk=3, **kwargs)
    assert again.hidden is None and again.logps is not None


def test_a_transient_head_is_copied_and_a_kept_one_is_shared(model_and_batch):
    model, prompt, prompt_mask, completion, completion_mask = model_and_batch
    ids, mask = torch.cat([prompt, completion], 1), torch.cat([prompt_mask, completion_mask], 1)
    head = model.get_output_embeddings().weight
    for transient in (False, True):
        scores = score_with_causal_lm(model, ids, mask, completion, completion_mask, want="full", head_chunk=4,
                                      full_as_hidden=True, transient_head=transient)
        shares = scores.lm_head.weight.data_ptr() == head.data_ptr()
        assert shares != transient and not scores.lm_head.weight.requires_grad


def test_a_soft_capping_teacher_is_scored_from_its_logits(opd_tokenizer, model_and_batch):
    _, prompt, prompt_mask, completion, completion_mask = model_and_batch
    model = build_tiny_model(opd_tokenizer, seed=3, arch="llama").eval()
    model.config.final_logit_softcapping = 30.0  # the fused head refuses it: no hidden-state form
    ids, mask = torch.cat([prompt, completion], 1), torch.cat([prompt_mask, completion_mask], 1)
    scores = score_with_causal_lm(model, ids, mask, completion, completion_mask, want="full", head_chunk=4,
                                  full_as_hidden=True)
    assert scores.hidden is None and scores.logps is not None


def _batch(b=2, t=3):
    return TeacherBatch(prompt_ids=torch.ones(b, 2, dtype=torch.long), prompt_mask=torch.ones(b, 2),
                        completion_ids=torch.zeros(b, t, dtype=torch.long), completion_mask=torch.ones(b, t))


def _factored(b=2, t=3, h=4, v=5):
    head = LMHead(torch.zeros(v, h))
    return TeacherScores(token_logps=torch.full((b, t), -float(torch.log(torch.tensor(float(v))))),
                         mask=torch.ones(b, t), hidden=torch.zeros(b, t, h), lm_head=head)


def test_factored_scores_validate_and_slice_with_their_head():
    scores = _factored()
    assert scores.validate(_batch(), "t") == 0
    part = scores.rows(slice(1, 2))
    assert part.hidden.shape == (1, 3, 4) and part.lm_head is scores.lm_head
    with pytest.raises(TeacherError, match="not stored in a generation batch"):
        scores.to_batch()


@pytest.mark.parametrize("broken,match", [
    (lambda s: setattr(s, "lm_head", None), "without the matching lm_head"),
    (lambda s: setattr(s, "hidden", None), "without the matching hidden states"),
    (lambda s: setattr(s, "hidden", torch.zeros(2, 3, 7)), "hidden states of size 7"),
    (lambda s: setattr(s, "hidden", torch.zeros(2, 2, 4)), "hidden of shape"),
    (lambda s: s.hidden.__setitem__((0, 1, 2), float("nan")), "non-finite"),
])
def test_malformed_factored_scores_are_refused(broken, match):
    scores = _factored()
    broken(scores)
    with pytest.raises(TeacherError, match=match):
        scores.validate(_batch(), "t")
