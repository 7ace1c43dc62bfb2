"""The teacher-provider contract: one interface over local, self, served, cached and black-box teachers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from opd_plugins.components import Component
from opd_plugins.context import SetupContext
from opd_plugins.errors import TeacherError

Capability = Literal["sampled", "topk", "full", "text"]
CAPABILITY_ORDER: dict[str, int] = {"sampled": 0, "topk": 1, "full": 2}
"""Token-level capabilities, weakest first. ``text`` (a teacher that only returns response text, e.g. SODA's
black-box teacher) is deliberately not in this order: it gives no token scores at all, so it can serve no
token-level divergence and only a preference objective (``divergence.preference``) asks for it."""


@dataclass
class TeacherBatch:
    """What a teacher scores: the student's completions and the rows they came from.

    ``prompt_ids``/``prompt_mask`` are left-padded ``(B, P)``; ``completion_ids``/``completion_mask`` are
    right-padded ``(B, T)``. ``prompts`` are the prompts the student saw (conversational or text) and ``rows``
    the dataset rows (``answer``, ``hint`` and any other column a privileged-context teacher needs).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    prompts: list[Any] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TeacherScores:
    """A teacher's view of the student's completion tokens, aligned with ``completion_ids`` ``(B, T)``.

    * ``token_logps``: log-prob of each sampled completion token under the teacher (always present).
    * ``topk_ids``/``topk_logps``: ``(B, T, K)``, when the teacher gives top-k (``topk_mass`` is their total).
    * ``logps``: ``(B, T, V)`` full-vocabulary log-probs, when the teacher gives them.
    * ``entropy``: ``(B, T)`` teacher entropy (full vocab, or over the top-k), a cheap reliability statistic.
    * ``mask``: ``(B, T)`` positions with valid teacher data (the completion mask unless the teacher masks more).
    * ``ref_token_logps``: ``(B, T)`` log-prob of each sampled token under a *reference* policy, when the divergence
      names one (``g_opd``'s ``reference``: ExOPD's π_ref); the trainer fills it from the reference teacher.
    """

    token_logps: torch.Tensor
    mask: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logps: torch.Tensor | None = None
    topk_mass: torch.Tensor | None = None
    logps: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    ref_token_logps: torch.Tensor | None = None

    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = (
        "token_logps", "mask", "topk_ids", "topk_logps", "topk_mass", "logps", "entropy", "ref_token_logps",
    )

    @property
    def capability(self) -> Capability:
        if self.logps is not None:
            return "full"
        if self.topk_logps is not None:
            return "topk"
        return "sampled"

    def to_batch(self, prefix: str = "teacher_") -> dict[str, torch.Tensor]:
        """Flatten into batch-dict entries (first dim B), so TRL shuffles and splits them with the batch."""
        return {prefix + k: getattr(self, k) for k in self.TENSOR_FIELDS if getattr(self, k) is not None}

    @classmethod
    def from_batch(cls, batch: dict[str, Any], prefix: str = "teacher_") -> "TeacherScores | None":
        if prefix + "token_logps" not in batch:
            return None
        return cls(**{k: batch[prefix + k] for k in cls.TENSOR_FIELDS if prefix + k in batch})

    def validate(self, batch: TeacherBatch, source: str, *, allow_nonfinite: bool = False) -> int:
        """Check shapes and finiteness against the batch; returns how many non-finite positions were masked.

        Never lets missing, misaligned or NaN teacher data reach the loss silently: a mismatch raises
        :class:`TeacherError` naming the teacher; non-finite values raise unless ``allow_nonfinite``, in which
        case those positions are masked out and counted.
        """
        expected = tuple(batch.completion_ids.shape)
        if tuple(self.token_logps.shape) != expected:
            raise TeacherError(
                f"teacher {source!r} returned token log-probs of shape {tuple(self.token_logps.shape)} for "
                f"completions of shape {expected} (batch size, completion length): misaligned teacher data"
            )
        for name in ("topk_logps", "topk_ids", "logps"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape[:2]) != expected:
                raise TeacherError(f"teacher {source!r} returned {name} of shape {tuple(t.shape)}; expected {expected} + (K or V,)")
        valid = batch.completion_mask.bool() & self.mask.bool()
        bad = ~torch.isfinite(self.token_logps) & valid
        if self.logps is not None:
            bad |= ~torch.isfinite(self.logps).all(-1) & valid
        n_bad = int(bad.sum())
        if n_bad:
            if not allow_nonfinite:
                rows = sorted({int(i) for i in bad.nonzero()[:, 0].tolist()})[:8]
                raise TeacherError(
                    f"teacher {source!r} returned {n_bad} non-finite log-probs (NaN/inf) in rows {rows} of this batch. "
                    "Set the teacher param allow_nonfinite: true to mask and count them instead."
                )
            self.mask = (valid & ~bad).to(self.mask.dtype)
            self.token_logps = torch.where(bad, torch.zeros_like(self.token_logps), self.token_logps)
            if self.logps is not None:
                self.logps = torch.where(bad.unsqueeze(-1), torch.zeros_like(self.logps), self.logps)
        return n_bad


