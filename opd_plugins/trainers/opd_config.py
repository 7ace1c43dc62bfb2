"""``OPDConfig``: TRL's ``GRPOConfig`` with defaults suited to on-policy distillation recipes."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig


@dataclass
class OPDConfig(GRPOConfig):
    """Every ``GRPOConfig`` / ``TrainingArguments`` option works unchanged.

    Defaults that differ from TRL's: ``logging_steps=1`` and ``report_to="none"`` (set ``report_to: wandb``
    to log there). The divergence term is normalised per token like TRL's ``dapo`` loss.
    """

    logging_steps: float = field(default=1, metadata={"help": "Log every N optimizer steps."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Integrations to report to."})
