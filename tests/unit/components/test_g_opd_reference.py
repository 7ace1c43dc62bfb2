"""g_opd with a real reference policy (issue 12.1): the per-position optimum is π* ∝ π_ref·(π_T/π_ref)^λ, found by
brute force (gradient descent on the enumerated expected loss) for λ ∈ {0, 0.5, 1, 2}; a reference teacher fills
``ref_token_logps`` in a real training step; λ ≠ 1 without a reference is refused."""

from __future__ import annotations

import pytest
import torch

from opd_plugins.divergences import GOPD
from opd_plugins.divergences.base import StudentOutputs
from opd_plugins.errors import RecipeError
from opd_plugins.manager import get_plugin_manager
from opd_plugins.teachers.base import TeacherScores

REGISTRY = get_plugin_manager().registry
V = 5


def _expected_loss(div, logits, t_logps, ref_logps):
    """Σ_x π_s(x)·loss(x) with the sampled token enumerated; its gradient is E[∇loss] (score function)."""
    total = 0.0
    probs = torch.softmax(logits, -1).detach()
    for x in range(V):
        tok = torch.tensor([[x]])
        lp = torch.log_softmax(logits, -1)[None, None, x].reshape(1, 1)
        student = StudentOutputs(token_logps=lp, mask=torch.ones(1, 1))
        teacher = TeacherScores(token_logps=t_logps[x].reshape(1, 1), mask=torch.ones(1, 1),
                                ref_token_logps=None if ref_logps is None else ref_logps[x].reshape(1, 1))
        total = total + probs[x] * div.per_token(student, teacher).loss.sum()
        del tok
    return total


def _optimum(div, t_logps, ref_logps, steps=3000, lr=0.5):
    logits = torch.zeros(V, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        _expected_loss(div, logits, t_logps, ref_logps).backward()
        opt.step()
    return torch.softmax(logits.detach(), -1)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0])
def test_the_brute_force_optimum_is_the_reference_tilted_teacher(lam):
    g = torch.Generator().manual_seed(11)
    t_logps = torch.log_softmax(torch.randn(V, generator=g), -1)
    ref_logps = torch.log_softmax(torch.randn(V, generator=g), -1)
    div = GOPD(GOPD.Params(reward_scale=lam, uniform_reference=True))  # ref given in the scores, as the trainer does
    found = _optimum(div, t_logps, ref_logps)
    target = torch.softmax((1 - lam) * ref_logps + lam * t_logps, -1)  # π_ref·(π_T/π_ref)^λ, normalised
    torch.testing.assert_close(found, target, atol=2e-3, rtol=0)
    if lam != 1.0:  # the old behaviour (no reference): π ∝ π_T^λ, a different distribution
        sharpened = torch.softmax(lam * t_logps, -1)
        assert (sharpened - target).abs().max() > 0.05
        torch.testing.assert_close(_optimum(div, t_logps, None), sharpened, atol=2e-3, rtol=0)


def test_lambda_other_than_one_needs_a_reference():
    with pytest.raises(ValueError, match="needs a reference policy"):
        GOPD.Params(reward_scale=2.0)
    with pytest.raises(RecipeError, match="params.reference.name: unknown teacher 'self_contxt'"):
        REGISTRY.build("divergence", ("g_opd", {"reward_scale": 2.0, "reference": {"name": "self_contxt"}}))
    div = REGISTRY.build("divergence", ("g_opd", {"reward_scale": 2.0, "reference": {
        "name": "self_context", "params": {"weights": "initial", "template": "{prompt}"}}}))
    assert div.reference().name == "self_context"


def test_a_training_step_fills_the_reference_scores_from_the_reference_teacher(tmp_path, opd_tokenizer):
    """ExOPD in a real step: the reference (the student's initial weights on the plain prompt) scores the batch,
    the scores carry ref_token_logps, and the token reward uses them."""
    from helpers.tiny import trainer

    from opd_plugins.testing import build_tiny_model
    from opd_plugins.trainers import Components

    comps = Components.build(teacher=("self_context", {}), advantage=("teacher_dense", {"sparse": None}),
                             divergence=("g_opd", {"reward_scale": 2.0, "reference": {
                                 "name": "self_context", "params": {"weights": "initial", "template": "{prompt}"}}}),
                             pg_weight=1.0)
    seen = []
    real = comps.divergence.reward
    comps.divergence.reward = lambda st, te: seen.append((st, te)) or real(st, te)
    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer), components=comps, max_steps=1)
    tr.train()
    ((student, scores),) = seen
    assert scores.ref_token_logps is not None and scores.ref_token_logps.shape == scores.token_logps.shape
    # Before any update the student is its initial self on the same prompt, so π_ref(x) = π_s(x) token for token,
    # and the reward is λ(t − ref) − (s − ref) = λ·(t − s).
    m = scores.mask.bool()
    torch.testing.assert_close(scores.ref_token_logps[m], student.token_logps[m], atol=1e-4, rtol=0)
    reward = comps.divergence.reward(student, scores)
    torch.testing.assert_close(reward[m], (2.0 * (scores.token_logps - student.token_logps))[m], atol=1e-4, rtol=0)
