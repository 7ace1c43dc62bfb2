"""Each built-in sampler on a tiny model: it guides the prompt whose groups all fail, and no other; the trainer
applies the guidance (prefix tokens out of the loss, swapped prompts) and logs the roles; state survives a resume."""

import json

import pytest
import torch
from helpers.tiny import history, prompt_dataset, trainer

from opd_plugins.samplers._common import prompt_text
from opd_plugins.testing import build_tiny_model
from opd_plugins.trainers import Components

HARD = "What is 3 + 4?"


def _dataset():
    ds = prompt_dataset(4)
    return ds.add_column("solution", [f"Work it out step by step: {a} is the result. The answer is {a}."
                                      for a in ds["answer"]])


def hard_fails(prompts, completions, **kwargs):
    """1 for every prompt but HARD, whose rollouts always fail."""
    return [0.0 if HARD in prompt_text(p) else 1.0 for p in prompts]


def _run(tmp_path, tokenizer, sampler, reward=hard_fails, steps=12, **cfg):
    comps = Components.build(pg_weight=1.0, sampler=sampler)
    tr = trainer(tmp_path / "run", tokenizer, build_tiny_model(tokenizer, seed=0), components=comps,
                 reward_funcs=[reward], dataset=_dataset(), max_steps=steps, per_device_train_batch_size=4,
                 num_generations=4, max_completion_length=8, gradient_accumulation_steps=1, **cfg)
    visits = []  # (question, roles) per generation batch
    original = comps.sampler.prepare

    def spy(prompts, rows, step):
        out = original(prompts, rows, step)
        visits.append((prompt_text(rows[0]["prompt"]), [g.role for g in out.guidance]))
        return out

    comps.sampler.prepare = spy
    batches = []
    generate = tr._generate_and_score_completions

    def keep(inputs):
        out = generate(inputs)
        batches.append(out)
        return out

    tr._generate_and_score_completions = keep
    tr.train()
    return tr, visits, batches


def _check_fires_only_on_the_failing_prompt(visits, role):
    hard = [roles for q, roles in visits if q == HARD]
    assert len(hard) >= 2, "the failing prompt was drawn fewer than twice: no chance to guide it"
    assert hard[0] == ["none"] * 4  # nothing is known yet at its first visit
    assert all(r == role for roles in hard[1:] for r in roles)  # all-fail since: guided every time
    assert all(r == "none" for q, roles in visits if q != HARD for r in roles)  # the others never


@pytest.mark.parametrize("sampler, role", [
    (("oracle_prefix", {"mix": 1.0}), "context"),
    (("oracle_prefix", {"mix": 1.0, "role": "prefix"}), "prefix"),
    (("guide", {"mixin": 0.0}), "swap"),
    (("guide", {"mixin": 0.0, "role": "context"}), "context"),
    (("hint_ladder", {"low": 0.1, "high": 0.35}), "context"),
    (("self_hint", {"mixin": 0.0, "max_new_tokens": 8, "temperature": 1.0}), "context"),
], ids=lambda x: x if isinstance(x, str) else f"{x[0]}-{x[1].get('role', '')}")
def test_sampler_fires_on_the_all_fail_prompt_and_not_otherwise(tmp_path, opd_tokenizer, sampler, role):
    tr, visits, batches = _run(tmp_path, opd_tokenizer, sampler)
    _check_fires_only_on_the_failing_prompt(visits, role)
    shares = history(tr, f"sampler/role/{role}")
    assert len(shares) == len(visits) and max(shares) == 1.0 and min(shares) == 0.0
    guided = [b for b in batches if "sampler_role" in b]
    assert guided and all(bool((b["sampler_role"] > 0).all()) for b in guided)
    if role == "prefix":  # the forced tokens are out of TRL's mask and the normaliser
        for b in guided:
            assert "tool_mask" in b and bool((b["tool_mask"][:, 0] == 0).all())
            assert float(b["num_items_in_batch"]) == float((b["completion_mask"] * b["tool_mask"]).sum())
    if role == "swap":  # trained on the original prompt: the batch's prompt tokens are the task's
        plain = next(b for b in batches if "sampler_role" not in b)
        hinted = guided[0]
        assert "swap_behaviour_logps" in hinted
        text = opd_tokenizer.batch_decode(hinted["prompt_ids"], skip_special_tokens=True)[0]
        assert HARD in text and "Hint" not in text
        assert plain["prompt_ids"].shape[1] <= hinted["prompt_ids"].shape[1] + 8


