"""Built-in hint/prefix samplers."""

from opd_plugins.markers import hookimpl
from opd_plugins.samplers.base import Sampler, SamplerOutput
from opd_plugins.samplers.none import NoSampler


@hookimpl
def opd_register_components():
    return [NoSampler]


__all__ = ["Sampler", "SamplerOutput", "NoSampler"]
