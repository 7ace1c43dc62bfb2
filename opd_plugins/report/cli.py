"""The ``report`` subcommand: ``add_arguments`` fills its parser, ``run`` builds the report and prints its path.

Wired into ``opd-plugins`` as ``report``; also runnable alone: ``python -m opd_plugins.report.cli RUN_DIR ...``.
"""

from __future__ import annotations

import argparse
import sys

from opd_plugins.errors import OPDError

DESCRIPTION = ("Write a self-contained HTML report (recipe settings and differences, training curves, held-out "
               "accuracy, evaluation examples, checkpoints, timings) of one or several run directories.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of a training run")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for report.html and its PNG figures (default: RUN_DIR/report for one run, "
                        "./report-<timestamp> for several)")


def run(args: argparse.Namespace) -> int:
    from opd_plugins.report import build_report

    path = build_report(args.run_dirs, out=args.out)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opd-plugins report", description=DESCRIPTION)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except OPDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
