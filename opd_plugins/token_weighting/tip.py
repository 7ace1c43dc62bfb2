"""``tip``: TIP token selection by student entropy and teacher–student divergence."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator

from opd_plugins.components import ComponentParams
from opd_plugins.divergences.base import StudentOutputs
from opd_plugins.teachers.base import TeacherScores
from opd_plugins.token_weighting._common import (
    has_full_vocab, require_teacher, student_entropy, token_divergence, valid_tokens,
)
from opd_plugins.token_weighting.base import TokenWeighting

Quadrant = Literal[
    "high_entropy_high_divergence", "high_entropy_low_divergence",
    "low_entropy_high_divergence", "low_entropy_low_divergence",
]


class TIP(TokenWeighting):
    """Keeps the informative tokens of a rollout and masks the rest (weight 1 or 0).

    TIP (Xu et al. 2026, "Token Importance in On-Policy Distillation", https://arxiv.org/abs/2604.14084) sorts
    completion tokens on two axes: the student's entropy H_t and the teacher–student divergence D_t. Informative
    tokens are the high-entropy ones and the low-entropy, high-divergence ones (the paper's Q3: the student is
    confident and wrong). Two rules:

    * ``keep: fraction`` keeps ``fraction`` of the micro-batch's valid tokens (``ceil``), chosen by ``score``:
      ``entropy`` (default, the paper's first-order rule; 50% matches all-token OPD), ``divergence``, or
      ``entropy_or_divergence``: the larger of the token's two percentile ranks (high on either axis; this
      combination is ours, not the paper's). ``selection: sample`` (default) is the paper's entropy-based
      sampling: tokens drawn without replacement with probability proportional to the score (Efraimidis–Spirakis
      keys ``log(u)/score``, seeded by ``seed``, reproducible across a resume); ``selection: topk`` keeps the
      highest scores deterministically (ties broken by position).
    * ``keep: quadrant`` keeps the tokens in ``quadrants``; "high" means strictly above the threshold, which is
      the median over the micro-batch's valid tokens unless set. The default, ``low_entropy_high_divergence``,
      is Q3-only training (under 10% of tokens nearly matches full-token OPD in the paper).

    H_t is the exact entropy: from the student logits (full-vocabulary divergences), else from the student's
    forward, which computes it when this weighting is on (TRL's policy-gradient forward, the divergence's own
    forward, or the fused lm head's chunks). Only ``statistics: sampled`` (or a caller that gives neither logits
    nor entropies) uses the surprisal ``−log π_s(x_t)``, an unbiased one-sample estimate of H_t but a noisy ranking
    key. D_t is the exact per-position KL(student ‖ teacher) when the student logits and the teacher's full
    log-probs are present, else ``|log π_s(x_t) − log π_t(x_t)|``. The kept share is reported in ``last_stats``.

    Scope and cost: the fraction and the medians are taken over each micro-batch (as TRL's
    ``top_entropy_quantile``), so the kept share is exact per micro-batch and hence over the step; a token's rank
    is relative to its micro-batch, not to the whole generation batch. The mask multiplies the per-token
    divergence after the student's forward and backward have run on every token (the causal forward needs the
    masked tokens as context), so there is **no memory saving**: peak memory is that of all-token OPD (the paper
    reports up to 47% less, from skipping the masked tokens' work).
    """

    name: ClassVar[str] = "tip"

    class Params(ComponentParams):
        keep: Literal["fraction", "quadrant"] = Field(
            "fraction", description="Keep a fraction of tokens chosen by `score`, or entropy × divergence quadrants.")
        fraction: float = Field(
            0.5, gt=0, le=1, description="keep=fraction: share of the micro-batch's valid tokens kept.")
        score: Literal["entropy", "divergence", "entropy_or_divergence"] = Field(
            "entropy",
            description="keep=fraction: rank by entropy (the paper's rule), by divergence, or by the larger of their "
                        "percentile ranks.")
        selection: Literal["sample", "topk"] = Field(
            "sample", description="keep=fraction: sample tokens with probability ∝ score, without replacement (the "
                                  "paper's entropy-based sampling), or keep the top scores.")
        seed: int = Field(0, description="selection=sample: seed of the token draws.")
        quadrants: list[Quadrant] = Field(
            default_factory=lambda: ["low_entropy_high_divergence"], min_length=1,
            description="keep=quadrant: quadrants kept (low_entropy_high_divergence is the paper's Q3).")
        entropy_threshold: float | None = Field(
            None, ge=0, description="keep=quadrant: entropy (nats) above which a token is high-entropy; null = median.")
        divergence_threshold: float | None = Field(
            None, ge=0, description="keep=quadrant: divergence (nats) above which a token is high; null = median.")
        statistics: Literal["auto", "sampled"] = Field(
            "auto", description="auto: exact entropy/KL when full-vocabulary data is present; sampled: estimates.")
        rescale: bool = Field(
            False, description="Scale kept tokens by valid/kept, keeping the loss size (the normaliser counts all).")

        @field_validator("quadrants")
        @classmethod
        def _unique(cls, v: list[str]) -> list[str]:
            if len(set(v)) != len(v):
                raise ValueError(f"quadrants must not repeat: {v}")
            return v

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.last_stats: dict[str, float] = {}
        self.draws = 0  # micro-batches sampled so far: the seed of the next draw

    def _needs_divergence(self) -> bool:
        return self.params.keep == "quadrant" or self.params.score != "entropy"

    def needs_entropy(self) -> bool:
        return self.params.statistics == "auto" and (self.params.keep == "quadrant" or self.params.score != "divergence")

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws, **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.draws = int(state.pop("draws", 0))
        super().load_state_dict(state)

    def token_statistics(self, student: StudentOutputs,
                         teacher: TeacherScores | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, T)`` student entropy and, when the rule needs it, teacher–student divergence."""
        auto = self.params.statistics == "auto"
        if auto and student.entropy is not None:
            entropy = student.entropy.float()
        elif auto and student.logits is not None:
            entropy = student_entropy(student.logits)
        else:
            entropy = -student.token_logps.float()
        if not self._needs_divergence():
            return entropy, None
        teacher = require_teacher(teacher, self.name, f"keep={self.params.keep}, score={self.params.score}")
        full = self.params.statistics == "auto" and has_full_vocab(student, teacher)
        return entropy, token_divergence(student, teacher, full=full).abs()

    def weights(self, inputs: dict[str, Any], student: StudentOutputs, teacher: TeacherScores | None) -> torch.Tensor:
        valid = valid_tokens(student, teacher)
        entropy, divergence = self.token_statistics(student, teacher)
        n = int(valid.sum())
        kept = torch.zeros_like(valid)
        stats: dict[str, float] = {}
        if n:
            h = entropy[valid]
            d = divergence[valid] if divergence is not None else None
            if self.params.keep == "fraction":
                chosen = self._top_fraction(h, d)
            else:
                chosen, stats = self._quadrants(h, d)
            kept[valid] = chosen
        n_kept = int(kept.sum())
        w = kept.to(student.token_logps.dtype)
        if self.params.rescale and n_kept:
            w = w * (n / n_kept)
        self.last_stats = {"kept_fraction": n_kept / n if n else 0.0, "kept_tokens": float(n_kept),
                           "valid_tokens": float(n), **stats}
        return w

    def _top_fraction(self, h: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:
        if self.params.score == "entropy_or_divergence":
            score = torch.maximum(_percentile_rank(h), _percentile_rank(d))
        else:
            score = h if self.params.score == "entropy" else d
        k = max(1, math.ceil(self.params.fraction * h.numel() - 1e-9))
        if self.params.selection == "sample":
            score = _sampling_keys(score.float(), self.params.seed, self.draws)
            self.draws += 1
        chosen = torch.zeros(h.numel(), dtype=torch.bool, device=h.device)
        chosen[torch.argsort(score, descending=True, stable=True)[:k]] = True
        return chosen

    def _quadrants(self, h: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        p = self.params
        h_thr = p.entropy_threshold if p.entropy_threshold is not None else _median(h)
        d_thr = p.divergence_threshold if p.divergence_threshold is not None else _median(d)
        high_h, high_d = h > h_thr, d > d_thr
        members = {
            "high_entropy_high_divergence": high_h & high_d, "high_entropy_low_divergence": high_h & ~high_d,
            "low_entropy_high_divergence": ~high_h & high_d, "low_entropy_low_divergence": ~high_h & ~high_d,
        }
        chosen = torch.zeros_like(high_h)
        for q in p.quadrants:
            chosen |= members[q]
        stats = {f"fraction/{q}": float(m.float().mean()) for q, m in members.items()}
        stats.update(entropy_threshold=h_thr, divergence_threshold=d_thr)
        return chosen, stats


def _sampling_keys(weights: torch.Tensor, seed: int, draw: int) -> torch.Tensor:
    """Efraimidis–Spirakis keys ``log(u) / w`` (u ~ U(0, 1)): the top k of them are k items drawn without
    replacement with probability proportional to ``w`` (items with ``w = 0`` come last, in position order)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + draw) % (2**63))
    u = torch.rand(weights.shape, generator=generator, dtype=torch.float64).clamp(min=1e-300).to(weights.device)
    w = weights.double().clamp(min=0)
    return torch.where(w > 0, u.log() / w.clamp(min=1e-300), torch.full_like(w, -math.inf))


def _percentile_rank(x: torch.Tensor) -> torch.Tensor:
    """Rank of each value in [0, 1] (0 = smallest; ties in position order)."""
    n = x.numel()
    ranks = torch.empty(n, dtype=torch.float32, device=x.device)
    ranks[torch.argsort(x, stable=True)] = torch.arange(n, dtype=torch.float32, device=x.device)
    return ranks / max(n - 1, 1)


def _median(x: torch.Tensor) -> float:
    """Median, averaging the two middle values of an even count (torch.median takes the lower one)."""
    v = x.sort().values
    n = v.numel()
    return float((v[(n - 1) // 2] + v[n // 2]) / 2)
