"""A rollout backend that sets a trainer argument and objects to a peer (for the recipe-rule tests)."""

from typing import ClassVar

from opd_plugins import hookimpl
from opd_plugins.rollout.hf_generate import HFGenerate


class PickyRollout(HFGenerate):
    """Sets ``temperature: 0.5`` and refuses a teacher."""

    name: ClassVar[str] = "picky_rollout"

    def trainer_args(self):
        return {"temperature": 0.5}

    def peer_problems(self, peers):
        return [("", "picky_rollout cannot run with a teacher")] if peers.get("teacher") is not None else []


@hookimpl
def opd_register_components():
    return [PickyRollout]
