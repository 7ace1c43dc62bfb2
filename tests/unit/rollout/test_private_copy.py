"""The helpers ``perturbed_hf`` and ``fp8`` share: the merged private copy, its sync tensors, and generation with
the sampled tokens' log-probs under the processed (temperature, top-k, top-p) distribution."""

import copy

import pytest
import torch

from opd_plugins.context import Sampling
from opd_plugins.errors import OPDError
from opd_plugins.rollout._fp8 import requantize_from_state
from opd_plugins.rollout._private_copy import (adapter_free_name, effective_state, generate_with_logprobs,
                                               private_copy)
from opd_plugins.rollout.perturbed import PerturbedHFGenerate
from opd_plugins.testing import build_tiny_model, fake_context


def prompts(tok, questions=("What is 3 + 4?", "Which number is larger: 31 or 57?")):
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in questions]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_adapter_free_names():
    assert adapter_free_name("model.layers.0.self_attn.q_proj.base_layer.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert adapter_free_name("lm_head.modules_to_save.default.weight") == "lm_head.weight"
    assert adapter_free_name("model.layers.0.self_attn.q_proj.lora_A.default.weight") is None
    assert adapter_free_name("lm_head.original_module.weight") is None
    assert adapter_free_name("model.norm.weight") == "model.norm.weight"


def test_effective_state_of_a_lora_model_is_what_merge_and_unload_makes(lora_model):
    model = lora_model
    plain = copy.deepcopy(model).merge_and_unload()
    merged = {**dict(plain.named_parameters(remove_duplicate=False)), **dict(plain.named_buffers())}
    state = effective_state(model)
    assert set(state) == set(merged)
    for name, t in merged.items():
        torch.testing.assert_close(state[name], t, rtol=0, atol=1e-6, msg=name)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[q], model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight)


def test_private_copy_is_the_merged_policy_and_follows_it(opd_tokenizer, lora_model):
    model = lora_model
    model.train()
    ids = torch.tensor([prompts(opd_tokenizer)[0]])
    clone = private_copy(model, "test")
    assert not hasattr(clone, "peft_config") and not clone.training
    assert all(not p.requires_grad for p in clone.parameters())
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(clone(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
        before = clone(ids).logits
        requantize_from_state(clone, effective_state(model))  # no FP8 layer: a plain sync
        after = clone(ids).logits
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, model(ids).logits, rtol=0, atol=1e-5)


def test_dora_is_refused(dora_model):
    with pytest.raises(OPDError, match="DoRA"):
        private_copy(dora_model, "rollout 'fp8'")


def _processed_logps(model, prompt, completion, temperature, top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float() / temperature
    if top_k:
        logits = TopKLogitsWarper(top_k)(None, logits)
    if top_p < 1:
        logits = TopPLogitsWarper(top_p)(None, logits)
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8)])
def test_generated_logprobs_are_the_processed_distribution(opd_tokenizer, temperature, top_k, top_p):
    from transformers import GenerationConfig

    model = build_tiny_model(opd_tokenizer, seed=0)
    model.gradient_checkpointing_enable()
    model.train()
    tok = opd_tokenizer
    config = GenerationConfig(max_new_tokens=6, do_sample=True, top_k=top_k, top_p=top_p, temperature=2.0,
                              pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id])
    ctx = fake_context(model, tok, temperature, generation_config=config, eos_token_ids=[tok.eos_token_id])
    batch = prompts(tok) * 2
    torch.manual_seed(0)
    completions, logps = generate_with_logprobs(model, ctx, batch, temperature=temperature, who="test")
    assert model.training and model.is_gradient_checkpointing  # put back as it was
    model.eval()
    for p, c, lp in zip(batch, completions, logps, strict=True):
        assert 1 <= len(c) == len(lp) <= 6
        torch.testing.assert_close(torch.tensor(lp), _processed_logps(model, p, c, temperature, top_k, top_p),
                                   rtol=0, atol=2e-5)


def test_unsupported_sampling_settings_are_refused(opd_tokenizer):
    from transformers import GenerationConfig

    model = build_tiny_model(opd_tokenizer, seed=0)
    config = GenerationConfig(max_new_tokens=2, do_sample=True, typical_p=0.9, pad_token_id=opd_tokenizer.pad_token_id)
    ctx = fake_context(model, opd_tokenizer, generation_config=config)
    with pytest.raises(OPDError, match="typical_p"):
        generate_with_logprobs(model, ctx, prompts(opd_tokenizer), temperature=1.0, who="fp8")


def test_perturbed_backend_on_a_lora_policy_samples_from_the_merged_model(opd_tokenizer, lora_model):
    model = lora_model
    backend = PerturbedHFGenerate()
    backend.setup(fake_context(model, opd_tokenizer, max_completion_length=5,
                               eos_token_ids=[opd_tokenizer.eos_token_id]))
    batch = prompts(opd_tokenizer)
    torch.manual_seed(0)
    out = backend.generate(batch, Sampling(num_generations=1))
    model.eval()
    for p, c, lp in zip(batch, out.completion_ids, out.behaviour_logps, strict=True):
        torch.testing.assert_close(torch.tensor(lp), _processed_logps(model, p, c, 1.0, 0, 1.0), rtol=0, atol=2e-5)
