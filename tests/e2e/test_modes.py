"""End to end on tiny models: each mode moves the quantity it optimises in the right direction."""

import torch
from helpers.tiny import even_token_reward, history, trainer

from opd_plugins.testing import build_tiny_model
from opd_plugins.trainers import Components


def _teacher_components(teacher_dir, **weights):
    return Components.build(teacher=("hf_model", {"model": str(teacher_dir)}), **weights)


def test_pure_opd_divergence_to_fixed_teacher_falls(tmp_path, opd_tokenizer, opd_tiny_model_dir):
    from opd_plugins.testing import save_tiny_model

    teacher_dir = save_tiny_model(tmp_path / "teacher", seed=7, hidden=96, tokenizer=opd_tokenizer)
    comps = _teacher_components(teacher_dir, divergence=("reverse_kl", {"estimator": "full"}), pg_weight=0.0,
                                div_weight=1.0)
    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0), components=comps,
                 max_steps=12, learning_rate=2e-2)
    tr.train()
    kl = history(tr, "opd/divergence")
    assert len(kl) == 12 and all(k >= 0 for k in kl)
    assert sum(kl[-3:]) / 3 < 0.6 * sum(kl[:3]) / 3, kl
    assert history(tr, "opd/weight/policy_gradient")[0] == 0.0


def _sharp_teacher(path, tokenizer, scale=30.0):
    """A tiny teacher with sharp (low-entropy) predictions, so the student has a lot to learn."""
    model = build_tiny_model(tokenizer, seed=7, hidden=96)
    with torch.no_grad():
        model.model.norm.weight.mul_(scale)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_opd_as_advantage_raises_divergence_reward(tmp_path, opd_tokenizer):
    teacher_dir = _sharp_teacher(tmp_path / "teacher", opd_tokenizer)
    comps = _teacher_components(teacher_dir, divergence="reverse_kl", pg_weight=1.0, div_weight=0.0,
                                div_reward_weight=1.0)
    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0), components=comps,
                 max_steps=12, learning_rate=2e-2)
    tr.train()
    r = history(tr, "opd/divergence_reward")
    assert len(r) == 12
    assert sum(r[-3:]) / 3 > sum(r[:3]) / 3, r  # -KL rises towards 0


def test_grpo_raises_reward(tmp_path, opd_tokenizer):
    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0),
                 reward_funcs=[even_token_reward], max_steps=12, learning_rate=3e-2)
    tr.train()
    r = history(tr, "reward")
    assert len(r) == 12 and sum(r[-3:]) / 3 > sum(r[:3]) / 3 + 0.1, r
    assert "opd/divergence" not in tr.state.log_history[0]


def test_hybrid_logs_both_terms_and_learns(tmp_path, opd_tokenizer):
    comps = Components.build(teacher="self_context", divergence="reverse_kl", pg_weight=1.0,
                             div_weight=("linear", {"start": 1.0, "end": 0.0}))
    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0), components=comps,
                 reward_funcs=[even_token_reward], max_steps=6, learning_rate=3e-2)
    tr.train()
    w = history(tr, "opd/weight/divergence")
    assert w[0] == 1.0 and w[-1] < w[0]
    assert len(history(tr, "opd/divergence")) == 6 and len(history(tr, "reward")) == 6
    assert all(torch.isfinite(torch.tensor(history(tr, "loss"))))


def test_teacher_equal_to_student_gives_zero_divergence_and_gradient(tmp_path, opd_tokenizer, opd_tiny_model_dir):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(opd_tiny_model_dir)
    comps = _teacher_components(opd_tiny_model_dir, divergence="reverse_kl", pg_weight=0.0, div_weight=1.0)
    tr = trainer(tmp_path / "run", opd_tokenizer, student, components=comps, max_steps=1)
    tr.train()
    assert abs(history(tr, "opd/divergence")[0]) < 1e-5
    assert history(tr, "grad_norm")[0] < 1e-5  # (Adam would still move weights: only the gradient is zero)
