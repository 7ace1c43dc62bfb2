"""Mismatch correction end to end: it removes gradient bias from an off-policy behaviour policy, and it reaches
the loss of a real (tiny) training run.

The bias tests use a two-token horizon, so the on-policy REINFORCE gradient can be computed *exactly* by
enumerating every completion (V² of them per prompt): g_on = ∇ Σ_y π(y)·R(y) = E_π[R ∇log π(y)]. The behaviour
policy μ is the ``perturbed_hf`` backend's noisy copy of π. Off-policy estimators weight each token of a
completion y ~ μ by w_t (the correction) and follow E_μ[R(y) Σ_t w_t ∇log π(y_t | y_<t)]:

* ``test_..._exact``: that expectation computed exactly, by enumeration under μ (no sampling noise at all);
* ``test_..._sampled``: estimated from completions the backend actually sampled, with its reported
  behaviour log-probs, as the trainer would see them.

Numbers at the settings below (‖g − g_on‖ / ‖g_on‖; printed by ``pytest -s``):
mild (KL(μ‖π) 0.024/token): naive 0.171, token TIS 0.009, sequence TIS 0.000, IcePop 0.010, Seq-MIS 0.051;
strong (sharp π, KL 0.60/token): naive 3.59, token TIS 0.59, sequence TIS 0.21, IcePop 0.98, Seq-MIS 0.47;
strong, sampled (1,024 completions per prompt): naive 3.37, token TIS 0.54, sequence TIS 0.35, IcePop 1.03.
Untruncated sequence IS is exactly unbiased (0.000 in both), which checks the enumeration and the backend's
behaviour log-probs.
"""

from types import SimpleNamespace

import pytest
import torch

from opd_plugins.context import Sampling
from helpers.tiny import even_token_reward, history, prompt_dataset

from opd_plugins.correction import PRESETS, CorrectionSpec, importance_weights
from opd_plugins.rollout.perturbed import PerturbedHFGenerate
from opd_plugins.testing import build_tiny_model
from opd_plugins.trainers import Components, OPDTrainer

QUESTIONS = ("What is 3 + 4?", "Which number is larger: 31 or 57?")
ESTIMATORS = {
    "naive": PRESETS["none"],  # weights 1: the uncorrected off-policy gradient
    "token_tis": PRESETS["tis"],
    "sequence_tis": CorrectionSpec(mode="sequence_tis", clip_max=5.0),
    "sequence_is": CorrectionSpec(mode="sequence_tis", clip_max=1e8),  # untruncated: unbiased
    "icepop": PRESETS["icepop"],
    "mis": PRESETS["mis"],
}
SETTINGS = {"mild": (1.0, 0.02), "strong": (5.0, 0.02)}  # (sharpness of π, noise_std of μ's weights)


def _fake_trainer(model, tokenizer):
    """The rollout backend's setup context, without a trainer."""
    from opd_plugins.testing import fake_context

    return fake_context(model, tokenizer, max_completion_length=2, eos_token_ids=[tokenizer.eos_token_id])


def _reward(tokens, mask):
    """Fraction of even token ids in the completion, centred: a reward the tiny model's gradient can see."""
    return ((tokens % 2 == 0).float() * mask).sum(-1) / mask.sum(-1) - 0.5


