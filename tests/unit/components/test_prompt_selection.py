"""Prompt selections against a reward oracle with known per-prompt success probabilities, and the sampler that
feeds their chunks to the trainer (TRL's RepeatSampler structure), through a loader as the trainer reads it."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch.utils.data import DataLoader
from trl.trainer.utils import RepeatSampler

from opd_plugins.prompt_selection import (
    ReinforceAdaSelection,
    SelectionSampler,
    UniformSelection,
    VarianceSelection,
    build_selection_sampler,
)
from opd_plugins.prompt_selection.variance import sample_beta
from opd_plugins.testing.contracts import oracle_rewards

N, K, G, CHUNKS = 40, 8, 4, 200
P = torch.arange(N, dtype=torch.float64) / (N - 1)  # prompt i succeeds with probability i / 39


def simulate(selection, chunks=CHUNKS, seed=0, start=0):
    """select → G Bernoulli rewards per prompt → observe, ``chunks`` times; per chunk the indices, the mean true
    p(1−p) of the selected prompts and the fraction of degenerate groups."""
    gen = torch.Generator().manual_seed(seed * 7919 + start)
    picked, pq, degenerate = [], [], []
    for step in range(start, start + chunks):
        chosen = selection.select(K, N, step)
        rewards = oracle_rewards(chosen, N, G, gen)
        selection.observe(chosen, rewards, step)
        p = P[chosen]
        picked.append(chosen)
        pq.append(float((p * (1 - p)).mean()))
        degenerate.append(float(((rewards.min(1).values == rewards.max(1).values).double()).mean()))
    return picked, sum(pq) / len(pq), sum(degenerate) / len(degenerate)


@pytest.fixture(scope="module")
def runs():
    return {name: simulate(cls()) for name, cls in
            (("uniform", UniformSelection), ("variance", VarianceSelection), ("reinforce_ada", ReinforceAdaSelection))}


def test_uniform_visits_every_prompt_once_per_epoch(runs):
    picked, pq, _ = runs["uniform"]
    per_epoch = N // K
    for e in range(CHUNKS // per_epoch):
        epoch = [i for chunk in picked[e * per_epoch:(e + 1) * per_epoch] for i in chunk]
        assert sorted(epoch) == list(range(N))
    assert picked[:per_epoch] != picked[per_epoch:2 * per_epoch]  # a new order each epoch
    assert abs(pq - float((P * (1 - P)).mean())) < 1e-9


def test_variance_posteriors_converge_to_the_true_probabilities():
    selection = VarianceSelection()
    simulate(selection)
    mean = selection.posterior_mean(N)
    frequent = selection.observed >= 10 * G
    assert int(frequent.sum()) >= 10
    error = float((mean[frequent] - P[frequent]).abs().mean())
    assert error < 0.06, error
    assert int((selection.observed > 0).sum()) == N  # every prompt was explored at least once


def test_variance_concentrates_near_one_half_and_cuts_degenerate_groups(runs):
    _, pq_uniform, deg_uniform = runs["uniform"]
    _, pq_variance, deg_variance = runs["variance"]
    assert pq_variance > pq_uniform + 0.04, (pq_variance, pq_uniform)  # measured 0.23 vs 0.16 (max 0.25)
    assert deg_variance < deg_uniform - 0.1, (deg_variance, deg_uniform)  # measured ~0.17 vs ~0.41


def test_variance_logs_its_selection():
    selection = VarianceSelection()
    selection.select(K, N, 0)
    assert selection.last_stats == {"mean_pq": 0.25, "unseen_share": 1.0}  # the prior's mean is 0.5
    simulate(selection, chunks=50)
    assert 0.15 < selection.last_stats["mean_pq"] <= 0.25 and selection.last_stats["unseen_share"] == 0.0


def test_variance_decay_forgets_old_evidence():
    selection = VarianceSelection(VarianceSelection.Params(decay=0.5))
    selection.observe([3], torch.ones(1, G), 0)
    selection.observe([5], torch.zeros(1, G), 1)
    assert float(selection.successes[3]) == G * 0.5 and float(selection.failures[5]) == G


def test_beta_draws_have_the_beta_moments():
    gen = torch.Generator().manual_seed(0)
    for a, b in ((1.0, 1.0), (0.5, 0.5), (3.0, 7.0), (0.2, 5.0), (50.0, 20.0)):
        x = sample_beta(torch.full((100_000,), a), torch.full((100_000,), b), gen)
        mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
        assert abs(float(x.mean()) - mean) < 0.01 and abs(float(x.var()) - var) < 0.1 * var + 1e-4, (a, b)


@pytest.mark.parametrize("cls", [UniformSelection, VarianceSelection, ReinforceAdaSelection])
def test_checkpoint_mid_run_gives_identical_next_selections(cls):
    selection = cls()
    simulate(selection, chunks=100)
    restored = cls()
    restored.load_state_dict(yaml.safe_load(yaml.safe_dump(
        {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in selection.state_dict().items()})))
    assert simulate(restored, chunks=50, start=100)[0] == simulate(selection, chunks=50, start=100)[0]


def test_the_seed_changes_the_draws_and_the_trainer_seed_fills_in():
    a, b, c = VarianceSelection(), VarianceSelection(VarianceSelection.Params(seed=1)), VarianceSelection()
    c.bind_data_order(1)
    assert a.select(K, N, 0) != b.select(K, N, 0) == c.select(K, N, 0)


def test_reinforce_ada_measured_against_uniform(runs):
    """With fixed success probabilities a degenerate group mostly comes from p ≈ 0 or 1, and its retries are
    degenerate again: re-drawing costs groups here (measured 0.50 vs 0.42). It pays off when the policy moves."""
    _, pq, deg = runs["reinforce_ada"]
    _, pq_uniform, deg_uniform = runs["uniform"]
    assert deg > deg_uniform + 0.03 and pq < pq_uniform, (pq, deg, pq_uniform, deg_uniform)


def appearances(picked, prompt):
    return [c for c, chunk in enumerate(picked) if prompt in chunk]


@pytest.mark.parametrize("max_retries", [0, 1, 2, 3])
def test_reinforce_ada_retries_a_degenerate_prompt_at_most_max_retries_times(max_retries):
    selection = ReinforceAdaSelection(ReinforceAdaSelection.Params(max_retries=max_retries))
    picked, shares = [], []
    for step in range(N // K):  # within one epoch of uniform order; every group degenerate (all rewards 0)
        chosen = selection.select(K, N, step)
        selection.observe(chosen, torch.zeros(K, G), step)
        picked.append(chosen)
        shares.append(selection.last_stats["retried_share"])
    first = picked[0][0]
    assert appearances(picked, first) == list(range(1 + max_retries))  # re-drawn in the next chunks, then left
    blocks = [picked[i:i + 1 + max_retries] for i in range(0, len(picked), 1 + max_retries)]
    assert all(chunk == block[0] for block in blocks for chunk in block)  # each fresh chunk retried as a whole
    fresh = [i for block in blocks for i in block[0]]
    assert len(fresh) == len(set(fresh))  # then the epoch order moves on
    assert shares == [0.0 if c % (1 + max_retries) == 0 else 1.0 for c in range(N // K)]


def test_reinforce_ada_stops_retrying_once_a_group_has_signal():
    selection = ReinforceAdaSelection()
    picked = []
    for step in range(4):
        chosen = selection.select(K, N, step)
        rewards = torch.zeros(K, G)
        if step:
            rewards[:, 0] = 1.0  # every retry (and every later group) has both outcomes
        selection.observe(chosen, rewards, step)
        picked.append(chosen)
    assert picked[1] == picked[0] and not set(picked[2]) & set(picked[0])
    assert selection.queue == [] and selection.retries == {}


def test_reinforce_ada_without_retries_is_uniform():
    assert simulate(ReinforceAdaSelection(ReinforceAdaSelection.Params(max_retries=0)))[0] == \
        simulate(UniformSelection())[0]


# -- the sampler -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, mini, batch, repeat, shuffle, seed", [
    (23, 3, 5, 2, True, 42), (40, 4, 8, 1, True, 0), (12, 2, 4, 3, False, 1), (7, 2, 3, 4, True, None),
])
def test_uniform_sampler_reproduces_trls_repeat_sampler(n, mini, batch, repeat, shuffle, seed):
    data = list(range(n))
    trl = RepeatSampler(data, mini, batch_size=batch, repeat_count=repeat, shuffle=shuffle,
                        seed=0 if seed is None else seed)
    ours = SelectionSampler(data, mini, batch_size=batch, repeat_count=repeat, shuffle=shuffle, seed=seed,
                            selection=UniformSelection())
    assert len(ours) == len(trl)
    for _ in range(3):  # epochs
        assert list(ours) == list(trl)


def test_build_selection_sampler_mirrors_grpos_arguments():
    data = list(range(30))
    ours = build_selection_sampler(UniformSelection(), data, num_generations=4, generation_batch_size=24,
                                   num_iterations=2, steps_per_generation=3, seed=42, step_fn=lambda: 0)
    trl = RepeatSampler(data, mini_repeat_count=4, batch_size=24 // 4, repeat_count=2 * 3, shuffle=True, seed=42)
    assert len(ours) == len(trl) and list(ours) == list(trl)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        build_selection_sampler(UniformSelection(), data, num_generations=5, generation_batch_size=24, num_iterations=1,
                                steps_per_generation=1, seed=0, step_fn=None)


def test_sampler_draws_each_chunk_lazily_with_the_trainer_step():
    selection, steps = VarianceSelection(), []
    sampler = SelectionSampler(list(range(N)), 2, batch_size=K, repeat_count=2, selection=selection,
                               step_fn=lambda: len(steps))
    it = iter(sampler)
    assert selection.draws == 0
    first = [next(it) for _ in range(2 * K * 2)]  # chunk 0, twice
    assert selection.draws == 1 and first[:2 * K] == first[2 * K:] and first[0] == first[1]
    chunk = first[:2 * K:2]
    selection.observe(chunk, torch.ones(K, G), 0)  # all solved: chunk 1 avoids them
    steps.append(1)
    second = [next(it) for _ in range(2 * K)][::2]
    assert selection.draws == 2 and not set(second) & set(chunk)


def test_the_loader_reads_one_chunk_ahead():
    """With one batch per chunk repetition, when the trainer gets chunk c's first batch, chunk c+1 is drawn only
    once it reads that chunk's last batch; with one repetition (``repeat_count=1``) it is drawn at once."""
    selection = UniformSelection()
    data = list(range(N))
    draws = [selection.draws for _ in loader_iter(selection, data, repeat_count=2)]
    assert draws[:4] == [1, 2, 2, 3]  # batch 1 (chunk 0's second repetition) comes with chunk 1 drawn
    selection = UniformSelection()
    draws = [selection.draws for _ in loader_iter(selection, data, repeat_count=1)]
    assert draws[:3] == [2, 3, 4]  # chunk c+1 drawn before chunk c is trained: the one-chunk lag


