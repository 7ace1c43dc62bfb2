"""Test kit for opd_plugins and third-party plugins.

* Fixtures (registered as a pytest plugin through the ``pytest11`` entry point): ``opd_tokenizer``,
  ``opd_tiny_model``, ``opd_tiny_model_dir``, ``opd_plugin_manager``.
* Contract base classes, one per component kind: subclass one and set ``component`` to get the standard
  checks (see docs/writing_plugins.md)::

      from opd_plugins.testing import DivergenceContract

      class TestMyDivergence(DivergenceContract):
          component = MyDivergence
"""

from opd_plugins.testing.contracts import (
    AdvantageContract,
    ComponentContract,
    DivergenceContract,
    PromptSelectionContract,
    RolloutContract,
    SamplerContract,
    TaskContract,
    ScheduleContract,
    TeacherContract,
    TextTeacherContract,
    TokenWeightingContract,
    TrainerContract,
    build_component,
    contract_for,
    fake_context,
    make_inputs,
    random_pair,
    teacher_batch,
)
from opd_plugins.testing.models import build_tiny_model, build_tokenizer, save_tiny_model

__all__ = [
    "AdvantageContract", "ComponentContract", "DivergenceContract", "RolloutContract", "SamplerContract",
    "ScheduleContract", "TeacherContract", "TokenWeightingContract", "contract_for", "TextTeacherContract",
    "TaskContract", "TrainerContract", "PromptSelectionContract",
    "build_component", "build_tiny_model", "build_tokenizer", "fake_context", "make_inputs", "random_pair",
    "save_tiny_model", "teacher_batch",
]
