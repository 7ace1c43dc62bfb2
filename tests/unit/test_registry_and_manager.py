"""Registry and plugin manager: loading order, errors that name the plugin, disabling, did-you-mean."""

import re

import pytest

from opd_plugins.components import KINDS
from opd_plugins.errors import ComponentNotFound, PluginError, PluginLoadError
from opd_plugins.manager import BUILTIN_PLUGINS, get_plugin_manager

PKG = "helpers.fake_plugins_pkg"


def test_component_kinds_are_pinned():
    assert KINDS == ("teacher", "divergence", "token_weighting", "advantage", "sampler", "rollout", "schedule", "task",
                     "trainer")


def test_builtins_register_first_members():
    reg = get_plugin_manager(entrypoints=False).registry
    assert {"hf_model", "self_context"} <= set(reg.names("teacher"))
    assert "reverse_kl" in reg.names("divergence")
    assert "grpo" in reg.names("advantage")
    assert "none" in reg.names("sampler")
    assert "hf_generate" in reg.names("rollout")
    assert {"constant", "linear", "cosine", "warmup_decay"} <= set(reg.names("schedule"))
    entry = reg.entry("divergence", "reverse_kl")
    assert entry.plugin.dist == "opd-plugins" and entry.plugin.name == "opd_plugins.divergences"


def test_unknown_name_suggests_and_lists_choices():
    reg = get_plugin_manager(entrypoints=False).registry
    with pytest.raises(ComponentNotFound) as exc:
        reg.get("divergence", "revers_kl")
    msg = str(exc.value)
    assert "Did you mean 'reverse_kl'?" in msg
    assert re.search(r"registered: .*\breverse_kl\b[^()]*\(opd-plugins 0\.1\.0\)", msg), msg


def test_recipe_plugin_module_adds_components():
    pm = get_plugin_manager([f"{PKG}.good"], entrypoints=False)
    assert pm.registry.get("divergence", "sq_log_ratio").__name__ == "SquaredLogRatio"
    assert f"{PKG}.good" in [p["name"] for p in pm.plugin_versions()]
    # a plain function without the opd_ prefix is not treated as a hook
    assert not hasattr(pm.hook, "not_a_hook")


def test_duplicate_name_names_both_plugins():
    pm = get_plugin_manager([f"{PKG}.duplicate"], entrypoints=False)
    with pytest.raises(PluginLoadError) as exc:
        pm.registry
    msg = str(exc.value)
    assert "divergence 'reverse_kl' is registered by both" in msg
    assert "opd-plugins 0.1.0" in msg and f"{PKG}.duplicate" in msg


def test_misspelled_hook_is_an_error_with_suggestion():
    with pytest.raises(PluginLoadError) as exc:
        get_plugin_manager([f"{PKG}.misspelled"], entrypoints=False)
    msg = str(exc.value)
    assert f"{PKG}.misspelled" in msg and "'opd_regster_components' is not a known hook" in msg
    assert "Did you mean 'opd_register_components'?" in msg


def test_marked_function_without_prefix_is_an_error():
    with pytest.raises(PluginLoadError, match="does not start with 'opd_'"):
        get_plugin_manager([f"{PKG}.unprefixed"], entrypoints=False)


def test_import_failure_names_plugin():
    with pytest.raises(PluginLoadError) as exc:
        get_plugin_manager([f"{PKG}.broken_import"], entrypoints=False)
    assert f"error importing plugin '{PKG}.broken_import'" in str(exc.value)
    assert "a_module_that_does_not_exist_xyz" in str(exc.value)


def test_malformed_component_is_rejected():
    pm = get_plugin_manager([f"{PKG}.bad_component"], entrypoints=False)
    with pytest.raises(PluginLoadError) as exc:
        pm.registry
    assert "not snake_case" in str(exc.value) and "has no docstring" in str(exc.value)


def test_hook_exception_names_the_plugin():
    pm = get_plugin_manager([f"{PKG}.raising"], entrypoints=False)
    with pytest.raises(PluginError) as exc:
        pm.call("opd_trainer_init", trainer=None)
    assert f"plugin '{PKG}.raising'" in str(exc.value) and "boom from the raising plugin" in str(exc.value)
    assert "opd_trainer_init" in str(exc.value)


def test_disable_plugins_env(monkeypatch):
    monkeypatch.setenv("OPD_DISABLE_PLUGINS", f"{PKG}.good")
    pm = get_plugin_manager([f"{PKG}.good"], entrypoints=False)
    assert "sq_log_ratio" not in pm.registry.names("divergence")


def test_disable_autoload_env(monkeypatch):
    monkeypatch.setenv("OPD_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = get_plugin_manager()
    assert all(name in BUILTIN_PLUGINS for name in pm.infos)


def test_managers_are_isolated():
    a = get_plugin_manager([f"{PKG}.good"], entrypoints=False)
    b = get_plugin_manager(entrypoints=False)
    assert "sq_log_ratio" in a.registry.names("divergence")
    assert "sq_log_ratio" not in b.registry.names("divergence")
