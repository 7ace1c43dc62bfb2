"""``opd-plugins report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page about one or several runs.

The page shows each run's key recipe settings, the differences between the recipes, the training curves of every
logged metric (grouped by prefix), held-out accuracy before and after training, evaluation examples, checkpoints and
timings. The figures are also written as PNG files next to ``report.html``::

    from opd_plugins.report import build_report
    build_report(["runs/a", "runs/b"], out="reports/a-vs-b")   # -> reports/a-vs-b/report.html

Importing this package is cheap: matplotlib and jinja2 are imported when a report is built.
"""

from __future__ import annotations

from opd_plugins.report.load import Checkpoint, RunData, Timings, load_run
from opd_plugins.report.render import build_report

__all__ = ["build_report", "load_run", "RunData", "Checkpoint", "Timings"]
