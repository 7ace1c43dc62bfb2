"""Every kind of bad recipe input gets a clear error naming the file and the YAML key, before any model loads."""

import re
import subprocess
import sys
import time

import pytest
import yaml

from opd_plugins.errors import RecipeError
from opd_plugins.recipe import load_recipe


@pytest.fixture
def base(opd_tiny_model_dir, tmp_path):
    return {
        "model": {"name_or_path": str(opd_tiny_model_dir)},
        "data": {"task": {"name": "arithmetic", "params": {"op": "add", "digits": 2}}},
        "trainer": {"args": {"per_device_train_batch_size": 4, "num_generations": 4, "max_steps": 2}},
        "teacher": {"name": "self_context"},
        "divergence": {"name": "reverse_kl"},
        "objective": {"policy_gradient": 0.0, "divergence": 1.0},
        "output_dir": str(tmp_path / "run"),
    }


def write(tmp_path, data, name="r.yaml"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def problems(path, overrides=()):
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, list(overrides))
    return exc.value


def test_valid_base_recipe(base, tmp_path):
    recipe, pm = load_recipe(write(tmp_path, base))
    assert recipe.teacher.name == "self_context" and recipe.source.endswith("r.yaml")


def test_malformed_yaml_reports_line(tmp_path):
    p = write(tmp_path, "model:\n  name_or_path: x\ndata: [unclosed\noutput_dir: y\n")
    err = problems(p)
    assert str(p) in str(err) and "malformed YAML at line" in str(err)


def test_empty_and_missing_file(tmp_path):
    assert "the recipe is empty" in str(problems(write(tmp_path, "")))
    assert "does not exist" in str(problems(tmp_path / "nope.yaml"))
    assert "mapping at the top level" in str(problems(write(tmp_path, "- a\n- b\n")))


def test_unknown_component_name_with_did_you_mean(base, tmp_path):
    base["divergence"]["name"] = "revers_kl"
    err = problems(write(tmp_path, base))
    msg = str(err)
    assert "divergence.name: unknown divergence 'revers_kl'. Did you mean 'reverse_kl'?" in msg
    assert re.search(r"registered: .*\breverse_kl\b[^()]*\(opd-plugins 0\.1\.0\)", msg), msg


def test_wrong_param_type_and_range(base, tmp_path):
    base["teacher"] = {"name": "hf_model", "params": {"model": str(tmp_path), "top_k": -1, "chunk_size": "many"}}
    msg = str(problems(write(tmp_path, base)))
    assert "teacher.params.top_k: Input should be greater than or equal to 0 [got -1]" in msg
    assert "teacher.params.chunk_size" in msg and "'many'" in msg


def test_unknown_keys_at_every_level(base, tmp_path):
    base["modle"] = 1
    base["model"]["lora"] = {"r": 8, "alpah": 16}
    base["teacher"]["params"] = {"templat": "{prompt}"}
    base["trainer"]["args"]["learning_rat"] = 1e-4
    msg = str(problems(write(tmp_path, base)))
    assert "modle: unknown key 'modle'. Did you mean 'model'?" in msg
    assert "model.lora.alpah: unknown key 'alpah'. Did you mean 'lora_alpha'?" in msg
    assert "teacher.params.templat: unknown key 'templat'. Did you mean 'template'?" in msg
    assert "trainer.args.learning_rat: unknown trainer argument. Did you mean 'learning_rate'?" in msg
    assert "has 4 problems" in msg  # all collected, not just the first


def test_missing_required_slots(base, tmp_path):
    del base["model"]
    del base["teacher"]
    msg = str(problems(write(tmp_path, base)))
    assert "model: required key is missing" in msg
    msg = str(problems(write(tmp_path, {k: v for k, v in base.items() if k != "output_dir"}, "b.yaml")))
    assert "output_dir: required key is missing" in msg


def test_divergence_without_teacher(base, opd_tiny_model_dir, tmp_path):
    del base["teacher"]
    msg = str(problems(write(tmp_path, base)))
    assert "teacher: required key is missing" in msg and "objective.divergence" in msg


def test_plugin_module_that_does_not_import(base, tmp_path):
    base["plugins"] = ["helpers.fake_plugins_pkg.broken_import"]
    msg = str(problems(write(tmp_path, base)))
    assert "plugins[0]: error importing plugin 'helpers.fake_plugins_pkg.broken_import'" in msg


