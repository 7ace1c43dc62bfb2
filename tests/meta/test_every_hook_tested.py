"""Every hookspec has a test named test_hook_<name> (datasette's rule)."""

import re
from pathlib import Path

from opd_plugins import hookspecs


def test_every_hook_has_a_test():
    names = [n for n in dir(hookspecs) if n.startswith("opd_") and callable(getattr(hookspecs, n))]
    assert len(names) >= 12
    text = "\n".join(p.read_text() for p in Path(__file__).parents[1].rglob("test_*.py"))
    missing = [n for n in names if not re.search(rf"def test_hook_{n}\b", text)]
    assert not missing, f"hooks without a test_hook_<name>: {missing}"
