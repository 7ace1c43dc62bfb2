"""The ``fp8`` rollout backend in real tiny training runs: the correction sees the FP8 mismatch of ``rollout_only``
and none under ``unified``; the divergence of a distillation recipe is computed from the trainer's own forward,
never from the FP8 behaviour log-probs."""

import copy

import pytest
import torch
from helpers.tiny import config, even_token_reward, history, prompt_dataset

from opd_plugins.rollout.fp8 import FP8Rollout
from opd_plugins.testing import build_tiny_model
from opd_plugins.trainers import Components, OPDTrainer

BLOCK = (32, 32)


def _trainer(tmp_path, tokenizer, rollout, correction="tis", model=None, **slots):
    return OPDTrainer(model=model or build_tiny_model(tokenizer, seed=0), args=config(tmp_path, max_steps=2),
                      components=Components.build(rollout=rollout, correction=correction, **slots),
                      reward_funcs=[even_token_reward], train_dataset=prompt_dataset(), processing_class=tokenizer)


@pytest.mark.parametrize("flow", ["rollout_only", "unified"])
def test_correction_metrics_see_the_fp8_mismatch(tmp_path, opd_tokenizer, flow):
    backend = FP8Rollout(FP8Rollout.Params(flow=flow, block=BLOCK))
    tr = _trainer(tmp_path, opd_tokenizer, backend)
    tr.train()
    keys = ("mismatch_kl", "mismatch_kl_k1", "logp_diff_abs_mean", "logp_diff_abs_p50", "logp_diff_abs_p90",
            "logp_diff_abs_p99", "logp_diff_abs_max", "ratio_min", "ratio_p50", "ratio_p90", "ratio_max",
            "masked_frac", "truncated_frac", "weight_mean", "ess")
    for key in keys:
        assert len(history(tr, f"correction/{key}")) == 2, key
    kl, gap = history(tr, "correction/mismatch_kl"), history(tr, "correction/logp_diff_abs_max")
    if flow == "rollout_only":
        assert all(k > 1e-6 for k in kl) and all(g > 1e-3 for g in gap)
        assert history(tr, "fp8/requantize_s")  # re-quantized after the first optimizer step
    else:  # one precision flow: the policy that is trained is the policy that sampled
        assert all(k < 1e-9 for k in kl) and all(g < 1e-4 for g in gap)
        assert history(tr, "correction/weight_mean") == pytest.approx([1.0, 1.0], abs=1e-5)
    assert history(tr, "rollout/staleness") == [0.0, 0.0]
    assert all(torch.isfinite(torch.tensor(history(tr, "loss"))))
    assert backend.version == 1


def test_sync_every_shows_as_staleness(tmp_path, opd_tokenizer):
    backend = FP8Rollout(FP8Rollout.Params(block=BLOCK, sync_every=2))
    tr = OPDTrainer(model=build_tiny_model(opd_tokenizer, seed=0), args=config(tmp_path, max_steps=3),
                    components=Components.build(rollout=backend, correction="tis"), reward_funcs=[even_token_reward],
                    train_dataset=prompt_dataset(), processing_class=opd_tokenizer)
    tr.train()
    assert history(tr, "rollout/staleness") == [0.0, 1.0, 0.0]  # steps 0, 1 (quantized at 0), 2 (re-quantized)
    assert len(history(tr, "fp8/requantize_s")) == 1


