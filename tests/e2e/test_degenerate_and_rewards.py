"""Degenerate groups (keep / drop), bad reward values, and the policy version stored on every rollout."""

import math

import pytest
from helpers.tiny import even_token_reward, history, trainer

from opd_plugins.errors import OPDError
from opd_plugins.testing import build_tiny_model
from opd_plugins.trainers import Components, OPDConfig


def constant_reward(completions, **kwargs):
    return [1.0] * len(completions)


def distilling():
    return Components.build(teacher="self_context", divergence="reverse_kl", pg_weight=1.0, div_weight=1.0)


@pytest.mark.parametrize("policy", ["keep", "drop"])
def test_all_degenerate_groups_kept_or_dropped(policy, tmp_path, opd_tokenizer):
    # Every group is degenerate (constant reward): the policy-gradient term is 0 either way, but only "keep"
    # leaves the divergence term a gradient.
    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0), components=distilling(),
                 reward_funcs=[constant_reward], max_steps=2, degenerate_groups=policy)
    tr.train()
    assert history(tr, "opd/degenerate_group_frac") == [1.0, 1.0]
    grads = history(tr, "grad_norm")
    if policy == "keep":
        assert min(grads) > 0 and not history(tr, "opd/dropped_completion_frac")
    else:
        assert grads == [0.0, 0.0]
        assert history(tr, "opd/dropped_completion_frac") == [1.0, 1.0]


def test_drop_removes_only_the_degenerate_groups(tmp_path, opd_tokenizer):
    # Prompts 0 and 2 of each batch of 4 get a constant reward; the others a varying one.
    def half_degenerate(prompts, completion_ids, **kwargs):
        return [1.0 if "3 + 4" in p[-1]["content"] or "larger" in p[-1]["content"] else even_token_reward([ids])[0]
                for p, ids in zip(prompts, completion_ids)]

    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0), components=distilling(),
                 reward_funcs=[half_degenerate], max_steps=3, per_device_train_batch_size=8,
                 degenerate_groups="drop")
    tr.train()
    dropped, degenerate = history(tr, "opd/dropped_completion_frac"), history(tr, "opd/degenerate_group_frac")
    assert len(dropped) == 3
    assert dropped == pytest.approx(degenerate)  # completions dropped = completions of the degenerate groups
    partial = [i for i, d in enumerate(dropped) if 0 < d < 1]
    assert partial, dropped  # some step had both kinds of group
    assert all(history(tr, "grad_norm")[i] > 0 for i in partial)  # the kept groups still train


def test_degenerate_groups_option_is_validated(tmp_path):
    with pytest.raises(ValueError, match="degenerate_groups must be 'keep' or 'drop'"):
        OPDConfig(output_dir=str(tmp_path), degenerate_groups="resample", use_cpu=True, bf16=False)


def test_nan_reward_is_an_error_naming_the_function_and_row(tmp_path, opd_tokenizer):
    def flaky_reward(completions, **kwargs):
        return [1.0, float("nan")] + [0.0] * (len(completions) - 2)

    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0),
                 reward_funcs=[flaky_reward], max_steps=1)
    with pytest.raises(OPDError, match=r"reward function 'flaky_reward' returned nan for row 1 .*prompt 'What is"):
        tr.train()


def test_none_rewards_are_unscored_not_errors(tmp_path, opd_tokenizer):
    def partial_reward(completion_ids, **kwargs):  # TRL's convention: None = this function does not score it
        return [None if i % 2 else r for i, r in enumerate(even_token_reward(completion_ids))]

    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0),
                 reward_funcs=[partial_reward, even_token_reward], max_steps=1)
    tr.train()
    assert all(math.isfinite(v) for v in history(tr, "loss"))


def test_async_reward_functions_are_checked_too(tmp_path, opd_tokenizer):
    async def async_inf_reward(completions, **kwargs):
        return [float("inf")] * len(completions)

    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0),
                 reward_funcs=[async_inf_reward], max_steps=1)
    assert tr.reward_func_names == ["async_inf_reward"]
    with pytest.raises(OPDError, match="reward function 'async_inf_reward' returned inf for row 0"):
        tr.train()


def test_every_rollout_carries_its_policy_version(tmp_path, opd_tokenizer):
    from helpers.tiny import config, prompt_dataset

    from opd_plugins.trainers import OPDTrainer

    seen = []

    class Recording(OPDTrainer):
        def compute_advantages(self, out, rows, scores, mask):
            seen.append((self.state.global_step, out["policy_version"].tolist()))
            return super().compute_advantages(out, rows, scores, mask)

    tr = Recording(model=build_tiny_model(opd_tokenizer, seed=0), components=Components(),
                   args=config(tmp_path / "run", max_steps=4, steps_per_generation=2, per_device_train_batch_size=4),
                   reward_funcs=[even_token_reward], train_dataset=prompt_dataset(), processing_class=opd_tokenizer)
    tr.train()
    assert [step for step, _ in seen] == [0, 2]  # one generation every two optimizer steps
    assert all(v == [step] * 4 * 2 for step, v in seen)
    # Updated one step after generating, the second half of each generation batch is one step stale.
    assert history(tr, "rollout/staleness") == [0.0, 1.0, 0.0, 1.0]
