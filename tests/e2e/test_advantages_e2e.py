"""End to end on tiny models: every new advantage estimator trains inside OPDTrainer."""

import math

import pytest
from helpers.tiny import even_token_reward, history, trainer

from opd_plugins.testing import build_tiny_model
from opd_plugins.trainers import Components

TEACHER = {"teacher": "self_context", "divergence": "reverse_kl"}  # the guidance of the token-level estimators

CASES = {
    "dr_grpo": ({}, {}, {}),
    "rloo": ({}, {}, {}),
    "median": ({}, {}, {"num_generations": 3, "per_device_train_batch_size": 3}),
    "reinforce_pp": ({"baseline": "group"}, {}, {}),
    "passk": ({}, {}, {"per_device_train_batch_size": 8, "max_completion_length": 12}),  # ties at the top give 0
    "teacher_dense": ({"dense_schedule": "linear_decay", "sparse": {"name": "rloo"}}, TEACHER, {}),
    "uni_opd_margin": ({"delta": 0.1}, TEACHER, {}),
    "ace": ({"base": {"name": "dr_grpo"}}, {}, {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_estimator_trains_two_steps(name, tmp_path, opd_tokenizer):
    params, slots, cfg = CASES[name]
    comps = Components.build(advantage=(name, params), pg_weight=1.0, **slots)
    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0), components=comps,
                 reward_funcs=[even_token_reward], max_steps=2, **cfg)
    tr.train()
    loss, grad = history(tr, "loss"), history(tr, "grad_norm")
    assert len(loss) == 2 and all(math.isfinite(v) for v in loss), loss
    assert all(math.isfinite(g) for g in grad) and max(grad) > 0, grad
    if "teacher" in slots:
        assert len(history(tr, "opd/divergence_reward")) == 2  # the teacher guidance was computed


def test_ace_with_a_divergence_present(tmp_path, opd_tokenizer):
    # The divergence changes how the student's log-probs are computed (full logits); the estimator still runs.
    comps = Components.build(advantage="ace", pg_weight=1.0, divergence="reverse_kl")
    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0), components=comps,
                 reward_funcs=[even_token_reward], max_steps=1)
    tr.train()
    assert all(math.isfinite(v) for v in history(tr, "loss"))


def test_teacher_dense_distills_without_a_task_reward(tmp_path, opd_tokenizer):
    comps = Components.build(advantage=("teacher_dense", {"sparse": None}), pg_weight=1.0, **TEACHER)
    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0), components=comps,
                 max_steps=2, num_generations=2)  # (TRL's GRPOConfig requires at least 2)
    tr.train()
    assert max(history(tr, "grad_norm")) > 0 and all(math.isfinite(v) for v in history(tr, "loss"))


def test_rloo_raises_reward(tmp_path, opd_tokenizer):
    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0),
                 components=Components.build(advantage="rloo"), reward_funcs=[even_token_reward], max_steps=12,
                 learning_rate=3e-2)
    tr.train()
    r = history(tr, "reward")
    assert len(r) == 12 and sum(r[-3:]) / 3 > sum(r[:3]) / 3 + 0.1, r


@pytest.mark.parametrize("divergence", [("reverse_kl", {}), ("forward_kl", {})])
def test_divergence_reward_to_go_reaches_the_advantages(tmp_path, opd_tokenizer, divergence):
    """No task reward: the advantages are exactly the reward-to-go of the divergence's reward and values."""
    import torch

    from opd_plugins.advantages.base import reward_to_go

    comps = Components.build(teacher="self_context", divergence=divergence, pg_weight=1.0, div_reward_weight=1.0,
                             div_reward_to_go=True)
    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0), components=comps,
                 max_steps=1)
    seen = []
    original = tr.compute_advantages

    def spy(out, rows, scores, mask):
        advantages = original(out, rows, scores, mask)
        student = tr.student_outputs(tr.model, out, grad=False)  # the whole batch at once, full scores
        full = tr.score_teacher(out, rows, comps.divergence.requires(), hooks=False)
        d = comps.divergence.reward(student, full) * mask
        value = comps.divergence.per_token(student, full).value * mask
        seen.append((advantages, reward_to_go(d, mask, value), d))
        return advantages

    tr.compute_advantages = spy
    tr.train()
    advantages, expected, d = seen[0]
    assert torch.allclose(advantages, expected, atol=1e-5)
    assert not torch.allclose(advantages, d, atol=1e-3)  # not the per-position reward
    assert math.isfinite(history(tr, "loss")[0])
