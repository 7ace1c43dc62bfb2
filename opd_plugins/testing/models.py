"""Tiny random causal LMs and a locally built tokenizer with a chat template: no network, built in seconds."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "What is 3 + 4?", "What is 12 + 30?", "The answer is 7.", "What is 6 times 8?", "48",
    "Which number is larger: 31 or 57?", "(Hint: the correct answer is 42.)", "Reply with just the number.",
    "user", "assistant", "system", "You are a helpful assistant.", "one two three four five six seven eight nine ten",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - = ? . ,",
]


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_CORPUS * 4, trainer)
    return bpe.to_str()


def build_tokenizer(vocab_size: int = 320) -> Any:
    """A byte-level BPE tokenizer with ChatML specials and a chat template (left padding, pad != eos)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)), pad_token="<|pad|>",
        eos_token="<|im_end|>", bos_token=None, unk_token=None, padding_side="left", truncation_side="left",
        model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(tokenizer: Any, *, seed: int = 0, hidden: int = 64, layers: int = 2, arch: str = "qwen2") -> Any:
    """A tiny random causal LM (``qwen2`` or ``llama``) sized for ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    cfg = config_cls(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    model = model_cls(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny_model(directory: str | os.PathLike, *, seed: int = 0, hidden: int = 64, layers: int = 2,
                    arch: str = "qwen2", tokenizer: Any = None) -> Path:
    """Build a tiny model and its tokenizer and save both to ``directory`` (a loadable local checkpoint)."""
    directory = Path(directory)
    tokenizer = tokenizer or build_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed, hidden=hidden, layers=layers, arch=arch)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
