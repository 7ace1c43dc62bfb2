"""Correctness of the loss assembly in configurations the first wave got wrong (issue 12): teacher scoring with
schedules across a reused generation batch, and terms that would be dropped silently."""

from __future__ import annotations

import pytest
import yaml
from helpers.tiny import history, trainer

from opd_plugins.errors import RecipeError
from opd_plugins.recipe import load_recipe
from opd_plugins.testing import build_tiny_model
from opd_plugins.trainers import Components


def test_divergence_weight_rising_from_zero_within_a_generation_batch_is_scored(tmp_path, opd_tokenizer):
    """steps_per_generation=2 with one micro-step per optimizer step: the batch made at step 0 (weight 0) also
    serves step 1 (weight > 0). The teacher must score it at generation time (this crashed with TeacherError)."""
    comps = Components.build(teacher="self_context", divergence="reverse_kl", pg_weight=0.0,
                             div_weight=("warmup_decay", {"peak": 1.0, "warmup_steps": 5, "decay": "none"}))
    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer), components=comps, max_steps=4,
                 gradient_accumulation_steps=1, steps_per_generation=2, per_device_train_batch_size=4)
    tr.train()
    weights = history(tr, "opd/weight/divergence")
    assert weights[0] == 0.0 and weights[1] > 0 and len(history(tr, "opd/divergence")) >= 3


def test_buffer_steps_cover_every_reuse_of_a_generation_batch(tmp_path, opd_tokenizer):
    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer), max_steps=1,
                 gradient_accumulation_steps=2, steps_per_generation=4, num_iterations=3,
                 per_device_train_batch_size=4)
    assert list(tr.buffer_steps()) == [0, 1, 2, 3, 4, 5]  # 4 micro-steps × 3 iterations / 2 per optimizer step


def _recipe(tmp_path, model_dir, **args):
    recipe = {"model": {"name_or_path": str(model_dir)}, "data": {"task": {"name": "arithmetic"}},
              "trainer": {"args": {"per_device_train_batch_size": 4, "num_generations": 4, **args}},
              "teacher": {"name": "self_context"}, "divergence": {"name": "reverse_kl"},
              "objective": {"policy_gradient": 0.0, "divergence": 1.0}, "output_dir": str(tmp_path / "run")}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_kl_to_reference_and_entropy_bonus_with_a_zero_policy_gradient_are_refused(tmp_path, opd_tiny_model_dir):
    with pytest.raises(RecipeError) as exc:
        load_recipe(_recipe(tmp_path, opd_tiny_model_dir, beta=0.04, entropy_coef=0.01))
    msg = str(exc.value)
    assert "trainer.args.beta: beta=0.04: the KL to the reference model lives in TRL's policy-gradient loss" in msg
    assert "trainer.args.entropy_coef: the entropy bonus lives in TRL's policy-gradient loss" in msg
    load_recipe(_recipe(tmp_path, opd_tiny_model_dir))  # without them the pure-distillation recipe is fine


def test_the_trainer_hands_the_sampling_policys_logps_to_the_divergence(tmp_path, opd_tokenizer):
    """When a generation batch serves several optimizer steps, TRL computes old_per_token_logps; the divergence
    receives them (StudentOutputs.old_token_logps) so sampled-token estimators can weight by ρ = π_θ/π_old."""
    comps = Components.build(teacher="self_context", divergence="k1", pg_weight=0.0, div_weight=1.0)
    seen = []
    real = comps.divergence.per_token

    def spy(student, teacher):
        seen.append(None if student.old_token_logps is None else float(
            (student.token_logps.detach() - student.old_token_logps).abs().max()))
        return real(student, teacher)

    comps.divergence.per_token = spy
    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer), components=comps, max_steps=2,
                 gradient_accumulation_steps=1, steps_per_generation=2, per_device_train_batch_size=4,
                 learning_rate=5e-2)
    tr.train()
    assert len(seen) == 2 and all(s is not None for s in seen)
    assert seen[0] < 1e-4 < seen[1]  # step 1 trains on tokens the step-0 policy sampled: π_θ ≠ π_old there


def _graded_reward(completion_ids, **kwargs):
    return [float(sum(ids) % 3) for ids in completion_ids]  # three levels: odd groups have a clear median


def test_mc_grpo_pivot_leaves_every_loss_term(tmp_path, opd_tokenizer):
    comps = Components.build(advantage="median")
    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer), components=comps, max_steps=2,
                 reward_funcs=[_graded_reward], num_generations=3, per_device_train_batch_size=6)
    tr.train()
    frac = history(tr, "opd/excluded_completion_frac")
    assert frac and all(abs(f - 1 / 3) < 1e-6 for f in frac)  # one pivot in each group of 3


def test_ace_with_a_reference_scores_the_batch_with_it(tmp_path, opd_tokenizer):
    comps = Components.build(advantage=("ace", {"reference": {
        "name": "self_context", "params": {"weights": "initial", "template": "{prompt}"}}}))
    seen = []
    real = comps.advantage.penalty
    comps.advantage.penalty = lambda inputs: seen.append(inputs.ref_logps) or real(inputs)
    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer), components=comps, max_steps=1,
                 reward_funcs=[_graded_reward])
    tr.train()
    assert seen and seen[0] is not None and seen[0].shape[0] == 4
    assert comps.advantage.confidence == "reference"


def test_a_non_finite_loss_term_stops_training_naming_the_term(tmp_path, opd_tokenizer):
    import torch

    from opd_plugins.errors import TrainingError
    from opd_plugins.trainers import OPDTrainer

    class Broken(OPDTrainer):
        def divergence_loss(self, model, inputs):
            return super().divergence_loss(model, inputs) * float("nan")

    from helpers.tiny import config, prompt_dataset

    model = build_tiny_model(opd_tokenizer)
    before = [p.detach().clone() for p in model.parameters()]
    comps = Components.build(teacher="self_context", divergence="reverse_kl", pg_weight=1.0, div_weight=1.0)
    tr = Broken(model=model, args=config(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=1),
                components=comps, train_dataset=prompt_dataset(), processing_class=opd_tokenizer)
    with pytest.raises(TrainingError, match=r"training stopped at step 1: the loss term divergence = nan"):
        tr.train()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no optimizer step
    assert not any((tmp_path / "run").glob("checkpoint-*"))