def test_distillation_divergence_uses_the_trainers_forward_not_the_fp8_logps(tmp_path, opd_tokenizer):
    """OPD on FP8 rollouts: the student log-probs in the divergence are the trainer's high-precision forward of the
    sampled tokens; the FP8 behaviour log-probs only feed the correction."""
    model = build_tiny_model(opd_tokenizer, seed=0)
    initial = copy.deepcopy(model).eval()
    tr = _trainer(tmp_path, opd_tokenizer, FP8Rollout(FP8Rollout.Params(block=BLOCK)), correction="none",
                  model=model, teacher=("self_context", {}), divergence="reverse_kl", pg_weight=0.0, div_weight=1.0)
    seen = []
    per_token = tr.components.divergence.per_token

    def recording_per_token(student, teacher):
        seen[-1]["student"] = student.token_logps.detach().clone()
        return per_token(student, teacher)

    def recording_loss(model_, inputs):
        seen.append({"inputs": {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                                for k, v in inputs.items()}, "step": tr.state.global_step})
        return OPDTrainer.divergence_loss(tr, model_, inputs)

    tr.components.divergence.per_token = recording_per_token
    tr.divergence_loss = recording_loss
    tr.train()
    assert history(tr, "opd/divergence") and history(tr, "correction/mismatch_kl")[0] > 1e-6
    first = seen[0]
    assert first["step"] == 0  # before any optimizer step: the policy is still `initial`
    x = first["inputs"]
    ids = torch.cat([x["prompt_ids"], x["completion_ids"]], 1)
    attention = torch.cat([x["prompt_mask"], x["completion_mask"]], 1)
    mask = x["completion_mask"].bool()
    with torch.no_grad():
        logits = initial(input_ids=ids, attention_mask=attention).logits[:, x["prompt_ids"].shape[1] - 1:-1].float()
    trainer_side = torch.log_softmax(logits / tr.temperature, -1).gather(-1, x["completion_ids"][..., None])[..., 0]
    student = first["student"]
    torch.testing.assert_close(student[mask], trainer_side[mask], rtol=0, atol=1e-4)
    behaviour = x["sampling_per_token_logps"]
    assert (student[mask] - behaviour[mask]).abs().max() > 1e-3  # the FP8 log-probs are not what was used


def test_unified_with_a_live_self_context_teacher_scores_with_the_quantized_student(tmp_path, opd_tokenizer):
    """Accepted on purpose (docs/fp8.md): under one precision flow the teacher is the policy under privileged
    context, in the policy's precision."""
    from opd_plugins.recipe.loader import validate_recipe

    raw = {"model": {"name_or_path": "smollm2-135m-instruct"}, "data": {"task": {"name": "arithmetic"}},
           "rollout": {"name": "fp8", "params": {"flow": "unified"}}, "teacher": {"name": "self_context"},
           "divergence": {"name": "reverse_kl"}, "objective": {"policy_gradient": 0.0, "divergence": 1.0},
           "trainer": {"args": {"per_device_train_batch_size": 4, "num_generations": 4}}, "output_dir": "runs/x"}
    validate_recipe(raw, "fp8-unified.yaml", device_check=False)
    model = build_tiny_model(opd_tokenizer, seed=0)
    tr = _trainer(tmp_path, opd_tokenizer, FP8Rollout(FP8Rollout.Params(flow="unified", block=BLOCK)),
                  correction="tis", model=model, teacher=("self_context", {"template": "{prompt}"}),
                  divergence="reverse_kl", pg_weight=0.0, div_weight=1.0)
    tr.train()
    # teacher == student context and weights: the divergence is ~0 although every linear layer is FP8
    assert all(abs(d) < 1e-4 for d in history(tr, "opd/divergence"))
    assert all(k < 1e-9 for k in history(tr, "correction/mismatch_kl"))


@pytest.mark.parametrize("flow", ["rollout_only", "unified"])
def test_lora_with_gradient_checkpointing(tmp_path, opd_tokenizer, flow):
    """TRL wraps the model in PEFT and turns on gradient checkpointing: rollout_only quantizes the merged weights at
    every sync, unified the frozen base (its rollouts run in eval mode, with the KV cache)."""
    from peft import LoraConfig

    backend = FP8Rollout(FP8Rollout.Params(flow=flow, block=BLOCK))
    tr = OPDTrainer(model=build_tiny_model(opd_tokenizer, seed=0),
                    args=config(tmp_path, max_steps=2, gradient_checkpointing=True),
                    components=Components.build(rollout=backend, correction="tis"), reward_funcs=[even_token_reward],
                    train_dataset=prompt_dataset(), processing_class=opd_tokenizer,
                    peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    tr.train()
    kl = history(tr, "correction/mismatch_kl")
    assert len(kl) == 2 and (all(k > 1e-7 for k in kl) if flow == "rollout_only" else all(k < 1e-9 for k in kl))
