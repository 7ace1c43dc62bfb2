"""Writing an offline teacher cache (format: :mod:`opd_plugins.teachers.cache.format`): rollouts tokenized as the
trainer tokenizes them, scored by a local ``hf_model`` teacher, shard by shard.

Resumable: each shard is written to a temporary file and renamed into place, then the manifest (also renamed
into place) lists it. A run that stops half-way leaves finished shards listed; the same inputs run again (teacher,
weights, tokenizer, data, k) keep the finished shards untouched and compute the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opd_plugins.errors import DataError, OPDError
from opd_plugins.paths import atomic_write
from opd_plugins.teachers.cache.format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    data_sha256,
    file_sha256,
    row_key,
    tokenizer_sha256,
)

TOPK_DTYPES = ("float16", "float32")
# What must match for a re-run to reuse finished shards.
_FINGERPRINT = (("teacher",), ("tokenizer", "vocab_sha256"), ("top_k",), ("topk_dtype",), ("data", "sha256"),
                ("shard_size",), ("tokenization",))


def cache_teacher_batch(batch: Any, model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, top_k: int = 4,
                        shard_size: int = 2) -> dict[str, Any]:
    """Cache a :class:`~opd_plugins.teachers.base.TeacherBatch`'s rows (completions cut at their mask) as scored by
    the local model in ``model_dir`` (the tokenizer saved with it). Used by the contract suite and tests."""
    from opd_plugins.teachers.hf_model import HFModelTeacher

    examples = []
    for i in range(batch.completion_ids.shape[0]):
        valid = batch.completion_mask[i].nonzero()
        length = int(valid[-1]) + 1 if valid.numel() else 0
        examples.append((batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist(),
                         batch.completion_ids[i, :length].tolist()))
    params = HFModelTeacher.Params(model=str(model_dir))
    scorer, tokenizer, weights = load_scorer(params, None, temperature=1.0)
    header = cache_header(str(model_dir), weights, scorer, tokenizer, str(model_dir), "<teacher batch>",
                     tokenization={"chat_template_kwargs": {}, "max_completion_length": None, "append_eos": False})
    return write_cache(examples, out_dir, scorer=scorer, header=header, shard_size=shard_size, top_k=top_k,
                       topk_dtype="float32", progress=False)

def tokenize_rollouts(ds: Any, tokenizer: Any, *, chat_template_kwargs: dict[str, Any] | None = None,
                      max_completion_length: int | None = None,
                      append_eos: bool = True) -> list[tuple[list[int], list[int]]]:
    """``(prompt_ids, completion_ids)`` per row, tokenized as TRL's GRPO trainer does.

    Chat prompts go through ``apply_chat_template(add_generation_prompt=True)``, text prompts through the
    tokenizer (special tokens included), as ``GRPOTrainer._tokenize_prompts`` does. A completion is a string, or
    chat messages (the last message's content), tokenized without special tokens, ended with eos
    (``append_eos``) and cut at ``max_completion_length``; a ``completion_ids`` column is used as is.
    """
    kwargs = chat_template_kwargs or {}
    eos = tokenizer.eos_token_id
    has_ids = "completion_ids" in ds.column_names
    examples = []
    for i, row in enumerate(ds):
        prompt = row["prompt"]
        if isinstance(prompt, str):
            p = list(tokenizer(text=prompt)["input_ids"])
        else:
            p = list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                   **kwargs)["input_ids"])
        if has_ids and row["completion_ids"] is not None:
            c = [int(t) for t in row["completion_ids"]]
        else:
            completion = row["completion"]
            if isinstance(completion, list):
                completion = completion[-1]["content"] if completion else ""
            if not isinstance(completion, str):
                raise DataError(f"rollouts row {i}: 'completion' must be text or chat messages, got {type(completion).__name__}")
            c = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
            if append_eos and eos is not None and (not c or c[-1] != eos):
                c.append(eos)
        if max_completion_length is not None:
            c = c[:max_completion_length]
        if not c:
            raise DataError(f"rollouts row {i} has an empty completion")
        examples.append((p, c))
    if not examples:
        raise DataError("the rollout set is empty")
    return examples

def load_scorer(params: Any, pm: Any, *, temperature: float) -> tuple[Any, Any, tuple[str, str]]:
    """An attached ``hf_model`` teacher, its tokenizer, and its weights' ``(sha256, what was hashed)``."""
    import torch

    from opd_plugins.models import load_causal_lm, load_tokenizer, resolve_model_path
    from opd_plugins.teachers.hf_model import HFModelTeacher

    cls = pm.registry.get("teacher", "hf_model") if pm is not None else HFModelTeacher
    path = resolve_model_path(params.model)
    model = load_causal_lm(path, dtype=params.dtype, trust_remote_code=params.trust_remote_code)
    teacher = cls(params)
    device = params.device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher.attach(model, device=device, temperature=temperature)
    tokenizer = load_tokenizer(path, trust_remote_code=params.trust_remote_code)
    return teacher, tokenizer, weights_sha256(path, model)


def weights_sha256(path: str, model: Any) -> tuple[str, str]:
    """sha256 of a checkpoint's weights: over its ``*.safetensors`` files (sorted by name; each name, then its
    bytes) when ``path`` is a local directory that has them, else over the loaded ``state_dict`` (sorted by
    name; name, dtype, shape, raw bytes). Returns ``(hexdigest, "safetensors files" | "state_dict")``."""
    import torch

    h = hashlib.sha256()
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if files:
        for f in files:
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    h.update(block)
        return h.hexdigest(), "safetensors files"
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest(), "state_dict"

def cache_header(teacher_id: str, weights: tuple[str, str], scorer: Any, tokenizer: Any, tokenizer_name: str,
                 source: str, *, tokenization: dict[str, Any], provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest's description of what made the cache. ``provenance`` records where the student came from:
    ``sft_teacher`` (the model that produced the SFT data the student was fine-tuned on; the ``offline_cache``
    teacher checks it is the OPD teacher, Lightning OPD's condition), ``sft_data`` and ``rollouts_from`` (free
    text); it is what the user declares, not something the cache can verify."""
    header = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "teacher": {**model_identity(teacher_id),
                    "weights_sha256": weights[0], "weights_hashed": weights[1],
                    "dtype": scorer.params.dtype, "temperature": scorer.temperature},
        "tokenizer": {"name_or_path": tokenizer_name, "vocab_sha256": tokenizer_sha256(tokenizer)},
        "pad_token_id": tokenizer.pad_token_id,
        "data": {"source": source},
        "tokenization": tokenization,
    }
    given = {k: v for k, v in (provenance or {}).items() if v is not None}
    unknown = sorted(set(given) - set(PROVENANCE_KEYS))
    if unknown:
        raise OPDError(f"unknown provenance keys {', '.join(unknown)}; known: {', '.join(PROVENANCE_KEYS)}")
    if given:
        header["provenance"] = {k: model_identity(str(v)) if k == "sft_teacher" else str(v) for k, v in given.items()}
    return header


PROVENANCE_KEYS = ("sft_teacher", "sft_data", "rollouts_from")
"""What a cache may record about where its student and rollouts came from (see :func:`cache_header`)."""


def model_identity(name: str) -> dict[str, Any]:
    """``{"id": name, "path": <resolved local directory or None>}``: how a manifest names a model (compared by
    :func:`~opd_plugins.teachers.cache.format.same_teacher_id`)."""
    from opd_plugins.recipe.references import looks_like_local_path

    local = Path(name).expanduser()
    return {"id": name, "path": str(local.resolve()) if local.exists() or looks_like_local_path(name) else None}


def write_cache(examples: list[tuple[list[int], list[int]]], out_dir: str | os.PathLike, *, scorer: Any,
                header: dict[str, Any], shard_size: int = 256, top_k: int = 64, topk_dtype: str = "float16",
                progress: bool = True, on_shard: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Score ``examples`` with ``scorer`` (an attached ``hf_model`` teacher) into ``out_dir``; returns the manifest.

    Finished shards already listed by a manifest with the same fingerprint are kept byte for byte; a manifest
    with a different fingerprint is an error (the directory holds another cache).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


    if shard_size < 1 or top_k < 1:
        raise OPDError(f"shard_size and top_k must be at least 1 (got {shard_size}, {top_k})")
    if topk_dtype not in TOPK_DTYPES:
        raise OPDError(f"topk_dtype must be one of {', '.join(TOPK_DTYPES)}, got {topk_dtype!r}")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    vocab = scorer.model.get_output_embeddings().weight.shape[0]
    top_k = min(top_k, vocab)
    if scorer.params.top_k != top_k:  # the teacher's own scoring path returns exactly this top-k
        scorer.params = scorer.params.model_copy(update={"top_k": top_k})
    num_shards = (len(examples) + shard_size - 1) // shard_size
    manifest = {
        **header,
        "top_k": top_k, "topk_dtype": topk_dtype,
        "data": {**header.get("data", {}), "num_rows": len(examples),
                 "num_completion_tokens": sum(len(c) for _, c in examples),
                 "max_completion_tokens": max(len(c) for _, c in examples), "sha256": data_sha256(examples)},
        "shard_size": shard_size, "num_shards": num_shards, "shards": [], "complete": False,
    }
    finished = _finished_shards(out, manifest)
    manifest["shards"] = sorted(finished.values(), key=lambda s: s["index"])
    for stale in out.glob("*.tmp-*"):
        stale.unlink()
    _write_json(out / MANIFEST, manifest)
    keys = [row_key(p, c) for p, c in examples]
    pad_id = header.get("pad_token_id") or 0
    columns = [TextColumn("teacher cache"), BarColumn(), MofNCompleteColumn(), TextColumn("rollouts"),
               TimeRemainingColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("precompute", total=len(examples))
        for idx in range(num_shards):
            a, b = idx * shard_size, min((idx + 1) * shard_size, len(examples))
            if idx not in finished:
                file = _write_shard(out, idx, examples[a:b], range(a, b), scorer, top_k, topk_dtype, pad_id)
                entry = {"index": idx, "file": file.name, "rows": [a, b],
                         "num_completion_tokens": sum(len(c) for _, c in examples[a:b]),
                         "sha256": file_sha256(file), "keys": keys[a:b]}
                manifest["shards"] = sorted([*manifest["shards"], entry], key=lambda s: s["index"])
                _write_json(out / MANIFEST, manifest)
                if on_shard is not None:
                    on_shard(idx)
            bar.advance(task, b - a)
    manifest["complete"] = True
    _write_json(out / MANIFEST, manifest)
    return manifest


def _finished_shards(out: Path, manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Shards a previous run of the same inputs finished (listed, present, unchanged); refuses other caches."""
    path = out / MANIFEST
    if not path.exists():
        if any(out.glob("shard-*.safetensors")):
            raise OPDError(f"{out} holds shard files but no {MANIFEST}: choose an empty --out directory")
        return {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise OPDError(f"{path} is not valid JSON: delete {out} or choose another --out directory") from None
    differ = [".".join(k) for k in _FINGERPRINT if _get(old, k) != _get(manifest, k)]
    if old.get("format") != FORMAT or differ:
        raise OPDError(f"{out} already holds a teacher cache made from different inputs (differs in: "
                       f"{', '.join(differ) or 'format'}): choose another --out directory or delete it")
    return {s["index"]: s for s in old.get("shards", [])
            if (out / s["file"]).is_file() and file_sha256(out / s["file"]) == s["sha256"]}


def _get(d: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _write_shard(out: Path, idx: int, rows: list[tuple[list[int], list[int]]], row_index: range, scorer: Any,
                 top_k: int, topk_dtype: str, pad: int) -> Path:
    import torch
    from safetensors.torch import save_file

    from opd_plugins.teachers.base import TeacherBatch

    per_row: list[dict[str, torch.Tensor]] = [{} for _ in rows]
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i][0]) + len(rows[i][1]), i))  # less padding
    step = scorer.params.chunk_size
    for start in range(0, len(order), step):
        chunk = order[start:start + step]
        P = max(len(rows[i][0]) for i in chunk)
        T = max(len(rows[i][1]) for i in chunk)
        batch = TeacherBatch(
            prompt_ids=torch.tensor([[pad] * (P - len(rows[i][0])) + rows[i][0] for i in chunk]),
            prompt_mask=torch.tensor([[0] * (P - len(rows[i][0])) + [1] * len(rows[i][0]) for i in chunk]),
            completion_ids=torch.tensor([rows[i][1] + [pad] * (T - len(rows[i][1])) for i in chunk]),
            completion_mask=torch.tensor([[1] * len(rows[i][1]) + [0] * (T - len(rows[i][1])) for i in chunk]),
        )
        scores = scorer.score(batch, "topk")
        scores.validate(batch, f"{scorer.name} (precompute-teacher)")  # never cache NaN or implausible scores
        for j, i in enumerate(chunk):
            n = len(rows[i][1])
            per_row[i] = {"token_logps": scores.token_logps[j, :n], "entropy": scores.entropy[j, :n],
                          "topk_ids": scores.topk_ids[j, :n, :top_k], "topk_logps": scores.topk_logps[j, :n, :top_k]}

    def offsets(lengths: list[int]) -> torch.Tensor:
        return torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)

    tensors = {
        "prompt_ids": torch.tensor([t for p, _ in rows for t in p], dtype=torch.int32),
        "prompt_offsets": offsets([len(p) for p, _ in rows]),
        "completion_ids": torch.tensor([t for _, c in rows for t in c], dtype=torch.int32),
        "completion_offsets": offsets([len(c) for _, c in rows]),
        "token_logps": torch.cat([r["token_logps"] for r in per_row]).float().contiguous(),
        "entropy": torch.cat([r["entropy"] for r in per_row]).float().contiguous(),
        "topk_ids": torch.cat([r["topk_ids"] for r in per_row]).to(torch.int32).contiguous(),
        "topk_logps": torch.cat([r["topk_logps"] for r in per_row]).to(getattr(torch, topk_dtype)).contiguous(),
        "row_index": torch.tensor(list(row_index), dtype=torch.int64),
    }
    file = out / f"shard-{idx:05d}.safetensors"
    tmp = out / f"{file.name}.tmp-{os.getpid()}"
    # One metadata key: safetensors writes a metadata map in hash order, which would make the bytes vary by run.
    save_file(tensors, str(tmp), metadata={FORMAT: json.dumps({"shard": idx, "top_k": top_k}, sort_keys=True)})
    os.replace(tmp, file)
    return file


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


__all__ = ["PROVENANCE_KEYS", "TOPK_DTYPES", "cache_header", "model_identity", "cache_teacher_batch", "load_scorer", "tokenize_rollouts", "weights_sha256", "write_cache"]
