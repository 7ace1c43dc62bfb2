"""pytest plugin (entry point ``pytest11: opd_plugins``): fixtures for testing components offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def opd_tokenizer():
    """A local byte-level BPE tokenizer with a ChatML chat template."""
    from opd_plugins.testing.models import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def opd_tiny_model(opd_tokenizer):
    """A fresh tiny random Qwen2 causal LM (2 layers, hidden 64) matching ``opd_tokenizer``."""
    from opd_plugins.testing.models import build_tiny_model

    return build_tiny_model(opd_tokenizer, seed=0)


@pytest.fixture(scope="session")
def opd_tiny_model_dir(tmp_path_factory, opd_tokenizer):
    """A tiny model and its tokenizer saved to disk (usable wherever a model path is expected)."""
    from opd_plugins.testing.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0, tokenizer=opd_tokenizer)


@pytest.fixture
def opd_plugin_manager():
    """A fresh plugin manager with the built-ins and installed plugins."""
    from opd_plugins.manager import get_plugin_manager

    return get_plugin_manager()
