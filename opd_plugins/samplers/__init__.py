"""Built-in hint/prefix samplers."""

from opd_plugins.markers import hookimpl
from opd_plugins.samplers.base import Guidance, Sampler, SamplerFeedback, SamplerOutput
from opd_plugins.samplers.guide import Guide
from opd_plugins.samplers.hint_ladder import HintLadder
from opd_plugins.samplers.none import NoSampler
from opd_plugins.samplers.oracle_prefix import OraclePrefix
from opd_plugins.samplers.prefix_rl import PrefixRL
from opd_plugins.samplers.self_hint import SelfHint


@hookimpl
def opd_register_components():
    return [NoSampler, OraclePrefix, Guide, PrefixRL, HintLadder, SelfHint]


__all__ = ["Guidance", "Guide", "HintLadder", "NoSampler", "OraclePrefix", "PrefixRL", "Sampler", "SamplerFeedback",
           "SamplerOutput", "SelfHint"]