def loader_iter(selection, data, repeat_count):
    from accelerate.data_loader import prepare_data_loader

    sampler = SelectionSampler(data, G, batch_size=K, repeat_count=repeat_count, selection=selection)
    yield from prepare_data_loader(DataLoader(data, batch_size=K * G, sampler=sampler), put_on_device=False)


def train(selection, data, batches, epochs, skip=0, start_epoch=0, save_after=None):
    """A trainer's loop over the loader: each chunk's first batch is 'generated' and observed (rewards seeded by the
    chunk's number); returns every batch trained and the selection's state after batch ``save_after``."""
    from accelerate import skip_first_batches
    from accelerate.data_loader import prepare_data_loader

    sampler = SelectionSampler(data, G, batch_size=K, repeat_count=2, selection=selection)
    dl = prepare_data_loader(DataLoader(data, batch_size=K * G, sampler=sampler), put_on_device=False)
    seen, saved = [], None
    for epoch in range(start_epoch, epochs):
        epoch_dl = skip_first_batches(dl, skip) if epoch == start_epoch and skip else dl
        for b, batch in enumerate(epoch_dl, start=skip if epoch == start_epoch else 0):
            number = epoch * batches + b
            if b % 2 == 0:
                chosen = batch.tolist()[::G]
                selection.observe(chosen, oracle_rewards(chosen, len(data), G, torch.Generator().manual_seed(number)),
                                  number)
            seen.append(batch.tolist())
            if number == save_after:
                saved = selection.state_dict()
    return seen, saved


