"""``offline_cache``: teacher log-probs precomputed once on a fixed rollout set (Lightning OPD, offline OPD).

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
Paper: Lightning OPD (offline on-policy distillation), https://github.com/jet-ai-projects/Lightning-OPD
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from pydantic import Field

from opd_plugins.components import ComponentParams
from opd_plugins.errors import TeacherError
from opd_plugins.teachers.base import Capability, Teacher, TeacherBatch, TeacherScores

MANIFEST = "manifest.json"
FORMAT = "opd_plugins.teacher_cache"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# Keys and hashes (shared with the writer, opd_plugins.precompute)
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
            from safetensors import safe_open

            file = self.path / self.shards[s]["file"]
            if not file.is_file():
                raise TeacherError(f"teacher cache {str(self.path)!r}: shard {file.name} listed in the manifest is missing")
            handle = safe_open(str(file), framework="pt")
            self._open[s] = (handle, handle.get_tensor("prompt_offsets"), handle.get_tensor("completion_offsets"))
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


# ---------------------------------------------------------------------------------------------------------------
# The teacher
# ---------------------------------------------------------------------------------------------------------------


class OfflineCacheTeacher(Teacher):
    """Teacher scores read from a precomputed cache; no teacher model is loaded (offline OPD, Lightning OPD).

    Looks up every completion by the sha256 of its exact prompt and completion token ids and returns the
    cached sampled-token log-probs, top-k and entropy. Train on the cached rollouts (``rollout: replay``): a
    completion the cache does not hold is an error, never a silent zero. ``teacher`` must name the teacher that
    made the cache — the teacher-consistency condition under which offline OPD keeps the optimum of standard
    OPD — and the trainer's tokenizer must be the one the cache was tokenized with.
    Paper: Lightning OPD, https://github.com/jet-ai-projects/Lightning-OPD
    """

    name: ClassVar[str] = "offline_cache"
    capabilities: ClassVar[frozenset[str]] = frozenset({"sampled", "topk"})

    class Params(ComponentParams):
        path: str = Field(..., description="Cache directory written by `opd-plugins precompute-teacher`.")
        teacher: str = Field(..., description="The teacher this recipe distils from (its model name or path); "
                                              "must equal the teacher that made the cache.")
        tokenizer_check: bool = Field(True, description="Refuse a trainer tokenizer whose vocabulary differs from the cache's.")
        weights_sha256: str | None = Field(None, description="Also require the cache's teacher-weights hash to be this.")

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.cache: TeacherCache | None = None
        self.tokenizer: Any = None

    @classmethod
    def example_params(cls) -> Params:
        return cls.Params(path="teacher_cache", teacher="tiny-teacher")

    @classmethod
    def contract_params(cls, model_dir: str) -> Params:
        """A cache of the contract suite's batch (made with the suite's in-memory tokenizer) scored by the tiny
        model in ``model_dir``; written next to the model on first use, reused after."""
        from opd_plugins.precompute import cache_teacher_batch
        from opd_plugins.testing.contracts import teacher_batch
        from opd_plugins.testing.models import build_tokenizer

        out = Path(model_dir) / ".offline_cache_contract"
        cache_teacher_batch(teacher_batch(build_tokenizer()), model_dir, out, top_k=4)
        return cls.Params(path=str(out), teacher=model_dir)

    def setup(self, trainer: Any) -> None:
        p = self.params
        self.cache = TeacherCache(p.path)
        recorded = self.cache.manifest["teacher"]
        if not same_teacher_id(recorded, p.teacher):
            raise TeacherError(
                f"teacher offline_cache: the cache at {p.path!r} was made by teacher {recorded['id']!r}, the recipe "
                f"names {p.teacher!r}. Offline OPD needs the teacher that made the cache (teacher consistency); "
                "precompute a cache with this teacher, or set teacher.params.teacher to the cache's teacher"
            )
        if p.weights_sha256 is not None and p.weights_sha256 != recorded["weights_sha256"]:
            raise TeacherError(
                f"teacher offline_cache: the cache at {p.path!r} was made from weights with sha256 "
                f"{recorded['weights_sha256']}, the recipe requires {p.weights_sha256}"
            )
        rollout = getattr(getattr(trainer, "components", None), "rollout", None)
        if rollout is not None:  # fail before the first step, not at it
            self._check_rollout(rollout)
        self.tokenizer = getattr(trainer, "processing_class", None)
        if p.tokenizer_check:
            check_tokenizer(self.cache.manifest, self.tokenizer, p.path, "teacher offline_cache")
        temperature = getattr(trainer, "temperature", None)
        if temperature is not None and abs(float(temperature) - float(recorded["temperature"])) > 1e-6:
            warnings.warn(
                f"teacher offline_cache: the cache was scored at temperature {recorded['temperature']}, the trainer "
                f"samples at {temperature}; the cached teacher keeps its temperature", stacklevel=2,
            )

    def _check_rollout(self, rollout: Any) -> None:
        assert self.cache is not None
        fix = f"set rollout: {{name: replay, params: {{path: {self.params.path}}}}}"
        if rollout.name != "replay":
            raise TeacherError(f"teacher offline_cache scores only the cached rollouts, but the rollout backend is "
                               f"{rollout.name!r}, which samples new ones: {fix}")
        theirs = read_manifest(rollout.params.path)["data"].get("sha256")
        if theirs != self.cache.manifest["data"].get("sha256"):
            raise TeacherError(f"teacher offline_cache reads {self.params.path!r} but rollout replay reads "
                               f"{rollout.params.path!r}, a cache of other rollouts: {fix}")

    def score(self, batch: TeacherBatch, want: Capability = "sampled") -> TeacherScores:
        if self.cache is None:
            raise RuntimeError("offline_cache teacher used before setup()")
        if want == "full":
            raise TeacherError("teacher offline_cache stores top-k and sampled-token log-probs, not the full vocabulary")
        topk = want == "topk"
        B, T = batch.completion_ids.shape
        K = self.cache.top_k
        token_logps, entropy = torch.zeros(B, T), torch.zeros(B, T)
        topk_ids = torch.zeros(B, T, K, dtype=torch.long) if topk else None
        topk_logps = torch.zeros(B, T, K) if topk else None
        filled = torch.zeros(B, T)
        cmask = batch.completion_mask.cpu()
        missing: list[int] = []
        for i in range(B):
            valid = cmask[i].nonzero()
            if valid.numel() == 0:
                continue  # a row with nothing to learn from (e.g. a masked truncated completion)
            L = int(valid[-1]) + 1
            p = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
            c = batch.completion_ids[i, :L].tolist()
            loc = self.cache.find(row_key(p, c))
            if loc is None:
                missing.append(i)
                continue
            row = self.cache.read_row(*loc, topk=topk)
            if row.prompt_ids != p or row.completion_ids != c:
                raise TeacherError(f"teacher offline_cache: cached row {loc} of {self.params.path!r} does not hold the "
                                   "tokens its key names: the cache is corrupt; precompute it again")
            token_logps[i, :L], entropy[i, :L], filled[i, :L] = row.token_logps, row.entropy, 1.0
            if topk:
                topk_ids[i, :L], topk_logps[i, :L] = row.topk_ids, row.topk_logps
        if missing:
            raise TeacherError(self._missing_message(batch, missing))
        mask = cmask.to(torch.float32)
        dev = batch.completion_ids.device
        scores = TeacherScores(token_logps=token_logps * mask, mask=mask, entropy=entropy * filled)
        if topk:
            scores.topk_ids, scores.topk_logps = topk_ids, topk_logps
            scores.topk_mass = topk_logps.exp().sum(-1) * filled
        for name in TeacherScores.TENSOR_FIELDS:
            t = getattr(scores, name)
            if t is not None:
                setattr(scores, name, t.to(dev))
        return scores

    def _missing_message(self, batch: TeacherBatch, missing: list[int]) -> str:
        assert self.cache is not None
        i = missing[0]
        p = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
        why = ("its prompt is cached, this completion is not" if prompt_key(p) in self.cache.prompt_index()
               else "its prompt is not in the cache either")
        text = f" (prompt ...{self.tokenizer.decode(p)[-60:]!r})" if self.tokenizer is not None else ""
        return (f"teacher offline_cache: the cache at {self.params.path!r} has no scores for these tokens: rows "
                f"{missing[:8]} of this batch ({len(missing)} of {batch.completion_ids.shape[0]}); row {i}{text}: {why}. "
                "The rollouts must come from the cache (use rollout: {name: replay, params: {path: <the cache>}}) "
                "and the prompts from the rollout set it was made from")
