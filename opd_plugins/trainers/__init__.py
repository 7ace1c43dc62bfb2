"""Trainers: ``OPDConfig`` / ``OPDTrainer`` (a TRL-style pair) and ``Components``."""

from opd_plugins.trainers.components import Components
from opd_plugins.trainers.opd_config import OPDConfig
from opd_plugins.trainers.opd_trainer import OPDTrainer

__all__ = ["Components", "OPDConfig", "OPDTrainer"]
