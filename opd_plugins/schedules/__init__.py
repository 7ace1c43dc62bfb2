"""Built-in coefficient schedules."""

from opd_plugins.markers import hookimpl
from opd_plugins.schedules.base import Schedule
from opd_plugins.schedules.builtin import Constant, Cosine, Linear, WarmupDecay


@hookimpl
def opd_register_components():
    return [Constant, Linear, Cosine, WarmupDecay]


__all__ = ["Schedule", "Constant", "Linear", "Cosine", "WarmupDecay"]
