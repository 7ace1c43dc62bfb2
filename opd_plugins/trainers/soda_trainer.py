"""``SODATrainer``: TRL's ``DPOTrainer`` with the checkpoint contract and the lifecycle hooks of ``OPDTrainer``."""

from __future__ import annotations

from typing import Any

from trl import DPOTrainer

from opd_plugins.trainers.checkpointing import HookedTrainerMixin

class SODATrainer(HookedTrainerMixin, DPOTrainer):
    """TRL's ``DPOTrainer`` for SODA's preference pairs. Each ``checkpoint-N`` is written into
    ``output_dir/.staging``, completed with the components' state, marked complete, and published with one atomic
    rename; ``opd_trainer_init``, ``opd_checkpoint_save``, ``opd_checkpoint_load`` and ``opd_train_end`` fire as in
    ``OPDTrainer``.

    Takes every ``DPOTrainer`` argument, plus ``plugin_manager`` (default: built-ins and installed plugins),
    ``components`` (``{name: component}`` whose state goes into checkpoints) and ``recipe`` (kept for hooks).
    """

    def __init__(self, *args: Any, plugin_manager: Any = None, components: dict[str, Any] | None = None,
                 recipe: Any = None, **kwargs: Any) -> None:
        if plugin_manager is None:
            from opd_plugins.manager import get_plugin_manager

            plugin_manager = get_plugin_manager()
        self.pm = plugin_manager
        self.components = dict(components or {})
        self.recipe = recipe
        super().__init__(*args, **kwargs)
        self.pm.call("opd_trainer_init", trainer=self)

    def checkpoint_components(self) -> dict[str, Any]:
        return self.components


__all__ = ["SODATrainer"]
