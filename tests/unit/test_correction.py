"""Mismatch correction (opd_plugins.correction) and the ``perturbed_hf`` rollout backend that exercises it."""

import math
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from opd_plugins.correction import (
    MODES,
    PRESETS,
    CorrectionSpec,
    combine_stats,
    importance_weights,
    weight_advantages,
)
from opd_plugins.errors import OPDError
from opd_plugins.rollout.perturbed import PerturbedHFGenerate
from opd_plugins.testing import RolloutContract, build_tiny_model

# Crafted batch: behaviour log-probs 0, so the token ratios are exp(train_logps) exactly as written.
RATIOS = [[2.0, 0.5, 4.0], [1.0, 3.0, 0.25]]
MASK = [[1, 1, 1], [1, 1, 0]]  # the 0.25 is padding: ignored everywhere
# Sequence ratios (products over valid tokens): 2·0.5·4 = 4 and 1·3 = 3.


def crafted():
    train = torch.log(torch.tensor(RATIOS))
    return train, torch.zeros_like(train), torch.tensor(MASK, dtype=torch.float32)


def weights(mode, **kw):
    train, behaviour, mask = crafted()
    return importance_weights(train, behaviour, mask, CorrectionSpec(mode=mode, **kw))


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Behaviour == policy
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [*PRESETS.values(), *(CorrectionSpec(mode=m, clip_min=0.5) for m in MODES)])
def test_on_policy_ratios_are_one(spec):
    g = torch.Generator().manual_seed(0)
    logps = torch.log_softmax(torch.randn(4, 7, 11, generator=g), -1)[..., 0]
    mask = (torch.rand(4, 7, generator=g) > 0.3).float()
    mask[2] = 0  # a sequence with no valid token
    res = importance_weights(logps, logps.clone(), mask, spec)
    close(res.weights, mask.tolist())
    s = res.stats
    assert s["mismatch_kl"] == 0 and s["mismatch_kl_k1"] == 0 and s["logp_diff_abs_max"] == 0
    assert s["masked_frac"] == 0 and s["truncated_frac"] == 0 and s["nan_frac"] == 0
    assert s["weight_mean"] == pytest.approx(1) and s["ess"] == pytest.approx(1)
    assert all(s[f"{p}_{q}"] == pytest.approx(1) for p in ("ratio", "seq_ratio") for q in ("min", "p50", "p90", "max"))


# ---------------------------------------------------------------------------------------------------------------
# Exact truncation and masking, every mode (hand-computed from RATIOS / MASK above)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "kw", "expected", "masked", "truncated"), [
    ("none", {}, [[1, 1, 1], [1, 1, 0]], 0, 0),
    ("token_tis", {"clip_max": 2.0}, [[2, 0.5, 2], [1, 2, 0]], 0, 2 / 5),
    ("token_tis", {"clip_max": 2.0, "clip_min": 0.6}, [[2, 0.6, 2], [1, 2, 0]], 0, 3 / 5),
    ("token_mis", {"clip_max": 2.0}, [[2, 0.5, 0], [1, 0, 0]], 2 / 5, 0),  # bounds are inclusive
    ("token_mis", {"clip_max": 2.0, "clip_min": 0.6}, [[2, 0, 0], [1, 0, 0]], 3 / 5, 0),
    ("sequence_tis", {"clip_max": 3.5}, [[3.5, 3.5, 3.5], [3, 3, 0]], 0, 3 / 5),
    ("sequence_tis", {"clip_max": 5.0}, [[4, 4, 4], [3, 3, 0]], 0, 0),
    ("sequence_mis", {"clip_max": 3.5}, [[0, 0, 0], [3, 3, 0]], 3 / 5, 0),
    ("icepop", {"clip_max": 3.0, "clip_min": 0.5}, [[2, 0.5, 0], [1, 3, 0]], 1 / 5, 0),  # weight = ratio inside
    ("icepop", {"clip_max": 2.5, "clip_min": 0.75}, [[2, 0, 0], [1, 0, 0]], 3 / 5, 0),
])
def test_crafted_weights(mode, kw, expected, masked, truncated):
    res = weights(mode, **kw)
    close(res.weights, expected)
    assert res.stats["masked_frac"] == pytest.approx(masked)
    assert res.stats["truncated_frac"] == pytest.approx(truncated)
    w = [x for row, m in zip(expected, MASK) for x, k in zip(row, m) if k]
    assert res.stats["weight_mean"] == pytest.approx(sum(w) / 5, rel=1e-5)
    assert res.stats["ess"] == pytest.approx(sum(w) ** 2 / (5 * sum(x * x for x in w)), rel=1e-5)


