"""Running a validated recipe: the trainer variants (kind ``trainer``) and the run directory they write.

``train(recipe, pm)`` runs the variant the recipe names in ``trainer.name``: ``opd``
(:mod:`opd_plugins.runs.opd`) or ``soda`` (:mod:`opd_plugins.runs.soda`), or one a plugin registers.
Importing this package is cheap: the trainers and TRL are imported when a run starts.
"""

from __future__ import annotations

from typing import Any

from opd_plugins.markers import hookimpl
from opd_plugins.runs.opd import OPDVariant
from opd_plugins.runs.soda import SODAVariant


@hookimpl
def opd_register_components():
    return [OPDVariant, SODAVariant]


def train(recipe: Any, pm: Any, *, resume: bool = False, overwrite: bool = False,
          argv: list[str] | None = None) -> dict[str, Any]:
    """Train a validated recipe with the variant its ``trainer.name`` names; returns the run's summary."""
    variant = pm.registry.build("trainer", recipe.trainer.name)
    return variant.train(recipe, pm, resume=resume, overwrite=overwrite, argv=argv)


__all__ = ["OPDVariant", "SODAVariant", "train"]
