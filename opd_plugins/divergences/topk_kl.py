"""``topk_kl``: KL over the teacher's top-k tokens, renormalized or with a tail bucket, for top-k-only teachers."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from opd_plugins.components import ComponentParams
from opd_plugins.divergences.base import Divergence, DivergenceTerms, StudentOutputs
from opd_plugins.teachers.base import Capability, TeacherScores


def _kl(p_lp: torch.Tensor, q_lp: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) over the last dim, with 0·log 0 = 0."""
    p = p_lp.exp()
    return torch.where(p > 0, p * (p_lp - q_lp), torch.zeros_like(p)).sum(-1)


def add_tail_bucket(logps: torch.Tensor) -> torch.Tensor:
    """Append log(1 − Σ exp(logps)) as a (K+1)-th entry: the mass outside the top-k, as one bucket.

    The top-k mass is clamped below 1 (log-sum ≤ −1e-7), as TRL's server distillation does, so the bucket has a
    finite log-prob when the top-k hold (numerically) all the mass.
    """
    log_sum = torch.logsumexp(logps, -1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([logps, torch.log(-torch.expm1(log_sum))], -1)


class TopKKL(Divergence):
    """KL between student and teacher restricted to the teacher's top-k token ids at each position, for teachers
    that return only top-k log-probs (served teachers: vLLM/SGLang ``prompt_logprobs``, offline caches).

    The student's log-probs at those ids come from its logits (already divided by the sampling temperature); the
    teacher's are its full-vocabulary log-probs at those ids (at the teacher's temperature). ``mode``:

    * ``renormalized``: both distributions renormalized over the top-k ids, then KL. It ignores where the mass
      outside the top-k goes and how much of it there is: a student that puts mass outside the teacher's top-k is
      not penalised for it. It is KL between the two conditionals on the top-k set (≤ full KL / top-k mass of the
      first argument, and not a bound in general).
    * ``tail`` (default): the top-k entries plus one tail bucket holding the remaining mass 1 − Σ top-k, for the
      student and the teacher alike (TRL's ``loss_add_tail``). By the chain rule it equals the full KL minus the
      first argument's tail mass times the KL between the two tail distributions: a lower bound that lumps the
      tail, exact when the student's tail is proportional to the teacher's.

    With k = V both equal the full KL. ``direction``: ``forward`` = KL(teacher ‖ student) (TRL's server
    distillation with β = 0), ``reverse`` = KL(student ‖ teacher). Differentiated directly (a (B, T, K+1) tensor).

    Reward (OPD as RL): computed from the sampled token's full log-probs (always present), so it estimates the
    untruncated divergence: ``log π_t(x) − log π_s(x)`` for reverse (its policy gradient is −∇KL(s‖t)) and
    ``π_t(x)/π_s(x) − 1`` for forward (its policy gradient is −∇KL(t‖s)).

    Paper: Agarwal et al. (GKD), https://arxiv.org/abs/2306.13649, in its top-k form as TRL's
    ``ServerDistillationTrainer`` computes it (``loss_top_k``, ``loss_add_tail``;
    https://github.com/huggingface/trl/tree/main/trl/experimental/server_distillation).
    """

    name: ClassVar[str] = "topk_kl"

    class Params(ComponentParams):
        mode: Literal["renormalized", "tail"] = Field(
            "tail", description="renormalized: both renormalized over the teacher's top-k ids; tail: top-k plus one "
                                "bucket holding the remaining mass, for both.")
        direction: Literal["forward", "reverse"] = Field(
            "forward", description="forward: KL(teacher ‖ student); reverse: KL(student ‖ teacher).")

    def requires(self) -> Capability:
        return "topk"

    def per_token(self, student: StudentOutputs, teacher: TeacherScores) -> DivergenceTerms:
        if teacher.topk_ids is None or teacher.topk_logps is None:
            raise ValueError(f"divergence {self.name!r} needs the teacher's top-k ids and log-probs "
                             "(requires() == 'topk')")
        if student.logits is None:
            raise ValueError(f"divergence {self.name!r} needs the student's logits to read its log-probs at the "
                             "teacher's top-k ids, but StudentOutputs.logits is None")
        mask = student.mask * teacher.mask
        logits = student.logits.float()
        s_lp = logits.gather(-1, teacher.topk_ids.long()) - torch.logsumexp(logits, -1, keepdim=True)
        t_lp = teacher.topk_logps.float()
        if self.params.mode == "renormalized":
            s_lp = s_lp - torch.logsumexp(s_lp, -1, keepdim=True)
            t_lp = t_lp - torch.logsumexp(t_lp, -1, keepdim=True)
        else:
            s_lp, t_lp = add_tail_bucket(s_lp), add_tail_bucket(t_lp)
        value = (_kl(t_lp, s_lp) if self.params.direction == "forward" else _kl(s_lp, t_lp)) * mask
        return DivergenceTerms(loss=value, value=value.detach())

    def reward_requires(self) -> str:
        return "sampled"  # the sampled tokens' log-probs only

    def reward(self, student: StudentOutputs, teacher: TeacherScores) -> torch.Tensor:
        mask = student.mask * teacher.mask
        log_r = (teacher.token_logps - student.token_logps).detach().float()
        log_r = torch.where(mask > 0, log_r, torch.zeros_like(log_r))
        reward = log_r if self.params.direction == "reverse" else torch.expm1(log_r)
        return (reward * mask).detach()
