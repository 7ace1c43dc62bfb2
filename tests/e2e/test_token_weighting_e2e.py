"""End to end on a tiny model: a reward-gated token weighting reaches the divergence loss."""

import math

import torch
from helpers.tiny import even_token_reward, history, trainer

from opd_plugins.testing import build_tiny_model
from opd_plugins.trainers import Components


def _gated(gate_params):
    return Components.build(teacher="self_context", divergence="reverse_kl", pg_weight=0.0, div_weight=1.0,
                            token_weighting=[("correctness_gate", gate_params)])


def test_correctness_gate_trains_on_incorrect_rollouts(tmp_path, opd_tokenizer):
    comps = _gated({"apply_to": "incorrect", "threshold": 0.5})
    model = build_tiny_model(opd_tokenizer, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    tr = trainer(tmp_path / "run", opd_tokenizer, model, components=comps, reward_funcs=[even_token_reward],
                 max_steps=2)
    tr.train()
    assert len(history(tr, "opd/divergence")) == 2
    assert all(math.isfinite(x) for x in history(tr, "loss"))
    assert any(g > 0 for g in history(tr, "grad_norm"))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    stats = comps.token_weighting[0].last_stats  # filled by the trainer's calls to weights()
    assert {"correct_fraction", "incorrect_fraction", "unscored_fraction", "kept_fraction"} <= set(stats)
    assert stats["unscored_fraction"] == 0.0
    assert len(history(tr, "token_weighting/correctness_gate/kept_fraction")) == 2  # logged every step


def test_a_gate_that_admits_nothing_zeroes_the_gradient(tmp_path, opd_tokenizer):
    comps = _gated({"apply_to": "correct", "threshold": 2.0})  # even_token_reward is at most 1: nothing is correct
    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0), components=comps,
                 reward_funcs=[even_token_reward], max_steps=2)
    tr.train()
    assert len(history(tr, "opd/divergence")) == 2
    assert history(tr, "grad_norm") == [0.0, 0.0]
    assert comps.token_weighting[0].last_stats["kept_fraction"] == 0.0
    assert history(tr, "token_weighting/correctness_gate/kept_fraction") == [0.0, 0.0]


def test_a_reward_gate_without_reward_funcs_is_refused(tmp_path, opd_tokenizer):
    import pytest

    from opd_plugins.errors import OPDError

    with pytest.raises(OPDError, match="token weighting correctness_gate gates on task rewards"):
        trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0), components=_gated({}),
                max_steps=1)


def _naive_entropy(model, inputs, temperature):
    """``(B, T)`` entropy of the student's next-token distributions at the completion positions, from a plain
    forward of the whole sequence."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am).logits[:, -(T + 1):-1].float() / temperature
    logps = torch.log_softmax(logits, -1)
    return -(logps.exp() * logps).sum(-1)


def test_tip_ranks_by_the_exact_entropy_on_every_student_path(tmp_path, opd_tokenizer):
    # The policy-gradient forward (captured), the divergence's own forward (no policy gradient) and the fused lm
    # head each hand tip the exact entropies, which equal a naive forward's.
    cases = {"captured": ({}, 1.0), "own_forward": ({}, 0.0), "fused": ({"estimator": "full", "fused_lm_head": True},
                                                                          0.0)}
    for case, (div_params, pg_weight) in cases.items():
        comps = Components.build(teacher="self_context", divergence=("reverse_kl", div_params), pg_weight=pg_weight,
                                 div_weight=1.0, token_weighting=[("tip", {"score": "entropy"})])
        tw = comps.token_weighting[0]
        model = build_tiny_model(opd_tokenizer, seed=0)
        seen = []
        original = tw.weights

        def spy(inputs, student, teacher, original=original, model=model):
            assert student.entropy is not None and student.logits is None
            seen.append(float((student.entropy - _naive_entropy(model, inputs, 0.7)).abs().max()))
            return original(inputs, student, teacher)

        tw.weights = spy
        tr = trainer(tmp_path / case, opd_tokenizer, model, components=comps, reward_funcs=[even_token_reward],
                     max_steps=2, temperature=0.7)
        tr.train()
        assert len(seen) == 2 and max(seen) < 1e-4, (case, seen)
        assert tw.draws == 2
        assert history(tr, "token_weighting/tip/kept_fraction")