@pytest.mark.parametrize("save_after", [5, 9, 13])  # mid-epoch 0, the end of epoch 0, mid-epoch 1
@pytest.mark.parametrize("cls", [VarianceSelection, ReinforceAdaSelection, UniformSelection])
def test_a_resumed_run_trains_on_the_same_prompts(cls, save_after):
    data = list(range(N))
    batches = 2 * (N // K)  # per epoch
    whole, state = train(cls(), data, batches, epochs=3, save_after=save_after)
    restored = cls()
    restored.load_state_dict(state)
    done = save_after + 1
    resumed, _ = train(restored, data, batches, epochs=3, skip=done % batches, start_epoch=done // batches)
    assert resumed == whole[done:]


def test_recipe_slot_validates_and_soda_refuses_it(opd_tiny_model_dir, tmp_path):
    from opd_plugins.errors import RecipeError
    from opd_plugins.recipe.loader import validate_recipe
    from opd_plugins.trainers import Components

    base = {"model": {"name_or_path": str(opd_tiny_model_dir)}, "data": {"task": {"name": "arithmetic"}},
            "trainer": {"args": {"per_device_train_batch_size": 4, "num_generations": 4}}, "output_dir": str(tmp_path)}
    recipe, pm = validate_recipe(base, "r.yaml")
    assert recipe.prompt_selection.name == "uniform"
    recipe, pm = validate_recipe({**base, "prompt_selection": {"name": "variance", "params": {"decay": 0.9}}}, "r.yaml")
    components = Components.from_recipe(recipe, pm)
    assert isinstance(components.prompt_selection, VarianceSelection) and components.prompt_selection.params.decay == 0.9
    assert "prompt_selection" in components.named()
    assert isinstance(Components().prompt_selection, UniformSelection)
    with pytest.raises(RecipeError) as exc:
        validate_recipe({**base, "prompt_selection": {"name": "varience", "params": {"decay": 2}}}, "r.yaml")
    assert "prompt_selection.name: unknown prompt_selection 'varience'. Did you mean 'variance'?" in str(exc.value)
    soda = {**base, "trainer": {"name": "soda"}, "teacher": {"name": "blackbox_text", "params": {"source": "column"}},
            "prompt_selection": {"name": "variance"}}
    with pytest.raises(RecipeError) as exc:
        validate_recipe(soda, "r.yaml")
    assert "prompt_selection: not used by trainer 'soda'" in str(exc.value)