@pytest.mark.parametrize(("mode", "expected"), [("sequence_mis", [[0, 0], [1.5, 1.5]]),
                                              ("sequence_tis", [[0.3, 0.3], [1.5, 1.5]])])
def test_sequence_lower_bound(mode, expected):
    train = torch.log(torch.tensor([[0.5, 0.5], [1.5, 1.0]]))  # sequence ratios 0.25 and 1.5
    res = importance_weights(train, torch.zeros(2, 2), torch.ones(2, 2), CorrectionSpec(mode=mode, clip_min=0.3))
    close(res.weights, expected)


def test_crafted_stats():
    s = weights("token_tis").stats
    r = [2.0, 0.5, 4.0, 1.0, 3.0]  # valid token ratios
    assert s["mismatch_kl"] == pytest.approx(sum(x - 1 - math.log(x) for x in r) / 5, rel=1e-5)  # k3
    assert s["mismatch_kl_k1"] == pytest.approx(sum(-math.log(x) for x in r) / 5, rel=1e-5)
    assert s["logp_diff_abs_mean"] == pytest.approx(sum(abs(math.log(x)) for x in r) / 5, rel=1e-5)
    assert s["logp_diff_abs_max"] == pytest.approx(math.log(4), rel=1e-5)
    # sorted 0.5 1 2 3 4: p90 interpolates at 3.6 → 3.6; sequences: 3 and 4
    expected = {"ratio_min": 0.5, "ratio_p50": 2.0, "ratio_p90": 3.6, "ratio_max": 4.0,
                "seq_ratio_min": 3.0, "seq_ratio_p50": 3.5, "seq_ratio_p90": 3.9, "seq_ratio_max": 4.0}
    for k, v in expected.items():
        assert s[k] == pytest.approx(v, rel=1e-5), k


@pytest.mark.parametrize("mode", MODES)
def test_masked_positions_are_ignored(mode):
    spec = CorrectionSpec(mode=mode, clip_min=0.5, clip_max=3.5)
    train, behaviour, mask = crafted()
    base = importance_weights(train, behaviour, mask, spec)
    for junk in (float("nan"), float("inf"), -1e9, 30.0):
        t2, b2 = train.clone(), behaviour.clone()
        t2[1, 2], b2[1, 2] = junk, -junk
        other = importance_weights(t2, b2, mask, spec)
        torch.testing.assert_close(other.weights, base.weights)
        assert other.stats == base.stats
    assert base.weights[1, 2] == 0


def test_nan_behaviour_logps_count_as_ratio_one():
    train, behaviour, mask = crafted()
    behaviour[0, 0] = float("nan")
    res = importance_weights(train, behaviour, mask, CorrectionSpec(mode="token_tis", clip_max=10))
    close(res.weights, [[1, 0.5, 4], [1, 3, 0]])
    assert res.stats["nan_frac"] == pytest.approx(1 / 5)
    assert res.stats["seq_ratio_max"] == pytest.approx(3.0, rel=1e-5)  # 1·0.5·4 = 2 and 3


