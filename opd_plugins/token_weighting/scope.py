"""``scope``: SCOPE's dual-path, perplexity-based rollout weights with per-prompt-group normalisation."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from opd_plugins.components import ComponentParams
from opd_plugins.divergences.base import StudentOutputs
from opd_plugins.errors import OPDError
from opd_plugins.teachers.base import TeacherScores
from opd_plugins.token_weighting._common import (
    require_rewards, require_teacher, row_mean, split_by_reward, valid_tokens,
)
from opd_plugins.token_weighting.base import GenerationBatch, TokenWeighting


class Scope(TokenWeighting):
    """Per-rollout weights routed by correctness (SCOPE, Zheng et al. 2026, https://arxiv.org/abs/2604.10688).

    * **Incorrect** rollouts (reward < ``threshold``) are weighted by the teacher's perplexity on them,
      ``PPL_T = exp(mean teacher NLL of the sampled tokens)``: a low perplexity means the teacher can really
      correct this trajectory, so it weighs more; unreliable guidance weighs less.
    * **Correct** rollouts are weighted by the student's perplexity ``PPL_S``: low-confidence correct rollouts, at
      the capability boundary, weigh more than mastered ones.
    * **Group normalisation**: within each prompt group and path, ``w_i = n · softmax_j(s_j / τ)_i`` with
      ``s = −log PPL_T`` (incorrect) or ``s = +log PPL_S`` (correct), so the weights of a path average 1 inside
      each group and ``temperature`` (τ) sets how sharp they are. The paper states the group normalisation and
      τ; this exact softmax form is our reading of it (the catalog marks it inferred).

    Differences from the paper: SCOPE trains correct rollouts with a perplexity-weighted MLE term, not the
    divergence. A token weighting can only scale the recipe's divergence, so ``correct: student_perplexity``
    weights the divergence on correct rollouts (``skip`` drops them, leaving them to the policy gradient).

    Groups: the weights are computed once per generation batch (:meth:`prepare`), on whole prompt groups across all
    ranks, before TRL shuffles the batch and splits it into micro-batches (``group_by: prompt``, default; the
    group of a row is its prompt's group of ``num_generations`` rollouts), or over the whole generation batch per
    path (``group_by: batch``). Called without a prepared batch (outside the trainer), :meth:`weights` groups the
    rows of the micro-batch it is given by identical prompt tokens. Unscored rollouts (reward NaN) get weight 0
    (``unscored: skip``) or 1 (``distill``).
    """

    name: ClassVar[str] = "scope"
    needs_rewards: ClassVar[bool] = True

    class Params(ComponentParams):
        threshold: float = Field(1.0, description="A rollout is correct when its total reward is >= threshold.")
        temperature: float = Field(1.0, gt=0, description="Softmax temperature τ of the group normalisation.")
        group_by: Literal["prompt", "batch"] = Field(
            "prompt", description="Normalise within rows sharing a prompt, or over the whole micro-batch.")
        correct: Literal["student_perplexity", "skip"] = Field(
            "student_perplexity", description="Correct rollouts: weight by student perplexity, or weight 0.")
        unscored: Literal["skip", "distill"] = Field(
            "skip", description="Rollouts with no reward (NaN): skip (weight 0) or distill (weight 1).")

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.last_stats: dict[str, float] = {}
        self._warned = False

    @classmethod
    def example_params(cls) -> Params:
        """Both paths on rewards in [0, 1]; one group, since a bare weights() call may carry no prompt_ids."""
        return cls.Params(threshold=0.5, group_by="batch")

    def groups(self, inputs: dict[str, Any], batch_size: int, device: torch.device) -> torch.Tensor:
        """``(B,)`` group index of each row."""
        if self.params.group_by == "batch":
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        if "prompt_ids" not in inputs:
            raise OPDError(f"token weighting {self.name!r} with group_by=prompt needs inputs['prompt_ids'] to find "
                           "each rollout's prompt group; set group_by: batch to normalise over the micro-batch")
        ids = inputs["prompt_ids"]
        if "prompt_mask" in inputs:
            ids = torch.where(inputs["prompt_mask"].bool(), ids, torch.full_like(ids, -1))
        return torch.unique(ids, dim=0, return_inverse=True)[1].to(device)

    def _row_weights(self, rewards, teacher_logps, student_logps, valid, groups) -> tuple[torch.Tensor, dict]:
        """``(N,)`` row weights from per-token log-probs ``(N, T)`` and each row's group key."""
        correct, incorrect, unscored = split_by_reward(rewards, self.params.threshold)
        if bool(unscored.all()) and not self._warned:
            self._warned = True
            warnings.warn(f"token weighting {self.name!r} got a batch with no scored rollout (every reward is NaN); "
                          "is there a reward function?", stacklevel=2)
        teacher_nll = -row_mean(teacher_logps.float(), valid)
        student_nll = -row_mean(student_logps.float(), valid)
        return self._from_row_stats(rewards, teacher_nll, student_nll, valid.any(1), groups), \
            self._stats(correct, incorrect, unscored, teacher_nll, student_nll, valid)

    def _from_row_stats(self, rewards, teacher_nll, student_nll, has_tokens, groups) -> torch.Tensor:
        correct, incorrect, unscored = split_by_reward(rewards, self.params.threshold)
        score = torch.where(correct, student_nll, -teacher_nll) / self.params.temperature
        paths = incorrect | correct if self.params.correct == "student_perplexity" else incorrect
        eligible = paths & has_tokens
        key = groups * 2 + correct.long()
        row_w = torch.zeros(rewards.shape[0], device=rewards.device)
        if eligible.any():
            row_w[eligible] = _group_softmax(score[eligible], key[eligible])
        if self.params.unscored == "distill":
            row_w = torch.where(unscored, torch.ones_like(row_w), row_w)
        return row_w

    def prepare(self, batch: GenerationBatch) -> dict[str, torch.Tensor]:
        """The rows' weights from whole prompt groups of the global generation batch (all ranks)."""
        teacher = require_teacher(batch.teacher, self.name, "teacher perplexity of incorrect rollouts")
        valid = batch.mask.bool() & teacher.mask.bool()
        teacher_nll = -row_mean(teacher.token_logps.float(), valid)
        student_nll = -row_mean(batch.student_logps().float(), valid)
        has = valid.any(1).float()
        everyone = [batch.gather(x) for x in (teacher_nll, student_nll, has)]
        rewards = batch.global_rewards.float()
        N = rewards.shape[0]
        groups = (torch.arange(N, device=rewards.device) // batch.num_generations if self.params.group_by == "prompt"
                  else torch.zeros(N, dtype=torch.long, device=rewards.device))
        known = ~torch.isnan(everyone[2])  # rows of ranks this process cannot see (no process group) stay out
        row_w = torch.zeros(N, device=rewards.device)
        row_w[known] = self._from_row_stats(rewards[known], everyone[0][known], everyone[1][known],
                                            everyone[2][known] > 0, groups[known])
        return {"row_weight": row_w[batch.local]}

    def weights(self, inputs: dict[str, Any], student: StudentOutputs, teacher: TeacherScores | None) -> torch.Tensor:
        teacher = require_teacher(teacher, self.name, "teacher perplexity of incorrect rollouts")
        B = student.token_logps.shape[0]
        device = student.token_logps.device
        rewards = require_rewards(inputs, self.name, B).to(device)
        valid = valid_tokens(student, teacher)
        prepared = (inputs.get("prepared") or {}).get("row_weight")
        if prepared is not None:  # whole-group weights from the generation batch
            correct, incorrect, unscored = split_by_reward(rewards, self.params.threshold)
            row_w = prepared.to(device).float()
            self.last_stats = self._stats(correct, incorrect, unscored, -row_mean(teacher.token_logps.float(), valid),
                                          -row_mean(student.token_logps.float(), valid), valid)
        else:
            row_w, self.last_stats = self._row_weights(rewards, teacher.token_logps, student.token_logps, valid,
                                                       self.groups(inputs, B, device))
        self.last_stats["weight_max"] = float(row_w.max()) if B else 0.0
        return row_w.to(student.token_logps.dtype).unsqueeze(1) * student.mask

    @staticmethod
    def _stats(correct, incorrect, unscored, teacher_nll, student_nll, valid) -> dict[str, float]:
        B = correct.numel()
        stats = {"correct_fraction": float(correct.sum()) / B, "incorrect_fraction": float(incorrect.sum()) / B,
                 "unscored_fraction": float(unscored.sum()) / B}
        has_tokens = valid.any(1)
        paths = (("teacher_ppl_incorrect", incorrect, teacher_nll), ("student_ppl_correct", correct, student_nll))
        for key, rows, nll in paths:
            rows = rows & has_tokens
            if rows.any():
                stats[key] = float(nll[rows].double().exp().mean())
        return stats


def _group_softmax(score: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``n_k · softmax(score)`` within each key k (so each key's weights average 1)."""
    K = int(key.max()) + 1
    top = torch.full((K,), float("-inf"), device=score.device).scatter_reduce(0, key, score, "amax")
    e = (score - top[key]).exp()
    total = torch.zeros(K, device=score.device).index_add(0, key, e)
    count = torch.zeros(K, device=score.device).index_add(0, key, torch.ones_like(e))
    return count[key] * e / total[key]
