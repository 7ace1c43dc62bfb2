"""The plugin's hook implementations (the module named by the ``opd_plugins`` entry point).

Keep this module cheap to import: the plugin manager imports it in every ``opd-plugins`` command.
"""

from __future__ import annotations

from typing import Any

from opd_plugins import hookimpl


@hookimpl
def opd_register_components():
    from opd_example_plugin.tv import TotalVariation

    return [TotalVariation]


@hookimpl
def opd_step_metrics(trainer: Any, inputs: dict[str, Any], mode: str) -> dict[str, float] | None:
    """Log the number of completion tokens in this micro-batch, when the run has a divergence (else nothing)."""
    components = getattr(trainer, "components", None)
    if getattr(components, "divergence", None) is None or "completion_mask" not in inputs:
        return None
    return {"example/completion_tokens": float(inputs["completion_mask"].sum())}
