"""The ``fp8`` rollout backend: behaviour log-probs of the FP8 policy, the two precision flows, re-quantization at
weight syncs (``sync_every``), LoRA in both flows, and the refusals."""

import copy

import pytest
import torch

from opd_plugins.context import Sampling
from opd_plugins.errors import OPDError
from opd_plugins.rollout._fp8 import FakeQuantLinear, FP8Linear, fake_quantize
from opd_plugins.rollout.fp8 import FP8Rollout
from opd_plugins.testing import RolloutContract, build_tiny_model, fake_context

BLOCK = (32, 32)  # the tiny model's layers are 32..128 wide


class TestFP8Contract(RolloutContract):
    component = FP8Rollout


def prompts(tok, questions=("What is 3 + 4?", "Which number is larger: 31 or 57?")):
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in questions]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def context(model, tok, max_len=6, **fields):
    return fake_context(model, tok, max_completion_length=max_len, eos_token_ids=[tok.eos_token_id], **fields)


def backend(model, tok, ctx_fields=None, **params):
    b = FP8Rollout(FP8Rollout.Params(**{"block": BLOCK, **params}))
    b.setup(context(model, tok, **(ctx_fields or {})))
    return b


def generate(b, batch, step=0, seed=0):
    torch.manual_seed(seed)
    return b.generate(batch, Sampling(num_generations=1, step=step))


