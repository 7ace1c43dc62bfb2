"""Registry and plugin manager: loading order, errors that name the plugin, disabling, did-you-mean."""

import re

import pytest

from opd_plugins.components import KINDS
from opd_plugins.errors import ComponentNotFound, PluginError, PluginLoadError
from opd_plugins.manager import BUILTIN_PLUGINS, get_plugin_manager

PKG = "helpers.fake_plugins_pkg"


def test_component_kinds_are_pinned():
    assert KINDS == ("teacher", "divergence", "token_weighting", "advantage", "sampler", "prompt_selection", "rollout",
                     "schedule", "task", "trainer")


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
    with pytest.raises(PluginLoadError) as exc:
        get_plugin_manager([f"{PKG}.duplicate"], entrypoints=False)  # the registry is built with the manager
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
    with pytest.raises(PluginLoadError) as exc:
        get_plugin_manager([f"{PKG}.bad_component"], entrypoints=False)
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


# -- hardening: hooks checked once after loading, blocking, broken installed plugins -------------------------------


def test_hooks_are_checked_once_everything_is_loaded_so_load_order_does_not_matter():
    pm = get_plugin_manager([f"{PKG}.impl_early", f"{PKG}.spec_late"], entrypoints=False)
    assert pm.hook.opd_late_hook(value=1) == [2]


def test_disabled_plugins_are_blocked_through_pluggy(monkeypatch):
    monkeypatch.setenv("OPD_DISABLE_PLUGINS", f"{PKG}.good,opd_plugins.samplers")
    pm = get_plugin_manager([f"{PKG}.good"], entrypoints=False)
    assert pm.is_blocked(f"{PKG}.good") and pm.is_blocked("opd_plugins.samplers")
    assert "none" not in pm.registry.names("sampler") and "sq_log_ratio" not in pm.registry.names("divergence")


def test_sys_exit_while_importing_a_plugin_is_a_load_failure_naming_it():
    with pytest.raises(PluginLoadError) as exc:
        get_plugin_manager([f"{PKG}.exits"], entrypoints=False)
    assert f"plugin '{PKG}.exits'" in str(exc.value) and "called sys.exit(0) while being imported" in str(exc.value)


def test_a_plugin_module_with_no_hook_is_refused_naming_it():
    with pytest.raises(PluginLoadError, match=f"plugin '{PKG}.no_hooks'.*implements no opd_ hook"):
        get_plugin_manager([f"{PKG}.no_hooks"], entrypoints=False)


def _broken_entry_point(monkeypatch):
    from importlib import metadata

    broken = metadata.EntryPoint(name="brokenplug", value="a_module_that_is_not_installed_xyz", group="opd_plugins")
    real = metadata.entry_points

    def entry_points(**kw):
        found = list(real(**kw))
        return found + [broken] if kw.get("group") == "opd_plugins" else found

    monkeypatch.setattr(metadata, "entry_points", entry_points)


def test_a_broken_installed_plugin_is_named_with_its_remedy_and_the_rest_still_load(monkeypatch):
    _broken_entry_point(monkeypatch)
    with pytest.raises(PluginLoadError) as exc:
        get_plugin_manager()
    msg = str(exc.value)
    assert "'brokenplug'" in msg and "OPD_DISABLE_PLUGINS=brokenplug" in msg and "a_module_that_is_not_installed" in msg
    pm = get_plugin_manager(strict=False)
    assert "brokenplug" in pm.broken and "reverse_kl" in pm.registry.names("divergence")
    monkeypatch.setenv("OPD_DISABLE_PLUGINS", "brokenplug")
    assert not get_plugin_manager().broken  # the remedy works


def test_list_still_lists_and_shows_the_broken_plugin(monkeypatch, capsys):
    import json

    from opd_plugins.cli import main

    _broken_entry_point(monkeypatch)
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "reverse_kl" in [e["name"] for e in data["divergence"]]
    assert data["broken"][0]["plugin"] == "brokenplug" and "OPD_DISABLE_PLUGINS=brokenplug" in data["broken"][0]["error"]
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "brokenplug" in out and "OPD_DISABLE_PLUGINS=brokenplug" in out


def test_validate_names_a_broken_installed_plugin_without_blaming_the_recipe(monkeypatch, tmp_path, capsys):
    from opd_plugins.cli import main

    _broken_entry_point(monkeypatch)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: Qwen/Qwen3-0.6B}\ndata: {task: {name: arithmetic}}\noutput_dir: x\n")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "brokenplug" in err and "OPD_DISABLE_PLUGINS=brokenplug" in err and "plugins:" not in err


def test_traceback_flag_shows_the_traceback_of_a_user_error(tmp_path, capsys, monkeypatch):
    from opd_plugins.cli import main

    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["--traceback", "validate", str(tmp_path / "missing.yaml")]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    monkeypatch.setenv("OPD_TRACEBACK", "1")
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_overrides_may_follow_the_flags():
    from opd_plugins.cli import parse_args

    args = parse_args(["train", "r.yaml", "--overwrite", "trainer.args.max_steps=3", "seed=1"])
    assert args.overwrite and args.overrides == ["trainer.args.max_steps=3", "seed=1"]
    args = parse_args(["train", "r.yaml", "a=1", "--resume", "b=2"])
    assert args.resume and args.overrides == ["a=1", "b=2"]
    with pytest.raises(SystemExit):
        parse_args(["train", "r.yaml", "--overwrite", "--bogus"])
