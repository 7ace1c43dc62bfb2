"""``OPDConfig``: TRL's ``GRPOConfig`` with defaults suited to on-policy distillation recipes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trl import GRPOConfig


TRUNCATION_CONFLICT = ("truncated_completions='mask_reward' keeps truncated completions in the divergence terms, "
                       "mask_truncated_completions=True removes them from every term: choose one")


@dataclass
class OPDConfig(GRPOConfig):
    """Every ``GRPOConfig`` / ``TrainingArguments`` option works unchanged.

    Defaults that differ from TRL's: ``logging_steps=1`` and ``report_to="none"`` (set ``report_to: wandb``
    to log there). The divergence term is normalised per token like TRL's ``dapo`` loss.

    Added: ``degenerate_groups`` — what to do with groups whose rewards are all equal (no policy-gradient
    signal): ``keep`` them (their advantage is 0 but other loss terms still see them), or ``drop`` them from every
    loss term for that step (their tokens are masked and the token normaliser shrinks accordingly). Their share is
    logged as ``opd/degenerate_group_frac`` either way, and samplers are told through the ``degenerate groups``
    hook (to resample or hint them).

    Added: ``teacher_scoring`` — when a full-vocabulary divergence's teacher scores are computed: ``generation``
    scores the whole generation batch once and keeps its ``(B, T, V)`` log-probs in the batch until its last
    micro-batch (about 20 GB per device at Qwen3's vocabulary in the shipped recipes); ``loss`` scores each
    micro-batch in the loss (``(micro-batch, T, V)`` at a time) and, when something needs them at generation
    time (a per-token reward, a token weighting), the sampled tokens' log-probs only, at generation time; ``auto``
    (default) is ``loss`` for a full-vocabulary divergence whose teacher can score any rows
    (``Teacher.scores_any_rows``: ``hf_model``, ``self_context``), else ``generation``.

    Added: ``truncated_completions`` — what a completion cut at ``max_completion_length`` (no EOS) contributes:
    ``keep`` (default) trains on it like any other; ``mask_reward`` treats its task reward as unscored (NaN, as
    when no reward function applies): the reward of a cut answer is noise (DAPO's overlong filtering, for the reward
    only), so the advantage estimator gives it no task-reward advantage and leaves it out of its group's baseline,
    and samplers, prompt selection and token weightings see it as unscored; the divergence terms and a teacher's
    per-token reward still train on its tokens, so a teacher can still teach the student where to stop. TRL's
    ``mask_truncated_completions: true`` instead removes such completions from every loss term; the two are
    exclusive. The share masked is logged as ``opd/reward_masked_truncated_frac``.
    """

    logging_steps: float = field(default=1, metadata={"help": "Log every N optimizer steps."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Integrations to report to."})
    degenerate_groups: Literal["keep", "drop"] = field(default="keep", metadata={
        "help": "Groups whose rewards are all equal: 'keep' them in the loss, or 'drop' them from every loss term.",
        "choices": ["keep", "drop"]})

    teacher_scoring: Literal["auto", "generation", "loss"] = field(default="auto", metadata={
        "help": "Full-vocabulary teacher scores: per micro-batch in the loss ('loss'), once per generation batch "
                "('generation'), or 'auto' (loss when the teacher can score any rows).",
        "choices": ["auto", "generation", "loss"]})

    truncated_completions: Literal["keep", "mask_reward"] = field(default="keep", metadata={
        "help": "Completions cut at max_completion_length: 'keep' them, or 'mask_reward' (their task reward is "
                "unscored, NaN; the divergence still trains on their tokens).",
        "choices": ["keep", "mask_reward"]})

    def __post_init__(self) -> None:
        if self.degenerate_groups not in ("keep", "drop"):
            raise ValueError(f"degenerate_groups must be 'keep' or 'drop', got {self.degenerate_groups!r}")
        if self.teacher_scoring not in ("auto", "generation", "loss"):
            raise ValueError(f"teacher_scoring must be 'auto', 'generation' or 'loss', got {self.teacher_scoring!r}")
        if self.truncated_completions not in ("keep", "mask_reward"):
            raise ValueError(f"truncated_completions must be 'keep' or 'mask_reward', got "
                             f"{self.truncated_completions!r}")
        if self.truncated_completions == "mask_reward" and self.mask_truncated_completions:
            raise ValueError(TRUNCATION_CONFLICT)
        super().__post_init__()
