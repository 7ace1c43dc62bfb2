"""``opd-plugins`` (also ``python -m opd_plugins``): validate, list, train, report, serve-teacher, precompute-teacher.

This module only parses arguments and dispatches: the work is in :mod:`opd_plugins.runs` (train),
:mod:`opd_plugins.commands` (serve-teacher, precompute-teacher) and :mod:`opd_plugins.report` (report).

User mistakes (an invalid recipe, a missing file, a bad plugin) print a clear message and exit with status 2,
without a traceback (``--traceback`` or ``OPD_TRACEBACK=1`` shows it). Anything else is a bug and keeps its
traceback. Dotted overrides may come before or after the flags (``train R --overwrite k=v``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any

from opd_plugins.errors import OPDError

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    from opd_plugins.commands import precompute_teacher, serve_teacher
    from opd_plugins.report import cli as report_cli

    p = argparse.ArgumentParser(
        prog="opd-plugins",
        description="On-policy distillation, self-distillation and RLVR recipes on TRL.",
        epilog="Launch on several processes with: accelerate launch -m opd_plugins train RECIPE",
    )
    p.add_argument("--traceback", action="store_true",
                   help="show the full traceback of a user or plugin error (also: OPD_TRACEBACK=1)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    v = sub.add_parser("validate", help="check a recipe without loading any model",
                       description="Validate RECIPE (with dotted overrides) and report every problem. Loads no model.")
    v.add_argument("recipe", help="path to a recipe YAML file")
    v.add_argument("overrides", nargs="*", help="dotted overrides, e.g. teacher.params.top_k=32")
    v.add_argument("--accelerate-config", metavar="FILE",
                   help="also check the recipe against this accelerate config (engine, number of processes), as "
                        "`accelerate launch --config_file FILE` would run it")

    ls = sub.add_parser("list", help="list registered components", description="List components grouped by kind.")
    ls.add_argument("--json", action="store_true", help='print {kind: [{"name", "plugin", "dist", "doc"}]}')
    ls.add_argument("--kind", help="only this kind")

    t = sub.add_parser("train", help="train a recipe", description="Validate RECIPE, then train it.")
    t.add_argument("recipe", help="path to a recipe YAML file")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.args.max_steps=10")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in output_dir")
    g.add_argument("--overwrite", action="store_true",
                   help="delete an existing output_dir first (only a run directory of opd_plugins)")
    t.add_argument("--allow-recipe-change", action="store_true",
                   help="with --resume: continue even though the recipe changes what is trained (model, data, "
                        "components, learning rate, ...); every start's recipe is kept as recipe-<n>.yaml")

    r = sub.add_parser("report", help="an HTML report of one or several run directories",
                       description=report_cli.DESCRIPTION)
    report_cli.add_arguments(r)

    st = sub.add_parser("serve-teacher", help="serve a teacher's log-probs over an OpenAI-compatible API",
                        description="Serve MODEL's prompt log-probs (vLLM's /v1/completions subset) for the "
                        "openai_server teacher.", epilog=serve_teacher.HELP_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    serve_teacher.add_arguments(st)

    pc = sub.add_parser("precompute-teacher", help="score rollouts with the recipe's teacher into an offline cache",
                        description=(precompute_teacher.__doc__ or "").strip().splitlines()[0] or None)
    precompute_teacher.add_arguments(pc)
    return p


def cmd_validate(args: argparse.Namespace) -> int:
    from opd_plugins.recipe import load_recipe
    from opd_plugins.recipe.loader import device_problems

    launch = None
    if getattr(args, "accelerate_config", None):
        from opd_plugins.recipe.launch import launch_from_accelerate_config

        launch = launch_from_accelerate_config(args.accelerate_config)
    recipe, pm = load_recipe(args.recipe, args.overrides, device_check=False, launch=launch)
    for note in recipe.notes:
        print(f"note: {note}", file=sys.stderr)
    for note in device_problems(recipe):
        print(f"note: {note} (train will refuse to start on this machine)", file=sys.stderr)
    variant = pm.registry.build("trainer", recipe.trainer.name)
    print(f"{args.recipe}: valid ({variant.summary(recipe)}; output_dir={recipe.output_dir})")
    if launch is not None:
        print(f"  under {launch.source}: {launch.engine}, {launch.world_size} process(es)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from opd_plugins.components import KINDS
    from opd_plugins.manager import get_plugin_manager

    pm = get_plugin_manager(strict=False)  # a broken installed plugin is shown, not fatal
    registry = pm.registry
    kinds = [args.kind] if args.kind else list(KINDS)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise OPDError(f"unknown kind {unknown[0]!r}; kinds are {', '.join(KINDS)}")
    data: dict[str, list[dict[str, Any]]] = {
        kind: [{"name": e.cls.name, "plugin": e.plugin.name, "dist": e.plugin.label, "doc": e.doc}
               for e in registry.entries(kind)]
        for kind in kinds
    }
    broken = [{"plugin": name, "error": error} for name, error in pm.broken.items()]
    if args.json:
        print(json.dumps({**data, "broken": broken} if broken else data, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for kind, entries in data.items():
        table = Table(title=kind, title_justify="left", show_header=True, expand=False)
        table.add_column("name", style="bold")
        table.add_column("provided by")
        table.add_column("description", overflow="fold", max_width=80)
        for e in entries:
            table.add_row(e["name"], e["dist"], e["doc"])
        if not entries:
            table.add_row("-", "-", "(none registered)")
        console.print(table)
    if broken:
        table = Table(title="broken plugins (not loaded)", title_justify="left", style="red", expand=False)
        table.add_column("plugin", style="bold")
        table.add_column("error", overflow="fold", max_width=100)
        for b in broken:
            table.add_row(b["plugin"], b["error"])
        console.print(table)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import warnings

    from opd_plugins.recipe import load_recipe
    from opd_plugins.runs import train
    from opd_plugins.runs.rundir import Resume

    if args.allow_recipe_change and not args.resume:
        raise OPDError("--allow-recipe-change only applies with --resume")
    # TRL 1.16 still calls transformers' deprecated *gradient_checkpointing* names on every step; the warnings
    # concern TRL's code, not the user's, and drown the progress display.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*gradient_checkpointing.* is deprecated")
    recipe, pm = load_recipe(args.recipe, args.overrides)
    for note in recipe.notes:
        print(f"note: {note}", file=sys.stderr)
    resume = Resume(allow_recipe_change=args.allow_recipe_change) if args.resume else False
    train(recipe, pm, resume=resume, overwrite=args.overwrite, argv=sys.argv)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from opd_plugins.report import cli as report_cli

    return report_cli.run(args)


def cmd_serve_teacher(args: argparse.Namespace) -> int:
    from opd_plugins.commands.serve_teacher import run

    return run(args)


def cmd_precompute_teacher(args: argparse.Namespace) -> int:
    from opd_plugins.commands.precompute_teacher import run

    return run(args)


HANDLERS = {"validate": cmd_validate, "list": cmd_list, "train": cmd_train, "report": cmd_report,
            "serve-teacher": cmd_serve_teacher, "precompute-teacher": cmd_precompute_teacher}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; dotted overrides given after a flag (``train R --overwrite k=v``) join the others."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    show_traceback = args.traceback or os.environ.get("OPD_TRACEBACK", "").strip().lower() in {"1", "true", "yes"}
    try:
        return HANDLERS[args.command](args)
    except OPDError as exc:
        if show_traceback:
            traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
