"""Every lifecycle hook is called at its phase with the documented arguments (one test per hook)."""

import os

import pytest
from helpers.fake_plugins_pkg import recorder
from helpers.tiny import config, prompt_dataset

from opd_plugins.manager import get_plugin_manager
from opd_plugins.testing import build_tiny_model
from opd_plugins.trainers import Components, OPDTrainer


def constant_reward(completions, **kwargs):
    """All-equal rewards: every group is degenerate."""
    return [1.0] * len(completions)


@pytest.fixture(scope="module")
def calls(tmp_path_factory, opd_tokenizer):
    out = tmp_path_factory.mktemp("hooks")
    recorder.CALLS.clear()

    def build(max_steps):
        pm = get_plugin_manager(["helpers.fake_plugins_pkg.recorder"], entrypoints=False)
        comps = Components.build(pm, teacher="self_context", divergence="reverse_kl", pg_weight=1.0, div_weight=0.5)
        return OPDTrainer(model=build_tiny_model(opd_tokenizer), args=config(out, max_steps=max_steps,
                          save_strategy="steps", save_steps=1), components=comps, reward_funcs=[constant_reward],
                          train_dataset=prompt_dataset(), processing_class=opd_tokenizer, plugin_manager=pm)

    tr = build(1)
    tr.train()
    build(2).train(resume_from_checkpoint=os.path.join(out, "checkpoint-1"))
    return {"calls": list(recorder.CALLS), "trainer": tr, "out": out}


def _of(calls, name):
    found = [kw for n, kw in calls["calls"] if n == name]
    assert found, f"{name} was never called"
    return found


def test_hook_opd_register_components():
    pm = get_plugin_manager(["helpers.fake_plugins_pkg.good"], entrypoints=False)
    assert "sq_log_ratio" in pm.registry.names("divergence")


def test_hook_opd_trainer_init(calls):
    assert _of(calls, "opd_trainer_init")[0]["trainer"] is calls["trainer"]


def test_hook_opd_modify_prompts(calls):
    assert _of(calls, "opd_modify_prompts")[0] == {"n": 4}
    names = [n for n, _ in calls["calls"]]
    assert names.index("opd_modify_prompts") < names.index("opd_prompts_prepared")


def test_hook_opd_prompts_prepared(calls):
    assert _of(calls, "opd_prompts_prepared")[0] == {"n": 4, "rows": 4, "system": True}  # sees the edited prompts


def test_hook_opd_train_end(calls):
    ends = _of(calls, "opd_train_end")
    assert [e["step"] for e in ends] == [1, 2]  # once per train() call (the first run, then the resumed one)
    names = [n for n, _ in calls["calls"]]
    assert names.index("opd_train_end") > names.index("opd_step_metrics")


def test_hook_opd_rollout_end(calls):
    first = _of(calls, "opd_rollout_end")[0]
    assert first["n"] == 4 and {"completion_ids", "logprobs", "policy_version", "prompt_ids"} <= set(first["keys"])


def test_hook_opd_rewards_scored(calls):
    assert _of(calls, "opd_rewards_scored")[0] == {"shape": (4, 1), "names": ["constant_reward"]}


def test_hook_opd_teacher_scored(calls):
    assert _of(calls, "opd_teacher_scored")[0]["shape"][0] == 4


def test_hook_opd_degenerate_groups(calls):
    assert _of(calls, "opd_degenerate_groups")[0] == {"groups": [0]}


def test_hook_opd_modify_advantages(calls):
    assert _of(calls, "opd_modify_advantages")[0] == {"shape": (4,)}


def test_hook_opd_advantages_computed(calls):
    first = _of(calls, "opd_advantages_computed")[0]
    assert first["shape"] == (4,)
    assert first["values"] == [0.25] * 4  # all-equal rewards give 0, and opd_modify_advantages added 0.25


def test_hook_opd_loss_terms(calls):
    assert _of(calls, "opd_loss_terms")[0]["terms"] == ["divergence", "policy_gradient"]
    assert any("opd/loss/recorder_zero" in h for h in calls["trainer"].state.log_history)


def test_hook_opd_step_metrics(calls):
    assert _of(calls, "opd_step_metrics")[0]["mode"] == "train"
    assert any("recorder/calls" in h for h in calls["trainer"].state.log_history)


def test_hook_opd_checkpoint_save(calls):
    saved = _of(calls, "opd_checkpoint_save")[0]["dir"]
    assert ".staging" in saved  # written before the checkpoint is published
    assert (calls["out"] / "checkpoint-1" / "recorder.txt").read_text() == "saved"


def test_hook_opd_checkpoint_load(calls):
    loaded = _of(calls, "opd_checkpoint_load")[0]
    assert loaded["dir"].endswith("checkpoint-1") and loaded["content"] == "saved"
