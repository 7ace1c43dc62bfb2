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
    """

    logging_steps: float = field(default=1, metadata={"help": "Log every N optimizer steps."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Integrations to report to."})
    degenerate_groups: str = field(default="keep", metadata={
        "help": "Groups whose rewards are all equal: 'keep' them in the loss, or 'drop' them from every loss term.",
        "choices": ["keep", "drop"]})

    def __post_init__(self) -> None:
        if self.degenerate_groups not in ("keep", "drop"):
            raise ValueError(f"degenerate_groups must be 'keep' or 'drop', got {self.degenerate_groups!r}")
        super().__post_init__()