def _flat_grad(objective, params):
    grads = torch.autograd.grad(objective, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def _two_token_logps(model, prompt, vocab):
    """log π(y1 | x) (V,) and log π(y2 | x, y1) (V, V) for every first token y1."""
    ids = torch.tensor([prompt + [v] for v in range(vocab)])
    logits = model(ids).logits.float()
    return torch.log_softmax(logits[0, len(prompt) - 1], -1), torch.log_softmax(logits[:, len(prompt)], -1)


@pytest.fixture(scope="module", params=list(SETTINGS))
def setup(request, opd_tokenizer):
    sharpness, noise = SETTINGS[request.param]
    tok = opd_tokenizer
    policy = build_tiny_model(tok, seed=0)
    with torch.no_grad():
        policy.model.norm.weight.mul_(sharpness)
    trainer = _fake_trainer(policy, tok)
    backend = PerturbedHFGenerate(PerturbedHFGenerate.Params(noise_std=noise, seed=0))
    backend.setup(trainer)
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    params = list(policy.parameters())
    V = len(tok)
    y1, y2 = torch.arange(V).repeat_interleave(V), torch.arange(V).repeat(V)
    # Completion y1 = EOS has one token: its second position is masked. Weighting every (y1, y2) pair by
    # p(y1)·p(y2|y1) still sums to p(y1) for it, so the enumeration stays exact.
    mask = torch.stack([torch.ones(V * V), (y1 != tok.eos_token_id).float()], 1)
    reward = _reward(torch.stack([y1, y2], 1), mask)
    on_policy, estimators, kl = 0.0, dict.fromkeys(ESTIMATORS, 0.0), torch.zeros(2)
    for prompt in prompts:
        l1, l2 = _two_token_logps(policy, prompt, V)
        with torch.no_grad():
            b1, b2 = _two_token_logps(backend.behaviour_model, prompt, V)
        train = torch.stack([l1[y1], l2[y1, y2]], 1)
        behaviour = torch.stack([b1[y1], b2[y1, y2]], 1)
        on_policy = on_policy + (torch.exp(train.sum(1)) * reward).sum()  # Σ_y π(y1)·π(y2|y1)·R(y)
        q = torch.exp(behaviour.sum(1))  # μ(y1)·μ(y2|y1), detached
        kl += torch.stack([(q * ((behaviour - train.detach()) * mask).sum(1)).sum(), (q * mask.sum(1)).sum()])
        for name, spec in ESTIMATORS.items():
            w = importance_weights(train, behaviour, mask, spec).weights
            estimators[name] = estimators[name] + (q * reward * (w * train * mask).sum(1)).sum()
    g_on = _flat_grad(on_policy, params)
    exact = {name: _flat_grad(obj, params) for name, obj in estimators.items()}
    return SimpleNamespace(name=request.param, kl=float(kl[0] / kl[1]), policy=policy, backend=backend,
                           trainer=trainer, prompts=prompts, params=params, g_on=g_on, exact=exact)


def _rel_bias(g, g_on):
    return float((g - g_on).norm() / g_on.norm())


def test_correction_reduces_gradient_bias_exact(setup):
    bias = {name: _rel_bias(g, setup.g_on) for name, g in setup.exact.items()}
    print(f"\n[{setup.name}] KL(μ‖π) per token {setup.kl:.3f}; exact relative bias:",
          {k: round(v, 4) for k, v in bias.items()})
    assert bias["sequence_is"] < 2e-3  # the enumeration and the behaviour log-probs are right
    assert bias["naive"] > 0.15  # the perturbation really biases the gradient
    for name in ("token_tis", "sequence_tis", "icepop", "mis"):
        assert bias[name] < 0.8 * bias["naive"], (name, bias)
    assert bias["token_tis"] < 0.5 * bias["naive"]


@pytest.mark.parametrize("setup", ["strong"], indirect=True)  # at a test-sized sample count, sampling noise
def test_correction_reduces_gradient_bias_sampled(setup):      # would hide the mild setting's bias
    n = 1024  # samples per prompt
    torch.manual_seed(0)
    objectives = dict.fromkeys(("naive", "token_tis", "sequence_tis", "icepop"), 0.0)
    for prompt in setup.prompts:
        out = setup.backend.generate([prompt] * n, Sampling(num_generations=n))
        completions, logprobs = out.completion_ids, out.behaviour_logps
        ids = torch.zeros(n, 2, dtype=torch.long)
        mask, behaviour = torch.zeros(n, 2), torch.zeros(n, 2)
        for i, (c, lp) in enumerate(zip(completions, logprobs)):
            ids[i, :len(c)], mask[i, :len(c)], behaviour[i, :len(lp)] = torch.tensor(c), 1.0, torch.tensor(lp)
        full = torch.cat([torch.tensor([prompt] * n), ids], 1)
        logits = setup.policy(full).logits[:, len(prompt) - 1:-1].float()
        train = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
        reward = _reward(ids, mask)
        for name in objectives:
            w = importance_weights(train, behaviour, mask, ESTIMATORS[name]).weights
            objectives[name] = objectives[name] + (reward[:, None] * w * train * mask).sum() / n
    err = {name: _rel_bias(_flat_grad(obj, setup.params), setup.g_on) for name, obj in objectives.items()}
    print(f"\n[{setup.name}] sampled relative error (n={n}/prompt):", {k: round(v, 4) for k, v in err.items()})
    for name in ("token_tis", "sequence_tis", "icepop"):
        assert err[name] < 0.8 * err["naive"], (name, err)


# ---------------------------------------------------------------------------------------------------------------
# A real (tiny) training run with the perturbed backend
# ---------------------------------------------------------------------------------------------------------------


def _run(tmp_path, tokenizer, backend, correction, steps=2):
    from helpers.tiny import config

    common = dict(model=build_tiny_model(tokenizer, seed=0), args=config(tmp_path, max_steps=steps),
                  reward_funcs=[even_token_reward], train_dataset=prompt_dataset(), processing_class=tokenizer)
    tr = OPDTrainer(components=Components(rollout=backend, correction=correction), **common)
    tr.train()
    return tr


def test_unperturbed_backend_has_no_mismatch(tmp_path, opd_tokenizer):
    tr = _run(tmp_path, opd_tokenizer, PerturbedHFGenerate(), "tis", steps=1)
    assert history(tr, "correction/mismatch_kl")[0] < 1e-6
    assert history(tr, "correction/logp_diff_abs_max")[0] < 1e-4
    assert history(tr, "correction/weight_mean")[0] == pytest.approx(1.0, abs=1e-4)
    assert history(tr, "correction/truncated_frac")[0] == 0


def test_perturbed_run_logs_mismatch_and_trains(tmp_path, opd_tokenizer):
    backend = PerturbedHFGenerate(PerturbedHFGenerate.Params(noise_std=0.05))
    tr = _run(tmp_path, opd_tokenizer, backend, "icepop")
    kl = history(tr, "correction/mismatch_kl")
    assert len(kl) == 2 and all(k > 0.01 for k in kl)
    assert history(tr, "correction/ratio_max")[0] > history(tr, "correction/ratio_min")[0]
    assert all(torch.isfinite(torch.tensor(history(tr, "loss"))))
    assert backend.version == 1  # re-synced (with fresh noise) after the first optimizer step


def test_correction_weights_reach_the_loss(tmp_path, opd_tokenizer):
    """A band that masks every sequence of a noisy backend zeroes the policy gradient."""
    backend = PerturbedHFGenerate(PerturbedHFGenerate.Params(noise_std=0.05))
    tr = _run(tmp_path, opd_tokenizer, backend, {"mode": "sequence_mis", "clip_min": 0.999, "clip_max": 1.001},
              steps=1)
    assert history(tr, "correction/masked_frac")[0] == 1.0
    assert history(tr, "grad_norm")[0] == 0.0


@pytest.mark.parametrize("divergence, correction, expect", [
    (("reverse_kl", {"estimator": "full"}), {"preset": "tis"}, None),  # auto: per-state terms are not weighted
    (("reverse_kl", {"estimator": "full"}), {"preset": "tis", "divergence": "prefix"}, "prefix"),
    (("reverse_kl", {}), {"preset": "tis"}, "policy_gradient"),  # sampled-token: the PG's token weights
])
def test_the_divergence_gets_its_own_correction_weights(tmp_path, opd_tokenizer, divergence, correction, expect):
    from opd_plugins.correction import divergence_weights

    from helpers.tiny import config

    comps = Components.build(teacher="self_context", divergence=divergence, div_weight=1.0, correction=correction,
                             rollout=("perturbed_hf", {"noise_std": 0.05}))
    tr = OPDTrainer(model=build_tiny_model(opd_tokenizer, seed=0), args=config(tmp_path, max_steps=1),
                    components=comps, reward_funcs=[even_token_reward], train_dataset=prompt_dataset(),
                    processing_class=opd_tokenizer)
    seen = []
    original = tr.divergence_loss

    def spy(model, inputs):
        seen.append({k: inputs.get(k) for k in ("divergence_correction_weights", "correction_weights",
                                                "sampling_per_token_logps", "completion_mask")})
        return original(model, inputs)

    tr.divergence_loss = spy
    tr.train()
    assert seen
    for batch in seen:
        got, pg = batch["divergence_correction_weights"], batch["correction_weights"]
        assert pg is not None
        if expect is None:
            assert got is None
        elif expect == "policy_gradient":
            assert torch.equal(got, pg)
        else:
            assert not torch.equal(got, pg)
            assert torch.all(got[:, 0][batch["completion_mask"][:, 0].bool()] == 1.0)  # W_<1 = 1: nothing before it
