"""The teacher-provider contract: one interface over local, self, served, cached and black-box teachers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from opd_plugins.components import Component
from opd_plugins.context import SetupContext
from opd_plugins.errors import OPDError, TeacherError
from opd_plugins.lm_head import LMHead, final_hidden_states, head_scores, whole

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
    head_chunk: int = 0
    """> 0: the consumer computes logits a chunk of tokens at a time (a ``fused_lm_head`` divergence). A local
    teacher may then compute its own scores from its final hidden states, ``head_chunk`` tokens at a time, and
    answer ``want == "full"`` with :attr:`TeacherScores.hidden` and ``lm_head`` instead of ``(B, T, V)``
    log-probs when ``full_as_hidden`` is set too (the trainer sets it for scores used within one micro-batch)."""
    full_as_hidden: bool = False


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
    * ``hidden`` with ``lm_head``: the full vocabulary in factored form, ``log_softmax(lm_head.logits(hidden))``
      with ``hidden`` ``(B, T, H)`` the teacher's final hidden states, a local teacher's answer to ``want ==
      "full"`` when the batch allows it (:attr:`TeacherBatch.full_as_hidden`): a fused divergence computes the
      teacher's log-probs a chunk of tokens at a time from them, so they never exist for a whole micro-batch.
    """

    token_logps: torch.Tensor
    mask: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logps: torch.Tensor | None = None
    topk_mass: torch.Tensor | None = None
    logps: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    ref_token_logps: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    lm_head: LMHead | None = None

    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = (
        "token_logps", "mask", "topk_ids", "topk_logps", "topk_mass", "logps", "entropy", "ref_token_logps", "hidden",
    )

    @property
    def capability(self) -> Capability:
        if self.logps is not None or self.hidden is not None:
            return "full"
        if self.topk_logps is not None:
            return "topk"
        return "sampled"

    def rows(self, index: slice | torch.Tensor) -> "TeacherScores":
        """These scores restricted to some rows (a slice or an index tensor)."""
        return TeacherScores(**{name: None if getattr(self, name) is None else getattr(self, name)[index]
                                for name in self.TENSOR_FIELDS}, lm_head=self.lm_head)

    def to_batch(self, prefix: str = "teacher_") -> dict[str, torch.Tensor]:
        """Flatten into batch-dict entries (first dim B), so TRL shuffles and splits them with the batch."""
        if self.hidden is not None:
            raise TeacherError("teacher scores in hidden-state form (hidden + lm_head) serve the micro-batch they were "
                               "computed for and are not stored in a generation batch")
        return {prefix + k: getattr(self, k) for k in self.TENSOR_FIELDS if getattr(self, k) is not None}

    @classmethod
    def from_batch(cls, batch: dict[str, Any], prefix: str = "teacher_") -> "TeacherScores | None":
        if prefix + "token_logps" not in batch:
            return None
        return cls(**{k: batch[prefix + k] for k in cls.TENSOR_FIELDS if prefix + k in batch})

    def validate(self, batch: TeacherBatch, source: str, *, allow_nonfinite: bool = False) -> int:
        """Check the scores against the batch before anything trains on them; returns how many non-finite
        positions were masked.

        Raises :class:`TeacherError` naming the teacher for: shapes that do not match the completions; log-probs
        that are not floating point (e.g. booleans); non-finite values (NaN/inf in token log-probs, top-k, full
        log-probs, top-k mass, entropy or reference log-probs), unless ``allow_nonfinite``, in which case those
        positions are masked out and counted; and, at the positions that train, implausible values: log-probs
        above 0 or below :data:`MIN_PLAUSIBLE_LOGP`, top-k entries out of order, repeated or negative ids, a
        sampled token among the top-k whose log-prob differs from its top-k entry (or one outside it that beats
        the k-th), a total probability above 1, full log-probs that do not sum to 1, negative entropy.
        """
        check_shapes(self, tuple(batch.completion_ids.shape), source)
        valid = batch.completion_mask.bool().to(self.mask.device) & self.mask.bool()
        bad = nonfinite_positions(self) & valid
        n_bad = int(bad.sum())
        if n_bad:
            if not allow_nonfinite:
                rows = sorted({int(i) for i in bad.nonzero()[:, 0].tolist()})[:8]
                raise TeacherError(
                    f"teacher {source!r} returned {n_bad} non-finite log-probs (NaN/inf) in rows {rows} of this batch. "
                    "Set the teacher param allow_nonfinite: true to mask and count them instead."
                )
            valid = valid & ~bad
            self.mask = valid.to(self.mask.dtype)
            for name in _FLOAT_FIELDS:
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, torch.where(bad.view(*bad.shape, *[1] * (t.dim() - 2)), torch.zeros_like(t), t))
        problem = implausible(self, batch.completion_ids.to(self.token_logps.device), valid)
        if problem:
            raise TeacherError(f"teacher {source!r} returned implausible scores: {problem}. Not training on them: "
                               "the teacher (or its server, or the cache) is broken or misconfigured")
        return n_bad


