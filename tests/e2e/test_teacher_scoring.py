"""Full-vocabulary teacher scores per micro-batch at loss time (``teacher_scoring: loss``) train exactly as scoring
the whole generation batch once (``generation``), without the batch ever holding ``(B, T, V)`` teacher log-probs."""

import pytest
import torch
from helpers.tiny import config, even_token_reward, history, prompt_dataset, trainer

from opd_plugins.errors import OPDError
from opd_plugins.testing import build_tiny_model
from opd_plugins.trainers import Components, OPDTrainer

INITIAL = ("self_context", {"weights": "initial"})  # a teacher that does not move: both modes see the same one


def _run(tmp_path, tokenizer, scoring, **slots):
    comps = Components.build(teacher=INITIAL, divergence=("forward_kl", {}), pg_weight=1.0, div_weight=1.0,
                             **slots)
    model = build_tiny_model(tokenizer, seed=0)
    # steps_per_generation 2 with one micro-step per optimizer step: the batch serves two optimizer steps; an
    # evaluation runs between them (it generates and scores a batch of its own)
    args = config(tmp_path / scoring, max_steps=2, gradient_accumulation_steps=1, steps_per_generation=2,
                  per_device_train_batch_size=4, teacher_scoring=scoring, eval_strategy="steps", eval_steps=1,
                  per_device_eval_batch_size=4)
    tr = OPDTrainer(model=model, args=args, components=comps, reward_funcs=[even_token_reward],
                    train_dataset=prompt_dataset(), eval_dataset=prompt_dataset(1), processing_class=tokenizer)
    seen = []
    original = tr._generate_and_score_completions

    def spy(inputs):
        out = original(inputs)
        seen.append(sorted(k for k in out if k.startswith("teacher_")))
        return out

    tr._generate_and_score_completions = spy
    tr.train()
    return tr, model, seen


@pytest.mark.parametrize("slots", [{}, {"div_reward_weight": 0.5, "token_weighting": [("tip", {"selection": "topk"})]}],
                         ids=["divergence", "with_reward_and_weighting"])
def test_loss_time_scoring_trains_exactly_as_generation_time_scoring(tmp_path, opd_tokenizer, slots):
    gen, gen_model, gen_seen = _run(tmp_path, opd_tokenizer, "generation", **slots)
    loss, loss_model, loss_seen = _run(tmp_path, opd_tokenizer, "loss", **slots)
    assert not gen.teacher_at_loss and loss.teacher_at_loss
    assert all("teacher_logps" in keys for keys in gen_seen)
    assert all("teacher_logps" not in keys for keys in loss_seen)  # never (B, T, V) in the batch
    if slots:  # the reward and the weighting read the sampled tokens' log-probs at generation time
        assert all("teacher_token_logps" in keys for keys in loss_seen)
    for key in ("loss", "opd/divergence", "eval_loss"):
        a, b = history(gen, key), history(loss, key)
        assert len(a) == 2 and a == pytest.approx(b, abs=1e-5), key
    for p, q in zip(gen_model.parameters(), loss_model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_auto_scores_at_loss_time_only_where_it_can(tmp_path, opd_tokenizer):
    def build(teacher, divergence, scoring="auto"):
        comps = Components.build(teacher=teacher, divergence=divergence, pg_weight=0.0, div_weight=1.0)
        return trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer), components=comps,
                       max_steps=1, teacher_scoring=scoring)

    assert build(INITIAL, "forward_kl").teacher_at_loss
    assert not build(INITIAL, "reverse_kl").teacher_at_loss  # sampled tokens only: nothing (B, T, V) to hold
    assert not build(INITIAL, "forward_kl", "generation").teacher_at_loss


def test_a_teacher_that_cannot_score_any_rows_is_refused_for_loss_time_scoring(tmp_path, opd_tokenizer,
                                                                                monkeypatch):
    from opd_plugins.teachers.self_context import SelfContextTeacher

    monkeypatch.setattr(SelfContextTeacher, "scores_any_rows", False)
    comps = Components.build(teacher=INITIAL, divergence="forward_kl", pg_weight=0.0, div_weight=1.0)
    with pytest.raises(OPDError, match="teacher_scoring='loss'.*'self_context' does not score arbitrary rows"):
        trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer), components=comps, max_steps=1,
                teacher_scoring="loss")
    comps = Components.build(teacher=INITIAL, divergence="forward_kl", pg_weight=0.0, div_weight=1.0)
    assert not trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer), components=comps,
                       max_steps=1).teacher_at_loss
