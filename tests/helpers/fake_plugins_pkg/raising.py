"""A plugin whose lifecycle hook raises."""

from opd_plugins import hookimpl


@hookimpl
def opd_trainer_init(trainer):
    raise RuntimeError("boom from the raising plugin")
