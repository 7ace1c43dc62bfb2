"""Non-finite numbers stop training before the optimizer step, naming the step (issue 13, item 9): no step is
applied and no checkpoint is published."""

from __future__ import annotations

import pytest
import torch

from opd_plugins.errors import TrainingError
from opd_plugins.trainers.guards import FiniteGradientGuard, check_finite_terms, grad_norm


def test_check_finite_terms_names_the_term_and_step():
    check_finite_terms({"policy_gradient": torch.tensor(0.5), "divergence": torch.tensor(1.0), "mine": None}, 3)
    with pytest.raises(TrainingError, match=r"step 7: the loss term divergence = nan is not finite"):
        check_finite_terms({"policy_gradient": torch.tensor(0.5), "divergence": torch.tensor(float("nan"))}, 7)
    with pytest.raises(TrainingError, match=r"my_plugin_term = 1 non-finite of 3 values"):
        check_finite_terms({"my_plugin_term": torch.tensor([1.0, float("inf"), 2.0])}, 1)


def test_guard_callback_checks_the_gradients():
    from types import SimpleNamespace

    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    guard, state = FiniteGradientGuard(), SimpleNamespace(global_step=4)
    guard.on_pre_optimizer_step(None, state, None, model=model)
    assert grad_norm(model.parameters()) > 0
    model.bias.grad[0] = float("nan")
    with pytest.raises(TrainingError, match=r"step 5: the gradient norm is nan \(non-finite gradients in bias\)"):
        guard.on_pre_optimizer_step(None, state, None, model=model)


def test_both_trainers_install_the_guard():
    from opd_plugins.trainers.checkpointing import HookedTrainerMixin
    from opd_plugins.trainers.opd_trainer import OPDTrainer
    from opd_plugins.trainers.soda_trainer import SODATrainer

    assert issubclass(OPDTrainer, HookedTrainerMixin) and issubclass(SODATrainer, HookedTrainerMixin)
    assert "__init__" in HookedTrainerMixin.__dict__


def test_nan_gradient_stops_training_before_the_step_and_any_checkpoint(tmp_path, opd_tiny_model_dir):
    from helpers import tiny

    from opd_plugins.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(str(opd_tiny_model_dir))
    tokenizer = load_tokenizer(str(opd_tiny_model_dir))
    tr = tiny.trainer(tmp_path / "out", tokenizer, model, reward_funcs=[tiny.even_token_reward], max_steps=3,
                      save_strategy="steps", save_steps=1)
    assert any(isinstance(cb, FiniteGradientGuard) for cb in tr.callback_handler.callbacks)
    before = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    calls = {"n": 0}

    def poison(grad):  # the second optimizer step's gradients are NaN
        calls["n"] += 1
        return grad * float("nan") if tr.state.global_step == 1 else grad

    param = next(p for p in tr.model.parameters() if p.requires_grad)
    param.register_hook(poison)
    with pytest.raises(TrainingError, match="training stopped at step 2: the gradient norm is nan"):
        tr.train()
    assert tr.state.global_step == 1
    after = tr.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())  # the NaN step was never applied
    assert any(not torch.equal(before[k], after[k]) for k in before)  # step 1 was
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1"]
