"""docs/hooks.md documents every hook in opd_plugins/hookspecs.py, with its exact signature, in order."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from opd_plugins import PROJECT, hookspecs

DOC = Path(__file__).resolve().parents[2] / "docs" / "hooks.md"
HEADING = re.compile(r"^### (\S+)\s*$", re.MULTILINE)


def hookspec_functions() -> dict[str, object]:
    """Every function marked with the ``opd`` hookspec marker, in definition (phase) order."""
    specs = [(name, fn) for name, fn in vars(hookspecs).items()
             if inspect.isfunction(fn) and getattr(fn, f"{PROJECT}_spec", None) is not None]
    return dict(sorted(specs, key=lambda item: item[1].__code__.co_firstlineno))


def rendered_signature(name: str, fn: object) -> str:
    """``opd_trainer_init(trainer: 'Any') -> 'None'``, as written in the doc."""
    return f"{name}{inspect.signature(fn)}"


def doc_headings() -> list[str]:
    return HEADING.findall(DOC.read_text(encoding="utf-8"))


def test_hookspecs_are_found():
    specs = hookspec_functions()
    assert "opd_register_components" in specs and "opd_trainer_init" in specs
    assert all(name.startswith("opd_") for name in specs)


def test_every_hook_has_a_heading():
    missing = [name for name in hookspec_functions() if name not in doc_headings()]
    assert not missing, f"docs/hooks.md has no '### name' section for: {', '.join(missing)}"


def test_no_heading_names_a_missing_hook():
    specs = hookspec_functions()
    unknown = [h for h in doc_headings() if h not in specs]
    assert not unknown, f"docs/hooks.md documents hooks that hookspecs.py does not define: {', '.join(unknown)}"


def test_each_hook_is_documented_once_in_phase_order():
    headings = doc_headings()
    assert len(headings) == len(set(headings)), "a hook is documented twice in docs/hooks.md"
    assert headings == list(hookspec_functions()), (
        "docs/hooks.md must list the hooks in the order hookspecs.py defines them (phase order)"
    )


def test_signatures_match_verbatim():
    text = DOC.read_text(encoding="utf-8")
    sections = dict(zip(HEADING.findall(text), HEADING.split(text)[2::2]))
    wrong = []
    for name, fn in hookspec_functions().items():
        sig = rendered_signature(name, fn)
        if f"```python\n{sig}\n```" not in sections.get(name, ""):
            wrong.append(f"  {sig}")
    assert not wrong, (
        "docs/hooks.md does not show these signatures (in a ```python block under the hook's heading), "
        "rendered as f'{name}{inspect.signature(fn)}':\n" + "\n".join(wrong)
    )


def test_firstresult_is_stated_correctly():
    text = DOC.read_text(encoding="utf-8")
    sections = dict(zip(HEADING.findall(text), HEADING.split(text)[2::2]))
    wrong = []
    for name, fn in hookspec_functions().items():
        want = "yes" if getattr(fn, f"{PROJECT}_spec")["firstresult"] else "no"
        if f"**firstresult:** {want}" not in sections.get(name, ""):
            wrong.append(f"{name} (should say **firstresult:** {want})")
    assert not wrong, "docs/hooks.md misstates firstresult for: " + ", ".join(wrong)
