"""``fused_lm_head`` in real tiny training runs: the same losses and gradients as the logits path, and the clear
refusals (soft-capping, rescaled logits, a non-linear head, LoRA on lm_head)."""

import math

import pytest
import torch
from helpers.tiny import even_token_reward, history, trainer
from transformers import TrainerCallback

from opd_plugins.errors import OPDError
from opd_plugins.testing import build_tiny_model, save_tiny_model
from opd_plugins.trainers import Components
from opd_plugins.trainers.student import final_hidden_states as _final_hidden_states


class _Grads(TrainerCallback):
    """The trainable parameters' gradients before each optimizer step (after clipping, the same in both runs)."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.requires_grad and p.grad is not None})


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, opd_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("teacher"), seed=7, hidden=96, tokenizer=opd_tokenizer)


def _student(tokenizer, lora=False):
    model = build_tiny_model(tokenizer, seed=0, arch="llama")  # tied embeddings: lm_head.weight is embed_tokens'
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))  # all-linear skips lm_head
    return model


def _build(out, tokenizer, teacher_dir, divergence, params, *, fused, lora=False, **slots):
    weights = {"pg_weight": 0.0, "div_weight": 1.0, **slots}
    comps = Components.build(teacher=("hf_model", {"model": str(teacher_dir)}),
                             divergence=(divergence, {**params, "fused_lm_head": fused}), **weights)
    rewards = [even_token_reward] if weights["pg_weight"] or weights.get("div_reward_weight") else []
    tr = trainer(out, tokenizer, _student(tokenizer, lora), components=comps, reward_funcs=rewards, max_steps=2,
                 temperature=0.8)
    grads = _Grads()
    tr.add_callback(grads)
    return tr, grads


def _run(*args, **kwargs):
    tr, grads = _build(*args, **kwargs)
    tr.train()
    return tr, grads


CASES = {
    "jsd": ("jsd", {"beta": 0.5, "chunk_size": 5}, {}, False),
    "reverse_kl_hybrid_with_divergence_reward": (
        "reverse_kl", {"estimator": "full", "chunk_size": 7}, {"pg_weight": 1.0, "div_reward_weight": 0.5}, False),
    "skew_kl_lora": ("skew_kl", {"alpha": 0.1, "direction": "reverse"}, {}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_lm_head_matches_the_logits_path(case, tmp_path, opd_tokenizer, teacher_dir):
    divergence, params, slots, lora = CASES[case]
    runs = {fused: _run(tmp_path / str(fused), opd_tokenizer, teacher_dir, divergence, params, fused=fused,
                        lora=lora, **slots) for fused in (False, True)}
    (plain, plain_grads), (fused, fused_grads) = runs[False], runs[True]
    for key in ("loss", "opd/divergence", "grad_norm") + (("opd/divergence_reward",) if "reward" in case else ()):
        a, b = history(plain, key), history(fused, key)
        assert len(a) == len(b) == 2 and all(math.isfinite(x) for x in a), key
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), key
    assert history(fused, "grad_norm")[0] > 0
    g_plain, g_fused = plain_grads.steps[0], fused_grads.steps[0]
    assert set(g_plain) == set(g_fused) and g_plain
    if lora:
        assert all("lora_" in n for n in g_fused)
    else:
        assert any("embed_tokens" in n for n in g_fused)  # the tied lm head's gradient reaches the embedding
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], atol=1e-6, rtol=1e-4, msg=name)


def test_token_weightings_fall_back_to_sampled_statistics_with_fused_lm_head(tmp_path, opd_tokenizer, teacher_dir):
    seen = []
    tr, _ = _build(tmp_path / "run", opd_tokenizer, teacher_dir, "jsd", {}, fused=True,
                   token_weighting=[("tip", {"fraction": 0.5})])
    tip = tr.components.token_weighting[0]
    original = tip.token_statistics

    def spy(student, teacher):
        seen.append((student.logits, student.hidden))
        return original(student, teacher)

    tip.token_statistics = spy
    tr.train()
    assert all(math.isfinite(x) for x in history(tr, "loss"))
    assert seen and all(logits is None and hidden is None for logits, hidden in seen)
    assert 0 < tip.last_stats["kept_fraction"] <= 0.5 + 1e-6


def _ids(tokenizer):
    ids = torch.randint(4, len(tokenizer), (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids, mask


@pytest.mark.parametrize("tied", [True, False])
def test_hidden_states_reproduce_the_llama_logits_exactly(tied, opd_tokenizer):
    model = build_tiny_model(opd_tokenizer, seed=0, arch="llama")
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 0.01)
    ids, mask = _ids(opd_tokenizer)
    hidden, head = _final_hidden_states(model, model, ids, mask, 6)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=6).logits
    assert hidden.shape == (3, 6, 64) and head is model.lm_head
    assert torch.equal(hidden @ head.weight.T, logits)
    assert (head.weight is model.model.embed_tokens.weight) == tied


def test_fused_lm_head_refusals(opd_tokenizer):
    ids, mask = _ids(opd_tokenizer)

    model = build_tiny_model(opd_tokenizer, seed=0, arch="llama")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(OPDError, match=r"soft-caps its logits \(final_logit_softcapping=30.0\).*fused_lm_head: false"):
        _final_hidden_states(model, model, ids, mask, 4)

    model = build_tiny_model(opd_tokenizer, seed=0, arch="llama")
    model.config.logits_scaling = 8.0
    with pytest.raises(OPDError, match=r"rescales its logits \(logits_scaling=8.0\)"):
        _final_hidden_states(model, model, ids, mask, 4)

    model = build_tiny_model(opd_tokenizer, seed=0, arch="llama")
    model.lm_head.register_forward_hook(lambda module, args, out: 30.0 * torch.tanh(out / 30.0) * 2)  # unannounced
    with pytest.raises(OPDError, match="logits differ from that by up to .*post-processes them"):
        _final_hidden_states(model, model, ids, mask, 4)

    model = build_tiny_model(opd_tokenizer, seed=0, arch="llama")
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), model.lm_head)
    with pytest.raises(OPDError, match="output layer is Sequential, not a torch.nn.Linear"):
        _final_hidden_states(model, model, ids, mask, 4)

    from peft import LoraConfig, get_peft_model

    for config in (LoraConfig(r=4, target_modules=["q_proj", "lm_head"]),
                   LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])):
        model = get_peft_model(build_tiny_model(opd_tokenizer, seed=0, arch="llama"), config)
        with pytest.raises(OPDError, match="lm head carries a PEFT adapter .*leave lm_head out of the adapter"):
            _final_hidden_states(model, model, ids, mask, 4)


def test_trainer_refuses_a_trained_lm_head_copy_with_fused_lm_head(tmp_path, opd_tokenizer, teacher_dir):
    """(TRL itself refuses LoRA on lm_head at init; lm_head in modules_to_save reaches the fused path.)"""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny_model(opd_tokenizer, seed=0, arch="llama"),
                           LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    comps = Components.build(teacher=("hf_model", {"model": str(teacher_dir)}), pg_weight=0.0, div_weight=1.0,
                             divergence=("forward_kl", {"fused_lm_head": True}))
    tr = trainer(tmp_path / "run", opd_tokenizer, model, components=comps, max_steps=1)
    with pytest.raises(OPDError, match="fused_lm_head .* PEFT adapter"):
        tr.train()


def test_fused_lm_head_serves_both_terms_from_one_student_forward(tmp_path, opd_tokenizer, teacher_dir, monkeypatch):
    """With ``fused_lm_head`` and a policy-gradient term, the policy's log-probs come from the fused head (never
    TRL's ``fused_lm_head=True`` forward, whose tile is up to 32,768 positions) and the divergence reuses that
    forward's hidden states: one student forward with gradient per micro-batch of the loss."""
    import opd_plugins.trainers.opd_trainer as module

    calls = {"loss": 0, "grad_forwards": 0, "trl_kernel": 0}
    real_fused, real_loss = module.fused_outputs, module.OPDTrainer._compute_loss

    def counting_fused(*args, **kwargs):
        calls["grad_forwards"] += torch.is_grad_enabled()
        return real_fused(*args, **kwargs)

    def counting_loss(self, model, inputs):
        calls["loss"] += 1
        return real_loss(self, model, inputs)

    monkeypatch.setattr(module, "fused_outputs", counting_fused)
    monkeypatch.setattr(module.OPDTrainer, "_compute_loss", counting_loss)
    divergence, params, slots, _ = CASES["reverse_kl_hybrid_with_divergence_reward"]
    tr, _ = _build(tmp_path, opd_tokenizer, teacher_dir, divergence, params, fused=True, **slots)
    model = tr.accelerator.unwrap_model(tr.model)
    trl_forward = model.forward

    def spy(*args, fused_lm_head=False, **kwargs):
        calls["trl_kernel"] += bool(fused_lm_head)
        return trl_forward(*args, fused_lm_head=fused_lm_head, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    tr.train()
    assert calls["loss"] >= 2 and calls["grad_forwards"] == calls["loss"], calls
    assert calls["trl_kernel"] == 0, calls


def test_an_entropy_bonus_keeps_trls_policy_forward(tmp_path, opd_tokenizer, teacher_dir):
    """TRL differentiates the entropy for its entropy bonus; the fused head's entropy has no gradient, so the
    policy-gradient forward stays TRL's then."""
    divergence, params, slots, _ = CASES["reverse_kl_hybrid_with_divergence_reward"]
    comps = Components.build(teacher=("hf_model", {"model": str(teacher_dir)}),
                             divergence=(divergence, {**params, "fused_lm_head": True}), **slots)
    tr = trainer(tmp_path, opd_tokenizer, _student(opd_tokenizer), components=comps,
                 reward_funcs=[even_token_reward], max_steps=1, entropy_coef=0.01)
    assert not tr.fused_policy_head(tr.model, False, {})
    tr.args.entropy_coef, tr._entropy_bonus_enabled = 0.0, False
    assert tr.fused_policy_head(tr.model, False, {})
    assert not tr.fused_policy_head(tr.model, True, {})  # a MoE aux loss: TRL's forward
    assert not tr.fused_policy_head(tr.model, False, {"pixel_values": torch.zeros(1)})


@pytest.mark.parametrize("teacher", ["hf_model", "self_context"])
def test_the_teacher_gives_its_head_at_loss_time_with_the_same_result(teacher, tmp_path, opd_tokenizer, teacher_dir,
                                                                      monkeypatch):
    """With ``fused_lm_head`` a local teacher scored at loss time answers with its hidden states and lm head
    (never a micro-batch's (b, T, V) log-probs), and training is the same as from its log-probs on the logits
    path. ``self_context`` with initial weights and full fine-tuning swaps its weights in and out, so its head is a
    copy."""
    import opd_plugins.trainers.opd_trainer as module

    forms = []
    real = module.OPDTrainer.loss_time_teacher

    def spy(self, inputs):
        scores = real(self, inputs)
        forms.append((scores.hidden is not None, scores.logps is not None))
        return scores

    monkeypatch.setattr(module.OPDTrainer, "loss_time_teacher", spy)
    spec = ("hf_model", {"model": str(teacher_dir)}) if teacher == "hf_model" else \
        ("self_context", {"weights": "initial"})
    runs = {}
    for fused in (False, True):
        forms.clear()
        comps = Components.build(teacher=spec, divergence=("forward_kl", {"chunk_size": 5, "fused_lm_head": fused}),
                                 pg_weight=1.0, div_weight=1.0)
        tr = trainer(tmp_path / f"{teacher}-{fused}", opd_tokenizer, _student(opd_tokenizer), components=comps,
                     reward_funcs=[even_token_reward], max_steps=2, temperature=0.8)
        grads = _Grads()
        tr.add_callback(grads)
        tr.train()
        runs[fused] = (tr, grads)
        assert forms and set(forms) == ({(True, False)} if fused else {(False, True)}), forms
    (plain, plain_grads), (fused, fused_grads) = runs[False], runs[True]
    for key in ("loss", "opd/divergence", "grad_norm"):
        assert history(plain, key) == pytest.approx(history(fused, key), rel=1e-4, abs=1e-6), key
    for step, (a, b) in enumerate(zip(plain_grads.steps, fused_grads.steps, strict=True)):
        for name, g in a.items():  # float32 sums in another order: relative to the tensor's largest entry
            err = float((b[name] - g).abs().max())
            assert err <= 1e-6 + 1e-4 * float(g.abs().max()), (step, name, err)