def test_two_plugins_same_component_name(base, tmp_path):
    base["plugins"] = ["helpers.fake_plugins_pkg.duplicate"]
    msg = str(problems(write(tmp_path, base)))
    assert "divergence 'reverse_kl' is registered by both" in msg


def test_misspelled_hookimpl_in_recipe_plugin(base, tmp_path):
    base["plugins"] = ["helpers.fake_plugins_pkg.misspelled"]
    msg = str(problems(write(tmp_path, base)))
    assert "plugins[0]" in msg and "'opd_regster_components' is not a known hook" in msg


def test_full_vocab_divergence_from_sampled_only_teacher(base, tmp_path):
    base["plugins"] = ["helpers.fake_plugins_pkg.good"]
    base["teacher"] = {"name": "sampled_only"}
    base["divergence"] = {"name": "reverse_kl", "params": {"estimator": "full"}}
    msg = str(problems(write(tmp_path, base)))
    assert "needs 'full' teacher scores" in msg and "provides only sampled" in msg


def test_num_generations_must_divide_batch(base, tmp_path):
    base["trainer"]["args"]["num_generations"] = 3
    msg = str(problems(write(tmp_path, base)))
    assert "trainer.args.num_generations: num_generations=3 does not divide the generation batch of 4" in msg


def test_grpo_needs_groups(base, tmp_path):
    base["trainer"]["args"].update(num_generations=1, per_device_train_batch_size=4)
    assert "needs groups of at least 2" in str(problems(write(tmp_path, base)))


def test_gpu_only_options_on_cpu(base, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CPU-only check does not apply")
    base["trainer"]["args"]["bf16"] = True
    msg = str(problems(write(tmp_path, base)))
    assert "trainer.args.bf16: bf16: true needs a GPU" in msg


def test_override_of_unknown_key_is_named(base, tmp_path):
    p = write(tmp_path, base)
    msg = str(problems(p, ["teacher.params.top_kk=3"]))
    assert "teacher.params.top_kk: unknown key 'top_kk'. Did you mean 'top_k'?" in msg
    assert "from command-line override 'teacher.params.top_kk=3'" in msg
    recipe, _ = load_recipe(p, ["teacher.params.top_k=3", "trainer.args.max_steps=7"])
    assert recipe.teacher.params["top_k"] == 3 and recipe.trainer.args["max_steps"] == 7
    assert "not of the form" in str(problems(p, ["teacher.params.top_k"]))


def test_nonexistent_model_path(base, tmp_path):
    base["model"]["name_or_path"] = str(tmp_path / "no-such-model")
    assert "model.name_or_path" in str(problems(write(tmp_path, base)))


def test_cli_validate_reports_without_traceback(base, tmp_path):
    base["divergence"]["name"] = "revers_kl"
    p = write(tmp_path, base)
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "opd_plugins", "validate", str(p)], capture_output=True, text=True)
    elapsed = time.time() - t0
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "Did you mean 'reverse_kl'?" in out.stderr and str(p) in out.stderr
    print(f"validate answered in {elapsed:.1f}s")
    ok = write(tmp_path, {**base, "divergence": {"name": "reverse_kl"}}, "ok.yaml")
    out = subprocess.run([sys.executable, "-m", "opd_plugins", "validate", str(ok)], capture_output=True, text=True)
    assert out.returncode == 0 and "valid" in out.stdout, out.stderr


