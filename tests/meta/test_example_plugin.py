"""The example third-party plugin (examples/opd-example-plugin) and the examples in docs/writing_plugins.md.

The example plugin must be installed (``.ci/run`` does ``pip install -e examples/opd-example-plugin``): these
tests fail, rather than skip, when it is not, so a broken install never passes unnoticed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "opd-example-plugin"
GUIDE = ROOT / "docs" / "writing_plugins.md"
DIST = "opd-example-plugin"
INSTALL_HINT = f"install it with: pip install -e {EXAMPLE.relative_to(ROOT)} (from {ROOT})"


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without the plugin switches, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPD_DISABLE_PLUGINS", "OPD_DISABLE_PLUGIN_AUTOLOAD")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def cli() -> list[str]:
    script = Path(sys.executable).with_name("opd-plugins")
    found = str(script) if script.exists() else shutil.which("opd-plugins")
    if found is None:
        pytest.fail("the opd-plugins console script is not installed next to this Python (pip install -e .)")
    return [found]


@pytest.fixture(scope="module")
def example_installed() -> metadata.Distribution:
    try:
        return metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        pytest.fail(f"the {DIST} distribution is not installed; {INSTALL_HINT}")


def list_json(**env: str) -> dict[str, list[dict[str, str]]]:
    out = subprocess.run([*cli(), "list", "--json"], capture_output=True, text=True, env=clean_env(**env),
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


# -----------------------------------------------------------------------------------------------------------
# The packaged example plugin
# -----------------------------------------------------------------------------------------------------------


def test_installed_from_this_checkout(example_installed):
    import opd_example_plugin

    where = Path(opd_example_plugin.__file__).resolve()
    assert EXAMPLE in where.parents, (
        f"opd_example_plugin is imported from {where}, not from {EXAMPLE}; reinstall it: {INSTALL_HINT}"
    )
    entry_points = [ep for ep in example_installed.entry_points if ep.group == "opd_plugins"]
    assert [(ep.name, ep.value) for ep in entry_points] == [("example", "opd_example_plugin.hooks")]


def test_listed_under_divergence_with_its_plugin(example_installed):
    data = list_json()
    entries = {e["name"]: e for e in data["divergence"]}
    assert "example_tv" in entries, f"example_tv is not listed; divergences: {sorted(entries)}"
    assert entries["example_tv"]["plugin"] == "example"
    assert entries["example_tv"]["dist"] == f"{DIST} {example_installed.version}"
    assert all(e["name"] != "example_tv" for kind, es in data.items() if kind != "divergence" for e in es)


@pytest.mark.parametrize("env", [{"OPD_DISABLE_PLUGINS": "example"}, {"OPD_DISABLE_PLUGIN_AUTOLOAD": "1"}],
                         ids=["disable-plugins", "disable-autoload"])
def test_switched_off_by_environment(example_installed, env):
    names = [e["name"] for e in list_json(**env)["divergence"]]
    assert "example_tv" not in names
    assert "reverse_kl" in names  # the built-ins still load


def test_its_own_tests_pass(example_installed):
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        capture_output=True, text=True, env=clean_env(), cwd=EXAMPLE, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert re.search(r"\d+ passed", out.stdout), out.stdout[-2000:]


# -----------------------------------------------------------------------------------------------------------
# The code in docs/writing_plugins.md runs as written
# -----------------------------------------------------------------------------------------------------------


def guide_blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block in the guide."""
    return re.findall(r"^```(\w*)\n(.*?)^```", GUIDE.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)


def guide_files() -> dict[str, str]:
    """Blocks whose first line is ``# <file name>``, by file name."""
    files = {}
    for _, code in guide_blocks():
        m = re.match(r"# ([\w.-]+\.(?:py|yaml))\b", code)
        if m:
            files[m.group(1)] = code
    return files


@pytest.fixture(scope="module")
def guide_dir(tmp_path_factory) -> Path:
    """The guide's files written out, with the tiny model its recipe names."""
    from opd_plugins.testing import save_tiny_model

    d = tmp_path_factory.mktemp("writing-plugins")
    for name, code in guide_files().items():
        (d / name).write_text(code, encoding="utf-8")
    save_tiny_model(d / "tiny-model")
    return d


def test_guide_python_blocks_compile():
    blocks = [code for lang, code in guide_blocks() if lang == "python"]
    assert blocks
    for code in blocks:
        compile(code, "<docs/writing_plugins.md>", "exec")


def test_guide_has_the_files_it_uses():
    assert {"my_lab_opd.py", "recipe.yaml", "test_my_lab_opd.py", "my_lab_clip.py", "my_lab_specs.py",
            "my_lab_watch.py", "my_lab_alert.py"} <= set(guide_files())


def test_guide_local_plugin_recipe_validates(guide_dir):
    out = subprocess.run([*cli(), "validate", "recipe.yaml"], capture_output=True, text=True, cwd=guide_dir,
                         env=clean_env(PYTHONPATH=str(guide_dir)), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = out.stdout.strip()
    assert "divergence=my_lab_k2" in line
    assert f"# {line}" in GUIDE.read_text(encoding="utf-8"), f"the guide shows a different validate output: {line}"


def test_guide_contract_test_passes(guide_dir):
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_lab_opd.py"],
        capture_output=True, text=True, cwd=guide_dir, env=clean_env(PYTHONPATH=str(guide_dir)), timeout=600,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_guide_hook_modules_load(guide_dir):
    """The lifecycle-hook module loads, and the new-hook plugins load after the module with their specs."""
    code = (
        "from opd_plugins.manager import get_plugin_manager\n"
        "get_plugin_manager(['my_lab_opd', 'my_lab_clip'], entrypoints=False)\n"
        "pm = get_plugin_manager(['my_lab_specs', 'my_lab_opd', 'my_lab_watch', 'my_lab_alert'], entrypoints=False)\n"
        "assert pm.hook.opd_my_lab_low_reward.get_hookimpls()\n"
        "assert pm.registry.get('divergence', 'my_lab_k2')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=guide_dir,
                         env=clean_env(PYTHONPATH=str(guide_dir)), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
