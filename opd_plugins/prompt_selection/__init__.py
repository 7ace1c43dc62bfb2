"""Built-in prompt selections: which dataset prompts each generation batch is drawn from."""

from opd_plugins.markers import hookimpl
from opd_plugins.prompt_selection.base import PromptSelection
from opd_plugins.prompt_selection.reinforce_ada import ReinforceAdaSelection
from opd_plugins.prompt_selection.sampler import SelectionSampler, build_selection_sampler
from opd_plugins.prompt_selection.uniform import UniformSelection
from opd_plugins.prompt_selection.variance import VarianceSelection


@hookimpl
def opd_register_components():
    return [UniformSelection, VarianceSelection, ReinforceAdaSelection]


__all__ = ["PromptSelection", "UniformSelection", "VarianceSelection", "ReinforceAdaSelection", "SelectionSampler",
           "build_selection_sampler"]
