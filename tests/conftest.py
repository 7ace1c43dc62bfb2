"""Shared test setup: offline, single-threaded torch (tiny models on 2 cores are ~25x faster that way)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers importable as `helpers`


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch():
    import torch

    torch.set_num_threads(1)
    yield
