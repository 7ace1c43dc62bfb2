"""Records every lifecycle hook call (and contributes a loss term and a metric), for tests/e2e/test_hooks.py."""

import torch

from opd_plugins import hookimpl

CALLS: list[tuple[str, dict]] = []


@hookimpl
def opd_trainer_init(trainer):
    CALLS.append(("opd_trainer_init", {"trainer": trainer}))


@hookimpl
def opd_train_end(trainer):
    CALLS.append(("opd_train_end", {"step": trainer.state.global_step}))


@hookimpl
def opd_modify_prompts(trainer, prompts, rows):
    """Adds a system message to every prompt (an in-place edit the rollout must see)."""
    for p in prompts:
        if isinstance(p, list) and p[0].get("role") != "system":
            p.insert(0, {"role": "system", "content": "Answer briefly."})
    CALLS.append(("opd_modify_prompts", {"n": len(prompts)}))


@hookimpl
def opd_prompts_prepared(trainer, prompts, rows):
    CALLS.append(("opd_prompts_prepared", {"n": len(prompts), "rows": len(rows),
                                           "system": all(isinstance(p, list) and p[0]["role"] == "system"
                                                         for p in prompts)}))


@hookimpl
def opd_rollout_end(trainer, rollout):
    CALLS.append(("opd_rollout_end", {"keys": sorted(rollout), "n": len(rollout["completion_ids"])}))


@hookimpl
def opd_rewards_scored(trainer, rewards_per_func, reward_names):
    CALLS.append(("opd_rewards_scored", {"shape": tuple(rewards_per_func.shape), "names": reward_names}))


@hookimpl
def opd_teacher_scored(trainer, batch, scores):
    CALLS.append(("opd_teacher_scored", {"shape": tuple(scores.token_logps.shape)}))


@hookimpl
def opd_degenerate_groups(trainer, groups, rewards):
    CALLS.append(("opd_degenerate_groups", {"groups": list(groups)}))


@hookimpl
def opd_modify_advantages(trainer, batch, advantages):
    """Adds 0.25 to every advantage (an in-place edit the loss must see)."""
    advantages += 0.25
    CALLS.append(("opd_modify_advantages", {"shape": tuple(advantages.shape)}))


@hookimpl
def opd_advantages_computed(trainer, batch, advantages):
    CALLS.append(("opd_advantages_computed", {"shape": tuple(advantages.shape), "values": advantages.tolist()}))


@hookimpl
def opd_loss_terms(trainer, inputs, terms):
    CALLS.append(("opd_loss_terms", {"terms": sorted(terms)}))
    return {"recorder_zero": torch.zeros(())}


@hookimpl
def opd_step_metrics(trainer, inputs, mode):
    CALLS.append(("opd_step_metrics", {"mode": mode}))
    return {"recorder/calls": float(len(CALLS))}


@hookimpl
def opd_checkpoint_save(trainer, checkpoint_dir):
    CALLS.append(("opd_checkpoint_save", {"dir": checkpoint_dir}))
    with open(f"{checkpoint_dir}/recorder.txt", "w") as f:
        f.write("saved")


@hookimpl
def opd_checkpoint_load(trainer, checkpoint_dir):
    with open(f"{checkpoint_dir}/recorder.txt") as f:
        CALLS.append(("opd_checkpoint_load", {"dir": checkpoint_dir, "content": f.read()}))