def token_logps(model, prompt, completion, temperature=1.0, grad=False):
    ids = torch.tensor([prompt + completion])
    with torch.set_grad_enabled(grad):
        logits = model(ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def naive_fake_quant(model, names, fmt="per_block", block=BLOCK):
    """The reference: a plain copy whose listed Linear weights are replaced by their fake-quantized values."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            lin = ref.get_submodule(name)
            lin.weight.copy_(fake_quantize(lin.weight, fmt, block))
    return ref.eval()


@pytest.fixture
def policy(opd_tokenizer):
    return build_tiny_model(opd_tokenizer, seed=0)


LINEARS_BUT_HEAD = 14  # 2 layers x (q, k, v, o, gate, up, down)


# ---------------------------------------------------------------------------------------------------------------
# rollout_only
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["per_block", "per_channel"])
def test_behaviour_logps_are_a_naive_fake_quant_forward(opd_tokenizer, policy, fmt):
    params = {"format": fmt} if fmt == "per_channel" else {}
    b = FP8Rollout(FP8Rollout.Params(**({"block": BLOCK} if fmt == "per_block" else {}), **params))
    b.setup(context(policy, opd_tokenizer))
    assert len(b.quantized) == LINEARS_BUT_HEAD and set(b.skipped) == {"lm_head"}
    assert all(isinstance(b.behaviour_model.get_submodule(n), FP8Linear) for n in b.quantized)
    batch = prompts(opd_tokenizer) * 2
    out = generate(b, batch)
    ref = naive_fake_quant(policy, b.quantized, fmt)
    gaps = []
    for p, c, lp in zip(batch, out.completion_ids, out.behaviour_logps, strict=True):
        assert 1 <= len(c) == len(lp) <= 6
        torch.testing.assert_close(torch.tensor(lp), token_logps(ref, p, c), rtol=0, atol=1e-5)
        gaps.append((token_logps(policy, p, c) - torch.tensor(lp)).abs().max().item())
    assert max(gaps) > 1e-4  # the FP8 policy is not the training policy
    assert out.policy_version == 0 and isinstance(policy.model.layers[0].mlp.up_proj, torch.nn.Linear)


def test_requantized_at_each_sync_and_only_every_sync_every_steps(opd_tokenizer, policy):
    batch = prompts(opd_tokenizer)
    for every in (1, 2):
        model = copy.deepcopy(policy)
        logs = []
        b = backend(model, opd_tokenizer, {"log": lambda k, v: logs.append(k)}, sync_every=every)
        first = generate(b, batch).behaviour_logps
        with torch.no_grad():  # an optimizer step
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        b.sync_weights(model, 1)  # the trainer, when the policy changed
        at1 = generate(b, batch, step=1)
        b.sync_weights(model, 2)
        at2 = generate(b, batch, step=2)
        assert at2.behaviour_logps != first and at2.policy_version == 2
        if every == 1:
            assert at1.behaviour_logps != first and at1.policy_version == 1
        else:  # step 1 still samples from the step-0 quantization, and says so
            assert at1.behaviour_logps == first and at1.policy_version == 0
        ref = naive_fake_quant(model, b.quantized)
        p, c, lp = batch[0], at2.completion_ids[0], at2.behaviour_logps[0]
        torch.testing.assert_close(torch.tensor(lp), token_logps(ref, p, c), rtol=0, atol=1e-5)
        assert logs.count("fp8/requantize_s") == (2 if every == 1 else 1)


def test_generate_syncs_by_itself_outside_a_trainer(opd_tokenizer, policy):
    b = backend(policy, opd_tokenizer)
    with torch.no_grad():
        policy.model.layers[0].mlp.down_proj.weight.mul_(3)
    out = generate(b, prompts(opd_tokenizer), step=4)
    assert out.policy_version == 4 and b.version == 4
    w = b.behaviour_model.model.layers[0].mlp.down_proj
    torch.testing.assert_close(w.weight.float() * w.weight_scale.repeat_interleave(32, 0).repeat_interleave(32, 1),
                               fake_quantize(policy.model.layers[0].mlp.down_proj.weight, "per_block", BLOCK))


def test_lora_rollout_only_quantizes_the_merged_weights(opd_tokenizer, lora_model):
    model = lora_model
    b = backend(model, opd_tokenizer)
    assert len(b.quantized) == LINEARS_BUT_HEAD  # every base layer, under its merged name; adapters never
    merged = copy.deepcopy(model).merge_and_unload()
    batch = prompts(opd_tokenizer)
    out = generate(b, batch)
    ref = naive_fake_quant(merged, b.quantized)
    for p, c, lp in zip(batch, out.completion_ids, out.behaviour_logps, strict=True):
        torch.testing.assert_close(torch.tensor(lp), token_logps(ref, p, c), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# unified
# ---------------------------------------------------------------------------------------------------------------


def test_unified_training_forward_is_the_rollout_forward_while_rollout_only_is_not(opd_tokenizer, policy):
    batch = prompts(opd_tokenizer) * 2
    hp = copy.deepcopy(policy)
    only = generate(backend(copy.deepcopy(policy), opd_tokenizer), batch)
    b = backend(policy, opd_tokenizer, flow="unified")
    assert all(type(policy.get_submodule(n)) is FakeQuantLinear for n in b.quantized)
    assert type(policy.lm_head) is torch.nn.Linear
    policy.train()  # the trainer's own forward: train mode, gradients on
    out = generate(b, batch)
    unified_gap, only_gap = [], []
    for p, c, lp in zip(batch, out.completion_ids, out.behaviour_logps, strict=True):
        train = token_logps(policy, p, c, grad=True)
        assert train.requires_grad
        unified_gap.append((train.detach() - torch.tensor(lp)).abs().max().item())
    for p, c, lp in zip(batch, only.completion_ids, only.behaviour_logps, strict=True):
        only_gap.append((token_logps(hp, p, c) - torch.tensor(lp)).abs().max().item())
    assert max(unified_gap) < 1e-5 < 1e-4 < max(only_gap)
    ref = naive_fake_quant(hp, b.quantized)  # and the unified policy is the fake-quantized one
    p, c = batch[0], out.completion_ids[0]
    torch.testing.assert_close(token_logps(policy, p, c), token_logps(ref, p, c), rtol=0, atol=1e-5)


def test_unified_gradients_go_straight_through_to_the_master_weights(opd_tokenizer, policy):
    ids = torch.tensor([prompts(opd_tokenizer)[0]])
    ref = naive_fake_quant(policy, [n for n, m in policy.named_modules()
                                    if isinstance(m, torch.nn.Linear) and n != "lm_head"])
    ref.train()
    b = backend(policy, opd_tokenizer, flow="unified")
    policy.train()
    master = policy.model.layers[0].mlp.down_proj.weight
    before = master.detach().clone()
    policy(ids).logits.float().logsumexp(-1).sum().backward()
    ref(ids).logits.float().logsumexp(-1).sum().backward()
    for name in b.quantized:  # d loss / d master = d loss / d (quantized weight): the straight-through estimator
        got, want = policy.get_submodule(name).weight.grad, ref.get_submodule(name).weight.grad
        assert got is not None and got.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(master.detach(), before, rtol=0, atol=0)  # the master weights stay high precision
    quantizer = policy.model.layers[0].mlp.down_proj.fp8_quantizer
    n = quantizer.quantizations
    policy(ids)
    assert quantizer.quantizations == n  # cached while the weight is unchanged
    torch.optim.SGD(policy.parameters(), lr=0.1).step()
    after = policy(ids).logits
    assert quantizer.quantizations == n + 1  # re-quantized after the optimizer step
    ref2 = naive_fake_quant(policy, b.quantized)
    with torch.no_grad():
        torch.testing.assert_close(after, ref2(ids).logits, rtol=0, atol=1e-5)


def test_unified_keeps_state_dict_names_and_close_restores_the_layers(opd_tokenizer, policy):
    keys = list(policy.state_dict())
    b = backend(policy, opd_tokenizer, flow="unified")
    assert list(policy.state_dict()) == keys
    b.close()
    b.close()  # idempotent
    assert all(type(m) is torch.nn.Linear for m in policy.modules() if isinstance(m, torch.nn.Linear))


def test_unified_lora_quantizes_the_frozen_base_and_keeps_the_adapters(opd_tokenizer, lora_model):
    model = lora_model
    b = backend(model, opd_tokenizer, flow="unified")
    assert len(b.quantized) == LINEARS_BUT_HEAD
    attn = model.get_base_model().model.layers[0].self_attn
    assert type(attn.q_proj.base_layer) is FakeQuantLinear and type(attn.k_proj) is FakeQuantLinear
    assert type(attn.q_proj.lora_A["default"]) is torch.nn.Linear  # the adapter stays high precision
    batch = prompts(opd_tokenizer)
    model.train()
    out = generate(b, batch)
    for p, c, lp in zip(batch, out.completion_ids, out.behaviour_logps, strict=True):
        train = token_logps(model, p, c, grad=True)
        torch.testing.assert_close(train.detach(), torch.tensor(lp), rtol=0, atol=1e-5)
    token_logps(model, batch[0], out.completion_ids[0], grad=True).sum().backward()
    assert attn.q_proj.lora_B["default"].weight.grad is not None and attn.q_proj.base_layer.weight.grad is None
    assert attn.q_proj.base_layer.fp8_quantizer.quantizations == 1  # frozen: quantized once


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_nothing_quantizable_names_the_layers(opd_tokenizer, policy):
    with pytest.raises(OPDError, match=r"no Linear layer .*model\.layers\.0\.self_attn\.q_proj .*min_features"):
        backend(policy, opd_tokenizer, min_features=4096)


def test_a_skip_entry_that_matches_nothing_is_named(opd_tokenizer, policy):
    with pytest.raises(OPDError, match=r"params\.skip: 'down_prj' matches no Linear.*Did you mean 'down_proj'"):
        backend(policy, opd_tokenizer, skip=["lm_head", "down_prj"])


def test_blocks_that_do_not_divide_a_layer_fall_back_to_partial_tiles_with_a_warning(opd_tokenizer, policy):
    with pytest.warns(UserWarning, match=r"not multiples of the 48x48 block .*own scale"):
        b = backend(policy, opd_tokenizer, block=(48, 48))
    out = generate(b, prompts(opd_tokenizer))
    ref = naive_fake_quant(policy, b.quantized, block=(48, 48))
    p, c, lp = prompts(opd_tokenizer)[0], out.completion_ids[0], out.behaviour_logps[0]
    torch.testing.assert_close(torch.tensor(lp), token_logps(ref, p, c), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("params", "key", "match"), [
    ({"format": "per_channel", "block": (64, 64)}, "block", "per_block only"),
    ({"flow": "unified", "sync_every": 2}, "sync_every", "nothing to sync"),
    ({"flow": "unified", "skip": []}, "skip", "lm_head.weight directly"),
    ({"flow": "unified", "kernel": "dequant"}, "kernel", "rollout_only"),
])
def test_contradicting_params_are_refused(opd_tokenizer, policy, params, key, match):
    b = FP8Rollout(FP8Rollout.Params(**params))
    assert [k for k, _ in b.problems()] == [key] and match in b.problems()[0][1]
    with pytest.raises(OPDError, match=f"params.{key}"):
        b.setup(context(policy, opd_tokenizer))


def test_sharded_models_and_images_are_refused(opd_tokenizer, policy):
    with pytest.raises(OPDError, match="fsdp"):
        backend(policy, opd_tokenizer, {"sharding": "fsdp"})
    b = backend(policy, opd_tokenizer)
    with pytest.raises(OPDError, match="text-only"):
        b.generate(prompts(opd_tokenizer), Sampling(num_generations=1, multimodal_fields={"pixel_values": 1}))


def test_rollout_only_may_quantize_the_lm_head(opd_tokenizer, policy):
    b = backend(policy, opd_tokenizer, skip=[])
    assert "lm_head" in b.quantized and not b.problems()
    out = generate(b, prompts(opd_tokenizer))
    ref = naive_fake_quant(policy, [n for n in b.quantized if n != "lm_head"])
    ref.lm_head = torch.nn.Linear(64, len(opd_tokenizer), bias=False)  # untie: the head alone is quantized
    with torch.no_grad():
        ref.lm_head.weight.copy_(fake_quantize(policy.lm_head.weight, "per_block", BLOCK))
    p, c, lp = prompts(opd_tokenizer)[0], out.completion_ids[0], out.behaviour_logps[0]
    torch.testing.assert_close(torch.tensor(lp), token_logps(ref, p, c), rtol=0, atol=1e-5)


def test_cpu_copies_keep_their_dequantized_weights_until_a_sync(opd_tokenizer, policy):
    b = backend(policy, opd_tokenizer)
    layer = b.behaviour_model.model.layers[0].mlp.up_proj
    assert layer.keep_dequantized
    ids = torch.tensor([prompts(opd_tokenizer)[0]])
    with torch.no_grad():
        first = b.behaviour_model(ids).logits
        kept = layer._dequantized[1]
        assert b.behaviour_model(ids).logits.equal(first) and layer._dequantized[1] is kept
        policy.model.layers[0].mlp.up_proj.weight.mul_(2)
        b.sync_weights(policy, 1)
        assert not b.behaviour_model(ids).logits.equal(first) and layer._dequantized[1] is not kept
        torch.testing.assert_close(layer._dequantized[1], fake_quantize(policy.model.layers[0].mlp.up_proj.weight,
                                                                        "per_block", BLOCK))