class Teacher(Component):
    """Base class of teacher providers.

    A provider declares ``capabilities`` (which of ``sampled``, ``topk``, ``full`` it can return). The trainer
    calls :meth:`setup` once with a :class:`~opd_plugins.context.SetupContext` (load models, connect to servers),
    then :meth:`score` on every generation batch with ``want`` set to what the recipe's divergence needs.
    """

    kind: ClassVar[str] = "teacher"
    capabilities: ClassVar[frozenset[str]] = frozenset({"sampled"})

    def setup(self, ctx: SetupContext) -> None:
        """Prepare for scoring (called once, on every rank, after the trainer is built)."""

    def score(self, batch: TeacherBatch, want: Capability = "sampled") -> TeacherScores:
        raise NotImplementedError

    def required_columns(self) -> tuple[str, ...]:
        """Dataset columns this teacher reads from ``TeacherBatch.rows`` (checked before training)."""
        return ()


@torch.no_grad()
def score_with_causal_lm(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    want: Capability = "sampled",
    temperature: float = 1.0,
    top_k: int = 0,
    chunk_size: int = 8,
) -> TeacherScores:
    """Score ``completion_ids`` under a causal LM given ``input_ids = [teacher prompt | completion]``.

    The teacher prompt may differ from the student's (privileged context); only the last ``T + 1`` positions'
    logits are computed, in chunks of ``chunk_size`` rows, and nothing larger than ``(chunk, T, V)`` is held
    unless ``want == "full"``.
    """
    T = completion_ids.shape[1]
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("token_logps", "entropy", "topk_ids", "topk_logps", "topk_mass", "logps")}
    for start in range(0, input_ids.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        logits = model(input_ids=input_ids[sl], attention_mask=attention_mask[sl], logits_to_keep=T + 1).logits
        logits = logits[:, -(T + 1):-1].float() / temperature
        logps = torch.log_softmax(logits, dim=-1)
        out["token_logps"].append(logps.gather(-1, completion_ids[sl].unsqueeze(-1)).squeeze(-1))
        out["entropy"].append(-(logps.exp() * logps).sum(-1))
        if want == "topk" or top_k > 0:
            k = top_k if top_k > 0 else 1
            vals, ids = logps.topk(k, dim=-1)
            out["topk_ids"].append(ids)
            out["topk_logps"].append(vals)
            out["topk_mass"].append(vals.exp().sum(-1))
        if want == "full":
            out["logps"].append(logps)
    mask = completion_mask.to(torch.float32)
    cat = {k: (torch.cat(v) if v else None) for k, v in out.items()}
    cat["token_logps"] = cat["token_logps"] * mask
    return TeacherScores(mask=mask, **cat)