def test_validate_never_loads_a_model(base, tmp_path, monkeypatch):
    import transformers

    def boom(*a, **k):
        raise AssertionError("validate loaded a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    load_recipe(write(tmp_path, base))


def test_disabled_recipe_plugin_is_skipped(base, tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_DISABLE_PLUGINS", "helpers.fake_plugins_pkg.broken_import")
    base["plugins"] = ["helpers.fake_plugins_pkg.broken_import"]
    recipe, pm = load_recipe(write(tmp_path, base))
    assert "helpers.fake_plugins_pkg.broken_import" not in pm.infos


def test_secret_looking_override_values_are_not_echoed(base, tmp_path):
    path = write(tmp_path, base)
    err = problems(path, ["teacher.params.api_key=sk-VERYSECRET", "model.token=hf_ALSOSECRET"])
    msg = str(err)
    assert "teacher.params.api_key: unknown key 'api_key'" in msg and "model.token: unknown key 'token'" in msg
    assert "VERYSECRET" not in msg and "ALSOSECRET" not in msg
    assert "teacher.params.api_key=***" in msg


def test_rollout_trainer_args_and_peer_rules(base, tmp_path):
    """A rollout backend's own trainer arguments must agree with trainer.args, and a component may object to the
    recipe's other components (peer_problems), both reported under their YAML keys before any model loads."""
    base["plugins"] = ["helpers.fake_plugins_pkg.peers"]
    base["rollout"] = {"name": "picky_rollout"}
    base["trainer"]["args"]["temperature"] = 0.9
    msg = str(problems(write(tmp_path, base)))
    assert "trainer.args.temperature: rollout 'picky_rollout' sets temperature: 0.5, but trainer.args sets 0.9" in msg
    assert "rollout: picky_rollout cannot run with a teacher" in msg
    base["trainer"]["args"]["temperature"] = 0.5
    del base["teacher"], base["divergence"]
    base["objective"] = {"policy_gradient": 1.0}
    recipe, _ = load_recipe(write(tmp_path, base))
    from opd_plugins.runs.opd import build_config

    assert build_config(recipe, recipe.components["rollout"]).temperature == 0.5


def test_reward_to_go_without_a_divergence_reward_is_refused(base, tmp_path):
    base["objective"] = {"policy_gradient": 1.0, "divergence": 0.0, "divergence_reward_to_go": True}
    assert "objective.divergence_reward_to_go: is true but objective.divergence_reward is 0 at every step" in \
        str(problems(write(tmp_path, base)))
    base["objective"]["divergence_reward"] = 1.0
    recipe, _ = load_recipe(write(tmp_path, base))
    assert recipe.objective.divergence_reward_to_go


def test_sampler_reading_a_missing_column_is_refused_before_any_model_loads(base, tmp_path, monkeypatch):
    import json

    import transformers

    from opd_plugins.errors import DataError
    from opd_plugins.runs.opd import train

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the data was checked")

    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"What is {i} - 1?", "answer": str(i - 1)}) for i in range(8)))
    base["data"] = {"dataset": {"path": str(data)}, "task": {"name": "numeric_answer"}}
    base["sampler"] = {"name": "oracle_prefix"}
    base.pop("teacher"), base.pop("divergence")
    base["objective"] = {"policy_gradient": 1.0}
    recipe, pm = load_recipe(write(tmp_path, base))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(DataError, match=r"sampler 'oracle_prefix' reads column\(s\) solution \(sampler.params\)"):
        train(recipe, pm)


def test_sampler_bad_inputs_are_refused_at_validation(base, tmp_path):
    base.pop("teacher"), base.pop("divergence")
    base["objective"] = {"policy_gradient": 1.0}
    base["sampler"] = {"name": "guide", "params": {"quantile": 1.5}}
    assert "sampler.params.quantile" in str(problems(write(tmp_path, base)))
    base["sampler"] = {"name": "hint_ladder", "params": {"low": 0.5, "high": 0.2}}
    assert "low (0.5) must be below high (0.2)" in str(problems(write(tmp_path, base)))
    base["sampler"] = {"name": "oracle_prefix", "params": {"fractions": [0.5, 0.25]}}
    assert "fractions must be distinct, ascending" in str(problems(write(tmp_path, base)))
    base["sampler"] = {"name": "guide"}
    base["rollout"] = {"name": "replay", "params": {"path": str(tmp_path)}}
    msg = str(problems(write(tmp_path, base)))
    assert "sampler 'guide' swaps prompts" in msg and "rollout 'replay' reports none" in msg


def test_a_prefix_longer_than_the_completion_is_refused(base, tmp_path):
    base.pop("teacher"), base.pop("divergence")
    base["objective"] = {"policy_gradient": 1.0}
    base["trainer"]["args"]["max_completion_length"] = 32
    base["sampler"] = {"name": "prefix_rl", "params": {"max_prefix_tokens": 32}}
    assert "sampler.params.max_prefix_tokens: 32 leaves no room in trainer.args.max_completion_length=32" in \
        str(problems(write(tmp_path, base)))
    base["sampler"]["params"]["max_prefix_tokens"] = 16
    load_recipe(write(tmp_path, base))
