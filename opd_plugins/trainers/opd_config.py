"""``OPDConfig``: TRL's ``GRPOConfig`` with defaults suited to on-policy distillation recipes."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig


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
    """

    logging_steps: float = field(default=1, metadata={"help": "Log every N optimizer steps."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Integrations to report to."})
    degenerate_groups: str = field(default="keep", metadata={
        "help": "Groups whose rewards are all equal: 'keep' them in the loss, or 'drop' them from every loss term.",
        "choices": ["keep", "drop"]})

    teacher_scoring: str = field(default="auto", metadata={
        "help": "Full-vocabulary teacher scores: per micro-batch in the loss ('loss'), once per generation batch "
                "('generation'), or 'auto' (loss when the teacher can score any rows).",
        "choices": ["auto", "generation", "loss"]})

    def __post_init__(self) -> None:
        if self.degenerate_groups not in ("keep", "drop"):
            raise ValueError(f"degenerate_groups must be 'keep' or 'drop', got {self.degenerate_groups!r}")
        if self.teacher_scoring not in ("auto", "generation", "loss"):
            raise ValueError(f"teacher_scoring must be 'auto', 'generation' or 'loss', got {self.teacher_scoring!r}")
        super().__post_init__()
