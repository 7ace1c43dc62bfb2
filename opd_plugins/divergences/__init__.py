"""Built-in divergence objectives."""

from opd_plugins.markers import hookimpl
from opd_plugins.divergences.base import Divergence, DivergenceTerms, StudentOutputs
from opd_plugins.divergences.forward_kl import ForwardKL
from opd_plugins.divergences.g_opd import GOPD
from opd_plugins.divergences.jsd import JSD
from opd_plugins.divergences.k1 import K1
from opd_plugins.divergences.k2 import K2
from opd_plugins.divergences.k3 import K3
from opd_plugins.divergences.reverse_kl import ReverseKL
from opd_plugins.divergences.skew_kl import SkewKL
from opd_plugins.divergences.topk_kl import TopKKL
from opd_plugins.divergences.tv import TV


@hookimpl
def opd_register_components():
    return [ReverseKL, ForwardKL, JSD, TV, SkewKL, K1, K2, K3, TopKKL, GOPD]


__all__ = [
    "Divergence", "DivergenceTerms", "StudentOutputs",
    "ReverseKL", "ForwardKL", "JSD", "TV", "SkewKL", "K1", "K2", "K3", "TopKKL", "GOPD",
]