class Teacher(Component):
    """Base class of teacher providers.

    A provider declares ``capabilities`` (which of ``sampled``, ``topk``, ``full`` it can return). The trainer
    calls :meth:`setup` once with a :class:`~opd_plugins.context.SetupContext` (load models, connect to servers),
    then :meth:`score` on every generation batch with ``want`` set to what the recipe's divergence needs (or, with
    ``scores_any_rows``, on each micro-batch at loss time for a full-vocabulary divergence).
    """

    kind: ClassVar[str] = "teacher"
    capabilities: ClassVar[frozenset[str]] = frozenset({"sampled"})
    scores_any_rows: ClassVar[bool] = False
    """True when :meth:`score` may be called on any subset of a generation batch's rows at any time (a local model):
    the trainer may then score a full-vocabulary divergence's micro-batches at loss time instead of holding
    ``(B, T, V)`` log-probs for the whole generation batch (``OPDConfig.teacher_scoring``)."""

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
    head_chunk: int = 0,
    full_as_hidden: bool = False,
    transient_head: bool = False,
) -> TeacherScores:
    """Score ``completion_ids`` under a causal LM given ``input_ids = [teacher prompt | completion]``.

    The teacher prompt may differ from the student's (privileged context); only the last ``T + 1`` positions'
    logits are computed, in chunks of ``chunk_size`` rows, and nothing larger than ``(chunk, T, V)`` is held
    unless ``want == "full"``.

    With ``head_chunk`` > 0 (:attr:`TeacherBatch.head_chunk`) the model's logits are never formed: its final
    hidden states are taken and the scores computed from them and its linear head ``head_chunk`` tokens at a time,
    and ``want == "full"`` with ``full_as_hidden`` returns ``hidden`` + ``lm_head`` instead of log-probs
    (``transient_head``: the head's weights are swapped out after the call, so they are copied). A model whose
    head is not a plain linear layer (soft-capping, scaling, quantized) is scored from its logits as usual.
    """
    if head_chunk > 0 and (want != "full" or full_as_hidden):
        hidden = _hidden_scores(model, input_ids, attention_mask, completion_ids, completion_mask, want=want,
                                temperature=temperature, top_k=top_k, chunk_size=chunk_size, head_chunk=head_chunk,
                                transient_head=transient_head)
        if hidden is not None:
            return hidden
    T = completion_ids.shape[1]
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("token_logps", "entropy", "topk_ids", "topk_logps", "topk_mass", "logps")}
    for start in range(0, input_ids.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        # The last token is never an input of a prediction we need: dropping it makes the T kept positions exactly
        # the model's output (contiguous, so nothing copies it), and one (chunk, T, V) tensor is all that is held.
        logps = model(input_ids=input_ids[sl, :-1], attention_mask=attention_mask[sl, :-1], logits_to_keep=T).logits
        logps = logps.float()
        for row in logps:  # log-softmax in place, a row at a time: (T, V) temporaries only
            if temperature != 1.0:
                row.div_(temperature)
            row.sub_(torch.logsumexp(row, dim=-1, keepdim=True))
        out["token_logps"].append(logps.gather(-1, completion_ids[sl].unsqueeze(-1)).squeeze(-1))
        out["entropy"].append(torch.stack([-(row.exp() * row).sum(-1) for row in logps]))
        if want == "topk" or top_k > 0:
            k = top_k if top_k > 0 else 1
            vals, ids = logps.topk(k, dim=-1)
            out["topk_ids"].append(ids)
            out["topk_logps"].append(vals)
            out["topk_mass"].append(vals.exp().sum(-1))
        if want == "full":
            out["logps"].append(logps)
    mask = completion_mask.to(torch.float32)
    cat = {k: (torch.cat(v) if len(v) > 1 else v[0] if v else None) for k, v in out.items()}  # one chunk: no copy
    cat["token_logps"] = cat["token_logps"] * mask
    return TeacherScores(mask=mask, **cat)


def _hidden_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   completion_ids: torch.Tensor, completion_mask: torch.Tensor, *, want: Capability,
                   temperature: float, top_k: int, chunk_size: int, head_chunk: int,
                   transient_head: bool) -> TeacherScores | None:
    """:func:`score_with_causal_lm` from final hidden states and the linear head (None: the head is not one)."""
    T = completion_ids.shape[1]
    k = top_k if top_k > 0 else (1 if want == "topk" else 0)
    parts: dict[str, list[torch.Tensor]] = {}
    head = None
    for start in range(0, input_ids.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        try:
            hidden, layer = final_hidden_states(model, model, input_ids[sl], attention_mask[sl], T + 1)
        except OPDError:
            return None  # not a plain linear head: the logits path
        if head is None:
            weight, bias = whole(layer.weight).detach(), whole(layer.bias)
            bias = None if bias is None else bias.detach()
            if transient_head:
                weight, bias = weight.clone(), None if bias is None else bias.clone()
            head = LMHead(weight, bias, temperature)
        hidden = hidden[:, :-1].detach()
        for name, value in head_scores(hidden, head, completion_ids[sl], head_chunk, top_k=k).items():
            parts.setdefault(name, []).append(value)
        if want == "full":
            parts.setdefault("hidden", []).append(hidden)
    cat = {name: torch.cat(v) if len(v) > 1 else v[0] for name, v in parts.items()}
    mask = completion_mask.to(torch.float32)
    cat["token_logps"] = cat["token_logps"] * mask
    return TeacherScores(mask=mask, lm_head=head if want == "full" else None, **cat)


# ---------------------------------------------------------------------------------------------------------------
# Checks of teacher scores (TeacherScores.validate)
# ---------------------------------------------------------------------------------------------------------------

LOGP_TOLERANCE = 1e-3
"""How far above 0 a log-prob may round (float16/bfloat16 storage and reductions)."""
MIN_PLAUSIBLE_LOGP = -1e4
"""The lowest log-prob believed: float32 ``exp`` is 0 below about -104, so lower values are sentinels (−1e30 for
"masked"), not probabilities."""
MASS_TOLERANCE = 1e-2
"""How far above 1 a total probability (top-k mass, sampled token plus top-k) may round."""

_FLOAT_FIELDS = ("token_logps", "topk_logps", "topk_mass", "logps", "entropy", "ref_token_logps", "hidden")


def check_shapes(scores: TeacherScores, expected: tuple[int, ...], source: str) -> None:
    """:class:`TeacherError` unless every tensor is aligned with completions of shape ``expected`` ``(B, T)``,
    log-probs are floating point and top-k ids are integers of the top-k's shape."""
    if tuple(scores.token_logps.shape) != expected:
        raise TeacherError(
            f"teacher {source!r} returned token log-probs of shape {tuple(scores.token_logps.shape)} for "
            f"completions of shape {expected} (batch size, completion length): misaligned teacher data"
        )
    if (scores.hidden is None) != (scores.lm_head is None):
        raise TeacherError(f"teacher {source!r} returned {'hidden states' if scores.lm_head is None else 'an lm head'} "
                           f"without the matching {'lm_head' if scores.lm_head is None else 'hidden states'}")
    if scores.hidden is not None and scores.hidden.shape[-1] != scores.lm_head.weight.shape[-1]:
        raise TeacherError(f"teacher {source!r} returned hidden states of size {scores.hidden.shape[-1]} for an lm "
                           f"head of weight {tuple(scores.lm_head.weight.shape)}")
    for name in ("topk_logps", "topk_ids", "logps", "hidden"):
        t = getattr(scores, name)
        if t is not None and (t.dim() != 3 or tuple(t.shape[:2]) != expected):
            raise TeacherError(f"teacher {source!r} returned {name} of shape {tuple(t.shape)}; expected {expected} "
                               "+ (K, V or H,)")
    for name in ("mask", "topk_mass", "entropy", "ref_token_logps"):
        t = getattr(scores, name)
        if t is not None and tuple(t.shape) != expected:
            raise TeacherError(f"teacher {source!r} returned {name} of shape {tuple(t.shape)}; expected {expected}")
    for name in _FLOAT_FIELDS:
        t = getattr(scores, name)
        if t is not None and not t.is_floating_point():
            raise TeacherError(f"teacher {source!r} returned {name} of dtype {t.dtype}; log-probs must be floating "
                               "point numbers (not booleans or integers)")
    if (scores.topk_ids is None) != (scores.topk_logps is None):
        raise TeacherError(f"teacher {source!r} returned top-k {'ids' if scores.topk_logps is None else 'log-probs'} "
                           "without the matching top-k " + ("log-probs" if scores.topk_logps is None else "ids"))
    if scores.topk_ids is not None:
        if scores.topk_ids.is_floating_point() or scores.topk_ids.dtype == torch.bool:
            raise TeacherError(f"teacher {source!r} returned topk_ids of dtype {scores.topk_ids.dtype}; token ids "
                               "must be integers")
        if scores.topk_ids.shape != scores.topk_logps.shape:
            raise TeacherError(f"teacher {source!r} returned topk_ids of shape {tuple(scores.topk_ids.shape)} and "
                               f"topk_logps of shape {tuple(scores.topk_logps.shape)}")


def nonfinite_positions(scores: TeacherScores) -> torch.Tensor:
    """``(B, T)`` positions where any score is NaN or infinite."""
    bad = torch.zeros_like(scores.mask, dtype=torch.bool)
    for name in _FLOAT_FIELDS:
        t = getattr(scores, name)
        if t is not None:
            if t.dim() > 2:  # a row at a time: no (B, T, V) temporary beside a full-vocabulary tensor
                bad |= ~torch.stack([torch.isfinite(row).flatten(1).all(-1) for row in t])
            else:
                bad |= ~torch.isfinite(t)
    return bad


def implausible(scores: TeacherScores, completion_ids: torch.Tensor, valid: torch.Tensor) -> str | None:
    """What is implausible about the scores at the ``valid`` positions (first problem found), or None."""
    tol = LOGP_TOLERANCE
    token = scores.token_logps.float()
    checks: list[tuple[str, torch.Tensor, torch.Tensor | None]] = [
        ("a token log-prob above 0 (a probability above 1)", token > tol, token),
        (f"a token log-prob below {MIN_PLAUSIBLE_LOGP:g} (a sentinel, not a log-prob)", token < MIN_PLAUSIBLE_LOGP,
         token),
    ]
    if scores.ref_token_logps is not None:
        ref = scores.ref_token_logps.float()
        checks.append(("a reference log-prob above 0", ref > tol, ref))
    if scores.entropy is not None:
        checks.append(("a negative entropy", scores.entropy.float() < -tol, scores.entropy.float()))
    if scores.topk_logps is not None and scores.topk_logps.shape[-1] > 0:
        top = scores.topk_logps.float()
        ids = scores.topk_ids.to(completion_ids.device)
        checks += [
            ("a top-k log-prob above 0", (top > tol).any(-1), top.amax(-1)),
            (f"a top-k log-prob below {MIN_PLAUSIBLE_LOGP:g}", (top < MIN_PLAUSIBLE_LOGP).any(-1), top.amin(-1)),
            ("top-k entries not sorted best first", (top[..., 1:] - top[..., :-1] > tol).any(-1), None),
            ("a negative top-k token id", (ids < 0).any(-1), None),
        ]
        ordered = ids.sort(-1).values
        checks.append(("the same token id twice in one position's top-k", (ordered[..., 1:] == ordered[..., :-1])
                       .any(-1), None))
        hit = ids == completion_ids.unsqueeze(-1)
        among = hit.any(-1)
        at_hit = torch.where(hit, top, torch.zeros_like(top)).sum(-1)
        slack = tol + 2e-3 * token.abs()  # float16 top-k storage: |error| <= |logp| * 2^-11
        checks.append(("the sampled token's log-prob differs from its own top-k entry",
                       among & ((at_hit - token).abs() > slack), token))
        checks.append(("the sampled token is outside the top-k but more likely than the k-th entry",
                       ~among & (token > top[..., -1] + slack), token))
        mass = top.exp().sum(-1) + torch.where(among, torch.zeros_like(token), token.exp())
        checks.append(("top-k probabilities (with the sampled token) that sum to more than 1",
                       mass > 1 + MASS_TOLERANCE, mass))
    if scores.topk_mass is not None:
        m = scores.topk_mass.float()
        checks.append(("a top-k mass outside [0, 1]", (m < -tol) | (m > 1 + MASS_TOLERANCE), m))
    if scores.logps is not None:
        full = scores.logps
        total = torch.stack([torch.logsumexp(row.float(), -1) for row in full])  # (T, V) temporaries only
        checks.append(("full-vocabulary log-probs that do not sum to probability 1", (total.abs() > 1e-2), total.exp()))
        gathered = full.gather(-1, completion_ids.clamp(0, full.shape[-1] - 1).unsqueeze(-1)).squeeze(-1).float()
        checks.append(("token log-probs that differ from the full-vocabulary log-probs of the same tokens",
                       (gathered - token).abs() > tol + 1e-3 * token.abs(), token))
    for what, flagged, values in checks:
        flagged = flagged & valid
        if bool(flagged.any()):
            row, pos = (int(i) for i in flagged.nonzero()[0].tolist())
            shown = f" (= {float(values[row, pos]):.6g})" if values is not None else ""
            return (f"{what} at row {row}, completion position {pos}{shown}; {int(flagged.sum())} such position"
                    f"{'s' if int(flagged.sum()) != 1 else ''} in this batch")
    return None
