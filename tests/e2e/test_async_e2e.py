"""Asynchronous rollouts in a real (tiny) training run: the same prompts in the same order as synchronous
generation, none lost or used twice, staleness within K, the correction sees the stale tokens; a resume keeps the
order and regenerates what was in flight."""

import pytest
import torch
from helpers.tiny import even_token_reward, history, trainer

from opd_plugins.testing import build_tiny_model
from opd_plugins.trainers import Components

ASYNC = ("async", {"backend": {"name": "perturbed_hf"}, "max_staleness": 1, "ahead": 1})


def _run(tmp_path, tokenizer, rollout, steps=6, resume=None, **cfg):
    comps = Components.build(pg_weight=1.0, rollout=rollout, correction="tis")
    tr = trainer(tmp_path / "run", tokenizer, build_tiny_model(tokenizer, seed=0), components=comps,
                 reward_funcs=[even_token_reward], max_steps=steps, gradient_accumulation_steps=1, **cfg)
    order = []
    generate = tr._generate_and_score_completions

    def spy(inputs):
        order.append([str(r["prompt"]) for r in inputs])
        return generate(inputs)

    tr._generate_and_score_completions = spy
    tr.train(resume_from_checkpoint=resume)
    tr.close_components()
    return tr, order


def test_async_trains_on_the_same_prompts_within_the_staleness_bound(tmp_path, opd_tokenizer):
    sync, sync_order = _run(tmp_path / "sync", opd_tokenizer, "perturbed_hf")
    tr, order = _run(tmp_path / "async", opd_tokenizer, ASYNC)
    assert order == sync_order  # every generation batch once, in the data order
    backend = tr.components.rollout
    assert backend.counts["hits"] >= 4 and backend.counts["dropped"] == 0
    assert set(backend.histogram()) <= {"0", "1"} and "1" in backend.histogram()  # used one step stale
    staleness = history(tr, "rollout/staleness")
    assert max(staleness) <= 1 and max(staleness) > 0
    assert max(history(tr, "correction/mismatch_kl")) > 0  # the stale copy's tokens are corrected
    assert all(torch.isfinite(torch.tensor(history(tr, "loss"))))


def test_a_resume_keeps_the_order_and_regenerates_what_was_in_flight(tmp_path, opd_tokenizer):
    _, full = _run(tmp_path / "full", opd_tokenizer, ASYNC, steps=4)
    _run(tmp_path / "cut", opd_tokenizer, ASYNC, steps=4, save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "cut" / "run" / "checkpoint-2"
    resumed, order = _run(tmp_path / "cut", opd_tokenizer, ASYNC, steps=4, resume=str(checkpoint))
    assert order == full[2:]  # steps 3 and 4: nothing lost, nothing trained twice
    counts = resumed.components.rollout.counts
    assert counts["regenerated_after_resume"] == 1 and counts["hits"] >= 1


def test_async_refusals(tmp_path, opd_tiny_model_dir):
    import yaml

    from opd_plugins.errors import RecipeError
    from opd_plugins.recipe import load_recipe

    recipe = {"model": {"name_or_path": str(opd_tiny_model_dir)}, "data": {"task": {"name": "arithmetic"}},
              "trainer": {"args": {"per_device_train_batch_size": 4, "num_generations": 4}},
              "objective": {"policy_gradient": 1.0}, "output_dir": str(tmp_path / "run"),
              "rollout": {"name": "async", "params": {"backend": {"name": "hf_generate"}}},
              "sampler": {"name": "guide"}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "rollout.params.backend: rollout 'async' generates in a background thread" in msg
    assert "sampler.name: rollout 'async' generates the next batches before sampler 'guide'" in msg