def test_prefix_rl_starts_hard_rollouts_from_a_stored_success(tmp_path, opd_tokenizer):
    seen: dict[str, int] = {}

    def first_visit_succeeds(prompts, completions, **kwargs):  # HARD succeeds once, then fails
        q = prompt_text(prompts[0])
        seen[q] = seen.get(q, 0) + 1
        return [1.0 if (HARD not in q or seen[q] == 1) else 0.0 for _ in prompts]

    tr, visits, batches = _run(tmp_path, opd_tokenizer, ("prefix_rl", {"min_fraction": 0.5, "max_fraction": 0.5}),
                               reward=first_visit_succeeds, steps=16)
    hard = [roles for q, roles in visits if q == HARD]
    assert len(hard) >= 3
    assert hard[0] == hard[1] == ["none"] * 4  # a success stored at visit 1, the all-fail at visit 2
    assert all(r == "prefix" for roles in hard[2:] for r in roles)
    assert all(r == "none" for q, roles in visits if q != HARD for r in roles)
    stored = tr.components.sampler.store
    assert any(len(traces) >= 1 for traces in stored.values())


def test_sampler_state_survives_a_resume(tmp_path, opd_tokenizer):
    tr, _, _ = _run(tmp_path, opd_tokenizer, ("hint_ladder", {}), steps=6, save_strategy="steps", save_steps=3)
    saved = json.loads((tmp_path / "run" / "checkpoint-3" / "opd_components.json").read_text())["sampler"]
    assert saved["levels"]  # the failing prompt has a level by then
    comps = Components.build(pg_weight=1.0, sampler="hint_ladder")
    resumed = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0), components=comps,
                      reward_funcs=[hard_fails], dataset=_dataset(), max_steps=3, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=8, gradient_accumulation_steps=1)
    loaded = []
    original = comps.sampler.load_state_dict

    def spy(state):
        original(state)
        loaded.append(json.loads(json.dumps(comps.sampler.state_dict())))  # right after the checkpoint's load

    comps.sampler.load_state_dict = spy
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert loaded == [saved]


def test_no_guidance_at_evaluation(tmp_path, opd_tokenizer):
    from helpers.tiny import config

    from opd_plugins.trainers import OPDTrainer

    comps = Components.build(pg_weight=1.0, sampler=("hint_ladder", {}))
    comps.sampler.levels = {k: 3 for k in ()}  # filled below
    tr = OPDTrainer(model=build_tiny_model(opd_tokenizer, seed=0),
                    args=config(tmp_path / "run", max_steps=1, eval_strategy="steps", eval_steps=1,
                                per_device_eval_batch_size=4),
                    components=comps, reward_funcs=[hard_fails], train_dataset=_dataset(), eval_dataset=_dataset(),
                    processing_class=opd_tokenizer)
    from opd_plugins.samplers.base import prompt_key

    comps.sampler.levels = {prompt_key(row): 3 for row in _dataset()}  # every prompt at the top level
    calls = []
    original = comps.sampler.prepare
    comps.sampler.prepare = lambda *a, **k: calls.append(tr.model.training) or original(*a, **k)
    tr.train()
    assert calls and all(calls)  # only ever asked in training mode
    assert torch.isfinite(torch.tensor(history(tr, "eval_loss"))).all()
