"""Every registered component, built-in or installed, passes the contract suite for its kind."""

from opd_plugins.manager import get_plugin_manager
from opd_plugins.testing import contract_for

_REGISTRY = get_plugin_manager().registry

for _entry in _REGISTRY:
    _cls = _entry.cls
    _name = f"Test_{_cls.kind}_{_cls.name}"
    globals()[_name] = type(_name, (contract_for(_cls),), {"component": _cls, "__module__": __name__})


def test_every_kind_with_members_is_covered():
    covered = {name for name in globals() if name.startswith("Test_")}
    assert covered and all(f"Test_{e.cls.kind}_{e.cls.name}" in covered for e in _REGISTRY)
