"""Deprecated: running a recipe moved to :mod:`opd_plugins.runs` (``opd_plugins.runs.train``, the OPD run in
:mod:`opd_plugins.runs.opd`, the run directory in :mod:`opd_plugins.runs.rundir`). This module re-exports them for
one release."""

import warnings

from opd_plugins.errors import DataError  # noqa: F401
from opd_plugins.runs import train  # noqa: F401
from opd_plugins.runs.opd import build_config, build_trainer, run_evaluation  # noqa: F401
from opd_plugins.runs.rundir import (  # noqa: F401
    RUN_MARKERS,
    build_data,
    cached_before_eval,
    last_complete_checkpoint,
    plot_curves,
    prepare_output_dir,
    print_summary,
    train_and_report,
    write_run_files,
)

warnings.warn("opd_plugins.run moved to opd_plugins.runs (train) and opd_plugins.runs.rundir; this module goes away "
              "in the next release", DeprecationWarning, stacklevel=2)