def test_extreme_ratios_stay_finite_and_weights_are_detached():
    train = torch.tensor([[60.0, -60.0, 0.0]], requires_grad=True)
    spec = CorrectionSpec(mode="token_tis", clip_max=1e12)
    res = importance_weights(train, torch.zeros(1, 3), torch.ones(1, 3), spec)
    assert torch.isfinite(res.weights).all() and not res.weights.requires_grad
    assert res.weights[0, 0] == pytest.approx(math.exp(20), rel=1e-5) and res.weights[0, 1] > 0
    assert all(math.isfinite(v) for v in res.stats.values())


def test_empty_mask_and_shape_errors():
    res = importance_weights(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3), PRESETS["tis"])
    assert res.weights.abs().sum() == 0 and res.stats["mismatch_kl"] == 0 and res.stats["ratio_max"] == 1
    with pytest.raises(ValueError, match="same"):
        importance_weights(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_weights_follow_input_dtype():
    train, behaviour, mask = crafted()
    assert importance_weights(train.double(), behaviour.double(), mask, PRESETS["tis"]).weights.dtype == torch.float64
    low = importance_weights(train.bfloat16(), behaviour.bfloat16(), mask, PRESETS["tis"])
    assert low.weights.dtype == torch.bfloat16


def test_folding_weights_into_advantages_equals_weighting_the_ppo_loss():
    g = torch.Generator().manual_seed(1)
    r = torch.exp(0.3 * torch.randn(4, 6, generator=g))  # PPO ratio π_θ/π_old
    adv = torch.randn(4, generator=g)
    train = 0.5 * torch.randn(4, 6, generator=g)
    w = importance_weights(train, torch.zeros(4, 6), torch.ones(4, 6), PRESETS["icepop"]).weights

    def ppo(a):
        a = a.unsqueeze(1) if a.dim() == 1 else a
        return -torch.min(r * a, r.clamp(0.8, 1.28) * a)

    torch.testing.assert_close(ppo(weight_advantages(adv, w)), ppo(adv) * w)
    assert weight_advantages(adv, w).shape == (4, 6)


def test_combine_stats():
    a = {"ratio_min": 0.5, "ratio_max": 2.0, "mismatch_kl": 0.1}
    b = {"ratio_min": 0.8, "ratio_max": 3.0, "mismatch_kl": 0.3}
    assert combine_stats([a, b]) == {"ratio_min": 0.5, "ratio_max": 3.0, "mismatch_kl": pytest.approx(0.2)}
    assert combine_stats([]) == {}


# ---------------------------------------------------------------------------------------------------------------
# Spec, presets and validation
# ---------------------------------------------------------------------------------------------------------------


def test_presets_have_paper_defaults():
    assert PRESETS["tis"] == CorrectionSpec(mode="token_tis", clip_max=2.0)
    assert PRESETS["mis"] == CorrectionSpec(mode="sequence_mis", clip_max=2.0)
    assert PRESETS["icepop"] == CorrectionSpec(mode="icepop", clip_min=0.5, clip_max=5.0)
    assert PRESETS["none"].mode == "none"
    assert PRESETS["mis"].level == "sequence" and PRESETS["mis"].masks and not PRESETS["tis"].masks


@pytest.mark.parametrize(("value", "expected"), [
    ("tis", PRESETS["tis"]),
    ("icepop", PRESETS["icepop"]),  # a preset name wins over the mode of the same name
    ("token_mis", CorrectionSpec(mode="token_mis")),
    ({"preset": "icepop", "clip_max": 4.0}, CorrectionSpec(mode="icepop", clip_min=0.5, clip_max=4.0)),
    ({"mode": "sequence_tis", "clip_max": 5.0}, CorrectionSpec(mode="sequence_tis", clip_max=5.0)),
    ({}, CorrectionSpec(mode="none")),
    (None, CorrectionSpec(mode="none")),
])
def test_recipe_forms(value, expected):
    assert CorrectionSpec.model_validate(value) == expected


def test_preset_with_overrides():
    assert CorrectionSpec.preset("tis", clip_max=3.0) == CorrectionSpec(mode="token_tis", clip_max=3.0)


@pytest.mark.parametrize(("value", "message"), [
    ({"mode": "token_mis", "clip_min": 3.0, "clip_max": 2.0}, "above 1"),
    ({"mode": "token_mis", "clip_min": 1.0, "clip_max": 1.0}, "clip_min .* must be below clip_max"),
    ({"preset": "icepop", "clip_max": 0.5}, "below 1"),
    ({"mode": "token_tis", "clip_max": -1.0}, "greater than 0"),
    ({"mode": "token_tis", "clip_min": -0.5}, "greater than or equal to 0"),
    ({"mode": "token_tis", "clip_max": 0.5}, "below 1"),
    ({"mode": "token_mis", "clip_min": 1.5, "clip_max": 3.0}, "above 1"),
    ({"mode": "icepop", "clip_max": 5.0}, "needs clip_min"),
    ({"mode": "token_tiss"}, "Input should be"),
    ({"mode": "token_tis", "clip": 2.0}, "Extra inputs are not permitted"),
    ("tiss", "Did you mean 'tis'"),
    ({"preset": "icepoop"}, "Did you mean 'icepop'"),
])
def test_spec_validation_errors(value, message):
    with pytest.raises(ValidationError, match=message):
        CorrectionSpec.model_validate(value)


def test_spec_is_frozen():
    with pytest.raises(ValidationError):
        PRESETS["tis"].clip_max = 3.0


# ---------------------------------------------------------------------------------------------------------------
# The perturbed_hf rollout backend
# ---------------------------------------------------------------------------------------------------------------


class TestPerturbedContract(RolloutContract):
    component = PerturbedHFGenerate
    require_registered = False  # registered by opd_plugins.rollout once integrated


def fake_trainer(model, tokenizer, *, max_len=5, eos=None, temperature=1.0, **fields):
    """A rollout backend's setup context without a trainer."""
    from opd_plugins.testing import fake_context

    return fake_context(model, tokenizer, temperature, max_completion_length=max_len,
                        eos_token_ids=eos or [tokenizer.eos_token_id], **fields)


def generate(backend, prompts, num_generations, step=0, multimodal_fields=None):
    from opd_plugins.context import Sampling

    out = backend.generate(prompts, Sampling(num_generations=num_generations, step=step,
                                             multimodal_fields=multimodal_fields))
    return out.completion_ids, out.behaviour_logps


def prompt_ids(tokenizer, questions=("What is 3 + 4?", "Which number is larger: 31 or 57?")):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in questions]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def sampled_logps(model, prompt, completion, temperature=1.0):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@pytest.fixture
def policy(opd_tokenizer):
    return build_tiny_model(opd_tokenizer, seed=0)


