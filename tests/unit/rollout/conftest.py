"""Fixtures of the rollout-backend tests."""

import pytest
import torch

from opd_plugins.testing import build_tiny_model


def make_lora_model(tokenizer, seed=0, **lora):
    """The tiny model with LoRA on q_proj, v_proj and down_proj, its ``lora_B`` moved off zero so the adapters
    change the policy."""
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model(tokenizer, seed=seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0, **lora)
    peft_model = get_peft_model(model, cfg)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return peft_model


@pytest.fixture
def lora_model(opd_tokenizer):
    return make_lora_model(opd_tokenizer)


@pytest.fixture
def dora_model(opd_tokenizer):
    return make_lora_model(opd_tokenizer, use_dora=True)
