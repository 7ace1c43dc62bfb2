"""The offline teacher-cache format: one home for its layout, keys, reader and checks (the writer is
:mod:`opd_plugins.teachers.cache.writer`).

A cache directory, written by ``opd-plugins precompute-teacher`` (:mod:`opd_plugins.precompute`), holds
``manifest.json`` and ``shard-NNNNN.safetensors`` files. Each shard stores its rows flattened, with offsets:

====================== ========= =============== ===================================================
tensor                 dtype     shape           meaning
====================== ========= =============== ===================================================
``prompt_ids``         int32     (ΣP,)           prompt token ids (chat template + generation prompt)
``prompt_offsets``     int64     (n+1,)          row i's prompt is ``prompt_ids[off[i]:off[i+1]]``
``completion_ids``     int32     (ΣT,)           completion token ids
``completion_offsets`` int64     (n+1,)          same, for completions and every per-token tensor below
``token_logps``        float32   (ΣT,)           teacher log-prob of each completion token
``entropy``            float32   (ΣT,)           teacher entropy at each completion position
``topk_ids``           int32     (ΣT, k)         teacher top-k token ids, best first
``topk_logps``         float16*  (ΣT, k)         their log-probs (*``float32`` if precomputed so)
``row_index``          int64     (n,)            row of the rollout set each cached row came from
====================== ========= =============== ===================================================

A row's key is ``sha256`` of the int64 little-endian array ``[len(prompt), *prompt_ids, *completion_ids]``
(:func:`row_key`); the manifest lists every finished shard with the keys of its rows. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from opd_plugins.errors import TeacherError

MANIFEST = "manifest.json"
FORMAT = "opd_plugins.teacher_cache"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# Keys and hashes (shared with the writer)
# ---------------------------------------------------------------------------------------------------------------


def _ids_bytes(values: Sequence[int]) -> bytes:
    import numpy as np

    return np.asarray(values, dtype="<i8").tobytes()


def row_key(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> str:
    """sha256 (hex) of ``[len(prompt), *prompt_ids, *completion_ids]`` as int64 little-endian.

    The length prefix keeps ``([1, 2], [3])`` and ``([1], [2, 3])`` apart.
    """
    return hashlib.sha256(_ids_bytes([len(prompt_ids), *prompt_ids, *completion_ids])).hexdigest()


def data_sha256(examples: Sequence[tuple[Sequence[int], Sequence[int]]]) -> str:
    """sha256 over every ``(prompt_ids, completion_ids)`` row, in order, as int64 LE ``[len(P), len(T), *P, *T]``."""
    h = hashlib.sha256()
    for p, c in examples:
        h.update(_ids_bytes([len(p), len(c), *p, *c]))
    return h.hexdigest()


def prompt_key(prompt_ids: Sequence[int]) -> str:
    """sha256 (hex) of ``[len(prompt), *prompt_ids]`` as int64 little-endian (groups completions by prompt)."""
    return hashlib.sha256(_ids_bytes([len(prompt_ids), *prompt_ids])).hexdigest()


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary as JSON (``get_vocab()``, keys sorted, compact separators)."""
    vocab = json.dumps(tokenizer.get_vocab(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(vocab.encode("utf-8")).hexdigest()


def same_teacher_id(recorded: dict[str, Any], name: str) -> bool:
    """Whether ``name`` names the teacher recorded in a manifest: the same string, or the same local directory."""
    if name == recorded.get("id"):
        return True
    path = Path(name).expanduser()
    return recorded.get("path") is not None and path.exists() and str(path.resolve()) == recorded["path"]


# ---------------------------------------------------------------------------------------------------------------
# Reading a cache
# ---------------------------------------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a cache directory; :class:`TeacherError` if there is none or it is not a teacher cache."""
    file = Path(path).expanduser() / MANIFEST
    if not file.is_file():
        raise TeacherError(f"no teacher cache at {str(path)!r} (no {MANIFEST}): make one with "
                           "`opd-plugins precompute-teacher RECIPE --rollouts FILE --out DIR`")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TeacherError(f"{file} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise TeacherError(f"{file} is not an opd_plugins teacher cache of format version {FORMAT_VERSION} "
                           f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})")
    return manifest


@dataclass
class CachedRow:
    """One cached row: its tokens and the teacher's scores of every completion token."""

    prompt_ids: list[int]
    completion_ids: list[int]
    token_logps: torch.Tensor
    entropy: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logps: torch.Tensor | None = None


class TeacherCache:
    """Read access to a finished cache directory. Shards are opened lazily and memory-mapped by safetensors;
    a row is read by slicing, so only the rows a batch needs are touched."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        self.manifest = read_manifest(self.path)
        if not self.manifest.get("complete"):
            done, total = len(self.manifest.get("shards", [])), self.manifest.get("num_shards", "?")
            raise TeacherError(f"teacher cache {str(self.path)!r} is incomplete ({done} of {total} shards): re-run "
                               "the same precompute-teacher command to finish it (finished shards are kept)")
        self.shards: list[dict[str, Any]] = sorted(self.manifest["shards"], key=lambda s: s["index"])
        self.top_k: int = int(self.manifest["top_k"])
        self._index: dict[str, tuple[int, int]] = {}
        for s, shard in enumerate(self.shards):
            for r, key in enumerate(shard["keys"]):
                self._index.setdefault(key, (s, r))
        self._open: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._prompts: dict[str, list[tuple[int, int]]] | None = None

    def __len__(self) -> int:
        return sum(len(s["keys"]) for s in self.shards)

    def find(self, key: str) -> tuple[int, int] | None:
        """``(shard, row)`` of the row with this :func:`row_key`, or None."""
        return self._index.get(key)

    def _shard(self, s: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        if s not in self._open:
            self._open[s] = open_shard(self.path, self.shards[s], self.top_k)
        return self._open[s]

    def prompt_ids(self, s: int, r: int) -> list[int]:
        handle, p_off, _ = self._shard(s)
        return handle.get_slice("prompt_ids")[int(p_off[r]):int(p_off[r + 1])].tolist()

    def completion_ids(self, s: int, r: int) -> list[int]:
        handle, _, c_off = self._shard(s)
        return handle.get_slice("completion_ids")[int(c_off[r]):int(c_off[r + 1])].tolist()

    def prompt_ids_of_shard(self, s: int) -> list[list[int]]:
        """Every prompt of a shard (read in one slice)."""
        handle, p_off, _ = self._shard(s)
        flat = handle.get_tensor("prompt_ids").tolist()
        return [flat[int(p_off[r]):int(p_off[r + 1])] for r in range(len(p_off) - 1)]

    def prompt_index(self) -> dict[str, list[tuple[int, int]]]:
        """:func:`prompt_key` -> the ``(shard, row)`` of every cached completion of that prompt, in cache order."""
        if self._prompts is None:
            self._prompts = {}
            for s in range(len(self.shards)):
                for r, ids in enumerate(self.prompt_ids_of_shard(s)):
                    self._prompts.setdefault(prompt_key(ids), []).append((s, r))
        return self._prompts

    def read_row(self, s: int, r: int, *, topk: bool = True) -> CachedRow:
        handle, _, c_off = self._shard(s)
        a, b = int(c_off[r]), int(c_off[r + 1])
        row = CachedRow(self.prompt_ids(s, r), self.completion_ids(s, r),
                        handle.get_slice("token_logps")[a:b], handle.get_slice("entropy")[a:b])
        if topk:
            row.topk_ids = handle.get_slice("topk_ids")[a:b].long()
            row.topk_logps = handle.get_slice("topk_logps")[a:b].float()
        return row


SHARD_TENSORS: dict[str, tuple[torch.dtype, ...]] = {
    "prompt_ids": (torch.int32,), "prompt_offsets": (torch.int64,), "completion_ids": (torch.int32,),
    "completion_offsets": (torch.int64,), "token_logps": (torch.float32,), "entropy": (torch.float32,),
    "topk_ids": (torch.int32,), "topk_logps": (torch.float16, torch.float32), "row_index": (torch.int64,),
}
"""The tensors every shard holds and their dtypes (see the table at the top of this module)."""


def open_shard(root: Path, shard: dict[str, Any], top_k: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Open one shard after checking it: the file's sha256 against the manifest's (a changed, truncated or swapped
    file is refused before it is read), then its header, tensors, dtypes and offsets. Returns the safetensors
    handle and the prompt and completion offsets; every failure is a :class:`TeacherError` naming the shard."""
    from safetensors import safe_open

    file = root / shard["file"]
    where = f"teacher cache {str(root)!r}: shard {file.name}"
    redo = "precompute the cache again (or restore the file)"
    if not file.is_file():
        raise TeacherError(f"{where} listed in the manifest is missing; {redo}")
    recorded = shard.get("sha256")
    if recorded is None:
        raise TeacherError(f"{where} has no sha256 in the manifest, so its contents cannot be verified; {redo}")
    actual = file_sha256(file)
    if actual != recorded:
        raise TeacherError(f"{where} does not match the sha256 the manifest records (file {actual[:12]}…, manifest "
                           f"{recorded[:12]}…): the file was changed, truncated or swapped since it was written; {redo}")
    try:
        handle = safe_open(str(file), framework="pt")
        keys = set(handle.keys())
        missing = sorted(set(SHARD_TENSORS) - keys)
        if missing:
            raise TeacherError(f"{where} lacks the tensors {', '.join(missing)}; {redo}")
        tensors = {name: handle.get_slice(name) for name in SHARD_TENSORS}
        p_off, c_off = handle.get_tensor("prompt_offsets"), handle.get_tensor("completion_offsets")
    except TeacherError:
        raise
    except Exception as exc:  # safetensors' SafetensorError and friends: a corrupt header or body
        raise TeacherError(f"{where} is not a readable safetensors file ({type(exc).__name__}: {exc}); {redo}") \
            from None
    for name, allowed in SHARD_TENSORS.items():
        dtype = _slice_dtype(tensors[name])
        if dtype not in allowed:
            raise TeacherError(f"{where}: tensor {name} has dtype {dtype}, expected {allowed[0]}; {redo}")
    a, b = shard.get("rows", [0, len(p_off) - 1])
    n, total_c, total_p = b - a, int(c_off[-1]), int(p_off[-1])
    shapes = {name: tuple(t.get_shape()) for name, t in tensors.items()}
    expected = {"prompt_offsets": (n + 1,), "completion_offsets": (n + 1,), "row_index": (n,),
                "prompt_ids": (total_p,), "completion_ids": (total_c,), "token_logps": (total_c,),
                "entropy": (total_c,), "topk_ids": (total_c, top_k), "topk_logps": (total_c, top_k)}
    wrong = [f"{k} {shapes[k]} (expected {v})" for k, v in expected.items() if shapes[k] != v]
    if wrong or int(p_off[0]) != 0 or int(c_off[0]) != 0 or bool((p_off.diff() < 0).any()) \
            or bool((c_off.diff() < 0).any()):
        raise TeacherError(f"{where} is inconsistent ({'; '.join(wrong) or 'offsets out of order'}); {redo}")
    return handle, p_off, c_off


def _slice_dtype(view: Any) -> torch.dtype | None:
    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
             "I32": torch.int32, "I64": torch.int64, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    return names.get(view.get_dtype())


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def check_tokenizer(manifest: dict[str, Any], tokenizer: Any, path: Any, who: str) -> None:
    """Refuse a trainer tokenizer whose vocabulary differs from the one the cache was tokenized with."""
    cached = manifest["tokenizer"]["vocab_sha256"]
    ours = tokenizer_sha256(tokenizer)
    if cached != ours:
        raise TeacherError(
            f"{who}: the cache at {str(path)!r} was tokenized with a different tokenizer "
            f"({manifest['tokenizer'].get('name_or_path')!r}, vocab sha256 {cached[:12]}…) than the trainer's "
            f"(vocab sha256 {ours[:12]}…): its token ids do not mean the same tokens. Re-run precompute-teacher "
            "with this recipe's model, or set tokenizer_check: false only if the ids are known to agree"
        )


__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "SHARD_TENSORS", "CachedRow", "TeacherCache", "check_tokenizer",
           "data_sha256", "file_sha256", "open_shard", "prompt_key", "read_manifest", "row_key", "same_teacher_id",
           "tokenizer_sha256"]