@pytest.mark.parametrize(("noise", "shift"), [(0.0, 0.0), (0.02, 0.0), (0.0, 0.5)])
def test_backend_returns_behaviour_logps(opd_tokenizer, policy, noise, shift):
    tr = fake_trainer(policy, opd_tokenizer)
    backend = PerturbedHFGenerate(PerturbedHFGenerate.Params(noise_std=noise, temperature_shift=shift))
    backend.setup(tr)
    prompts = prompt_ids(opd_tokenizer) * 2
    torch.manual_seed(0)
    completions, logprobs = generate(backend, prompts, 2)
    assert len(completions) == len(logprobs) == 4
    gaps = []
    for p, c, lp in zip(prompts, completions, logprobs):
        assert len(c) == len(lp) == 5
        behaviour = sampled_logps(backend.behaviour_model, p, c, temperature=1.0 + shift)
        torch.testing.assert_close(torch.tensor(lp), behaviour, rtol=0, atol=1e-5)
        gaps.append((sampled_logps(policy, p, c) - behaviour).abs().max().item())
    if noise == 0 and shift == 0:
        assert max(gaps) < 1e-5  # an unperturbed copy samples from the policy itself
    else:
        assert max(gaps) > 1e-2


def test_backend_samples_from_the_copy_even_when_trl_patched_the_policy_forward(opd_tokenizer, policy):
    """TRL's fused LM head patches ``model.forward`` with a closure over the original model; a deep copy would keep
    calling the policy (ignoring the noise) unless the backend restores the class forward."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(policy, outputs=("log_probs", "entropy"))
    policy.gradient_checkpointing_enable()
    policy.train()  # as during training: checkpointing on, which drops the KV cache in the policy's own forward
    tr = fake_trainer(policy, opd_tokenizer)
    backend = PerturbedHFGenerate(PerturbedHFGenerate.Params(noise_std=0.02))
    backend.setup(tr)
    assert "forward" not in vars(backend.behaviour_model)
    prompts = prompt_ids(opd_tokenizer)
    torch.manual_seed(0)
    completions, logprobs = generate(backend, prompts, 1)
    policy.eval()
    for p, c, lp in zip(prompts, completions, logprobs):
        torch.testing.assert_close(torch.tensor(lp), sampled_logps(backend.behaviour_model, p, c), rtol=0, atol=1e-5)
        assert (sampled_logps(policy, p, c) - torch.tensor(lp)).abs().max() > 1e-2


def test_backend_stops_at_first_eos(opd_tokenizer, policy):
    eos = list(range(0, len(opd_tokenizer), 2))  # every even id ends a completion
    tr = fake_trainer(policy, opd_tokenizer, max_len=8, eos=eos)
    backend = PerturbedHFGenerate()
    backend.setup(tr)
    torch.manual_seed(0)
    completions, logprobs = generate(backend, prompt_ids(opd_tokenizer) * 4, 4)
    for c, lp in zip(completions, logprobs):
        assert len(c) == len(lp) and 1 <= len(c) <= 8
        assert all(t % 2 == 1 for t in c[:-1]) and (c[-1] % 2 == 0 or len(c) == 8)
    assert any(len(c) < 8 for c in completions)


def test_backend_resyncs_with_fresh_noise_when_the_step_changes(opd_tokenizer, policy):
    tr = fake_trainer(policy, opd_tokenizer, max_len=2)
    backend = PerturbedHFGenerate(PerturbedHFGenerate.Params(noise_std=0.01, seed=3))
    backend.setup(tr)
    p0 = policy.model.norm.weight
    b0 = backend.behaviour_model.model.norm.weight.clone()
    assert 0.004 < (b0 - p0).std().item() < 0.02
    generate(backend, prompt_ids(opd_tokenizer), 1)
    torch.testing.assert_close(backend.behaviour_model.model.norm.weight, b0)  # same step: no resync
    with torch.no_grad():
        p0.add_(1.0)  # an optimizer step
    backend.sync_weights(policy, 1)  # what the trainer does when the policy has changed
    generate(backend, prompt_ids(opd_tokenizer), 1, step=1)
    b1 = backend.behaviour_model.model.norm.weight
    assert (b1 - p0).abs().max() < 0.1 and not torch.allclose(b1 - p0, b0 - (p0 - 1.0))
    again = PerturbedHFGenerate(PerturbedHFGenerate.Params(noise_std=0.01, seed=3))
    again.setup(fake_trainer(policy, opd_tokenizer, max_len=2, progress=lambda: (1, 0)))
    # same seed and step: the same noise (reproducible, identical on every rank)
    torch.testing.assert_close(again.behaviour_model.model.norm.weight, b1)
    assert not policy.model.norm.weight.grad_fn and backend.behaviour_model is not policy


def test_backend_rejects_images_and_bad_temperature(opd_tokenizer, policy):
    tr = fake_trainer(policy, opd_tokenizer)
    backend = PerturbedHFGenerate(PerturbedHFGenerate.Params(temperature_shift=-1.0))
    backend.setup(tr)
    with pytest.raises(OPDError, match="text-only"):
        generate(backend, prompt_ids(opd_tokenizer), 1, multimodal_fields={"pixel_values": torch.zeros(1)})
    with pytest.raises(OPDError, match="not positive"):
        generate(backend, prompt_ids(opd_tokenizer), 1)
