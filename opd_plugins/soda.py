"""Deprecated: SODA is the ``soda`` trainer variant, run by :mod:`opd_plugins.runs.soda` and validated by
:mod:`opd_plugins.recipe.preference`. This module re-exports them for one release."""

import warnings

from opd_plugins.recipe.preference import SAMPLING_ARGS, Sampling  # noqa: F401
from opd_plugins.runs.soda import (  # noqa: F401
    PAIRS_FILE,
    build_dpo_config,
    build_pairs,
    pairs_dataset,
    read_pairs,
    train,
)

warnings.warn("opd_plugins.soda moved to opd_plugins.runs.soda (SODA is trainer.name: soda); this module goes away "
              "in the next release", DeprecationWarning, stacklevel=2)
