"""``offline_cache``: teacher log-probs precomputed once on a fixed rollout set (Lightning OPD, offline OPD).

The cache is written by ``opd-plugins precompute-teacher``; its format, reader and writer live in
:mod:`opd_plugins.teachers.cache`. Paper: Lightning OPD (offline on-policy distillation),
https://github.com/jet-ai-projects/Lightning-OPD
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from pydantic import Field

from opd_plugins.components import ComponentParams
from opd_plugins.context import SetupContext
from opd_plugins.errors import TeacherError
from opd_plugins.teachers.base import Capability, Teacher, TeacherBatch, TeacherScores
from opd_plugins.teachers.cache.format import (  # noqa: F401 - re-exported: the names this module always had
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    CachedRow,
    TeacherCache,
    check_tokenizer,
    data_sha256,
    prompt_key,
    read_manifest,
    row_key,
    same_teacher_id,
    tokenizer_sha256,
)


class OfflineCacheTeacher(Teacher):
    """Teacher scores read from a precomputed cache; no teacher model is loaded (offline OPD, Lightning OPD).

    Looks up every completion by the sha256 of its exact prompt and completion token ids and returns the
    cached sampled-token log-probs, top-k and entropy. Train on the cached rollouts (``rollout: replay``): a
    completion the cache does not hold is an error, never a silent zero. ``teacher`` must name the teacher that
    made the cache, and when the cache records the teacher whose outputs the student was fine-tuned on
    (``precompute-teacher --sft-teacher``), that must be the same teacher: together, Lightning OPD's
    teacher-consistency condition, under which offline OPD keeps the optimum of standard OPD. A cache that does not
    record it is used with a warning (``require_provenance: true`` refuses it); the record is what the user
    declared, which the cache cannot verify. The trainer's tokenizer must be the one the cache was tokenized with.
    Every shard is checked against the sha256 the manifest records before it is read, and the scores are checked
    like any teacher's (:meth:`~opd_plugins.teachers.base.TeacherScores.validate`).
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
        require_provenance: bool = Field(False, description="Refuse a cache that does not record the SFT teacher "
                                         "(precompute-teacher --sft-teacher) instead of warning.")

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.cache: TeacherCache | None = None
        self.tokenizer: Any = None

    @classmethod
    def example_params(cls) -> Params:
        return cls.Params(path="teacher_cache", teacher="tiny-teacher")

    def setup(self, ctx: SetupContext) -> None:
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
        self._check_provenance()
        rollout = ctx.peers.get("rollout")
        if rollout is not None:  # fail before the first step, not at it
            self._check_rollout(rollout)
        self.tokenizer = ctx.tokenizer
        if p.tokenizer_check:
            check_tokenizer(self.cache.manifest, self.tokenizer, p.path, "teacher offline_cache")
        temperature = ctx.temperature
        if temperature is not None and abs(float(temperature) - float(recorded["temperature"])) > 1e-6:
            warnings.warn(
                f"teacher offline_cache: the cache was scored at temperature {recorded['temperature']}, the trainer "
                f"samples at {temperature}; the cached teacher keeps its temperature", stacklevel=2,
            )

    def _check_provenance(self) -> None:
        """Lightning OPD's condition: the teacher that produced the student's SFT data is the OPD teacher."""
        assert self.cache is not None
        p = self.params
        sft = (self.cache.manifest.get("provenance") or {}).get("sft_teacher")
        if sft is None:
            message = (f"teacher offline_cache: the cache at {p.path!r} does not record which teacher produced the "
                       "student's SFT data, so Lightning OPD's teacher-consistency condition (the SFT teacher is the "
                       f"OPD teacher, {p.teacher!r}) is not checked; record it with precompute-teacher --sft-teacher "
                       "MODEL")
            if p.require_provenance:
                raise TeacherError(message + " (require_provenance: true)")
            warnings.warn(message + ", or set require_provenance: true to refuse such caches", stacklevel=3)
            return
        if not same_teacher_id(sft, p.teacher):
            raise TeacherError(
                f"teacher offline_cache: the student was fine-tuned on outputs of {sft['id']!r} (the cache's "
                f"provenance), but the recipe distils from {p.teacher!r}. Lightning OPD keeps the optimum of standard "
                "OPD only when the SFT teacher is the OPD teacher: distil from the SFT teacher, or fine-tune the "
                "student on this teacher's outputs first")

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
