"""prompt_selection in real (tiny) training runs: ``uniform`` trains on TRL's RepeatSampler order with the same
losses; ``variance`` observes every generation batch (the rows trained, the rewards the reward function gave) and
stops choosing prompts whose groups are degenerate; a resume gives the chunks of the uninterrupted run; an iterable
dataset is refused."""

import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers.tiny import history, trainer
from trl import GRPOTrainer
from trl.trainer.utils import RepeatSampler

from opd_plugins.errors import OPDError
from opd_plugins.report.render import key_settings
from opd_plugins.testing import build_tiny_model
from opd_plugins.trainers import Components
from opd_plugins.trainers.selection import DATASET_INDEX

N, G, K = 8, 4, 2  # prompts, rollouts per prompt, prompts per generation batch
ALWAYS, NEVER = {0, 1}, {2, 3}  # every rollout succeeds / fails: degenerate groups; prompts 4-7: half succeed
VARIANCE = ("variance", {"prior_alpha": 0.1, "prior_beta": 0.1, "epsilon": 1.0})


def _dataset():
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(N)],
                              "answer": [str(2 * i) for i in range(N)]})


class Rewarded:
    """The crafted reward (by dataset row and rollout position, never the completion's text), recording each
    call's row indices and rewards."""

    def __init__(self):
        self.calls = []
        self.__name__ = "crafted"

    def __call__(self, prompts, completions, **kwargs):
        rows = [int(i) for i in kwargs[DATASET_INDEX]]
        out = [1.0 if i in ALWAYS else 0.0 if i in NEVER else float(j % 2) for j, i in enumerate(rows)]
        self.calls.append((rows, out))
        return out


def _run(tmp_path, tokenizer, selection=None, steps=6, resume=None, plain_trl=False, **cfg):
    comps = Components.build(pg_weight=1.0, **({"prompt_selection": selection} if selection else {}))
    reward = Rewarded()
    tr = trainer(tmp_path / "run", tokenizer, build_tiny_model(tokenizer, seed=0), components=comps,
                 reward_funcs=[reward], dataset=_dataset(), max_steps=steps, per_device_train_batch_size=K * G,
                 num_generations=G, max_completion_length=4, gradient_accumulation_steps=1, **cfg)
    if plain_trl:  # TRL's own RepeatSampler
        tr._get_train_sampler = GRPOTrainer._get_train_sampler.__get__(tr)
    sel = tr.components.prompt_selection
    observed, drawn = [], []  # (indices, rewards, step) per observe; (chunk, observations so far) per select
    observe, select = sel.observe, sel.select

    def spy_observe(indices, rewards, step):
        observed.append((list(indices), rewards.clone(), step))
        return observe(indices, rewards, step)

    def spy_select(k, n, step):
        chunk = select(k, n, step)
        drawn.append((chunk, len(observed)))
        return chunk

    sel.observe, sel.select = spy_observe, spy_select
    tr.train(resume_from_checkpoint=resume)
    return tr, reward, observed, drawn


def _trained(reward):
    """The prompts of each generation batch, as the reward function saw them (one per group)."""
    return [rows[::G] for rows, _ in reward.calls]


def test_uniform_trains_on_trls_order_with_trls_losses(tmp_path, opd_tokenizer):
    ours, reward, observed, _ = _run(tmp_path / "ours", opd_tokenizer, "uniform")
    default, default_reward, _, _ = _run(tmp_path / "default", opd_tokenizer)  # no prompt_selection given
    trl, trl_reward, trl_observed, _ = _run(tmp_path / "trl", opd_tokenizer, plain_trl=True)
    repeat = RepeatSampler(list(range(N)), G, batch_size=K, seed=0)  # trainer.args.seed = 0
    expected = list(repeat) + list(repeat)  # two epochs
    expected = [expected[c * K * G:(c + 1) * K * G:G] for c in range(6)]
    assert _trained(reward) == _trained(default_reward) == _trained(trl_reward) == expected
    assert len({tuple(sorted(c)) for c in expected[:4]}) == 4 and expected[4] != expected[0]  # 1.5 shuffled epochs
    assert history(ours, "loss") == history(default, "loss") == history(trl, "loss")
    assert history(ours, "grad_norm") == history(trl, "grad_norm")
    assert [o[0] for o in observed] == expected and len(trl_observed) == 6  # observed even with TRL's sampler
    assert history(ours, "prompt_selection/epoch") == [0.0] * 4 + [1.0] * 2


def test_variance_observes_each_batch_and_stops_choosing_degenerate_prompts(tmp_path, opd_tokenizer):
    tr, reward, observed, drawn = _run(tmp_path, opd_tokenizer, VARIANCE, steps=12)
    assert len(observed) == len(reward.calls) == 12  # once per generation batch
    for (indices, rewards, step), (rows, values), t in zip(observed, reward.calls, range(12), strict=True):
        assert indices == rows[::G] and all(rows[g * G:(g + 1) * G] == [i] * G for g, i in enumerate(indices))
        assert torch.equal(rewards, torch.tensor(values).view(K, G)) and step == t
    trained = _trained(reward)
    assert [c for c, _ in drawn[:12]] == trained  # the chunks drawn are the chunks trained, in order
    # the one-chunk lag: chunk c is drawn having observed chunks < c-1; a pass's first two chunks are drawn together
    # when its iterator starts, after the previous pass's last chunk was observed (4 chunks a pass)
    assert [n for _, n in drawn[:12]] == [0, 0, 1, 2, 4, 4, 5, 6, 8, 8, 9, 10]
    seen: set[int] = set()
    before, after = [], []  # the chunks drawn while some prompt was unobserved, and once all were
    for chunk, n in drawn[:12]:
        seen = {i for indices, _, _ in observed[:n] for i in indices}
        (after if len(seen) == N else before).append(chunk)
    assert len(after) >= 6, drawn
    degenerate = ALWAYS | NEVER
    assert {i for c in before for i in c} == set(range(N))  # never-observed prompts first (epsilon)
    assert sum(i in degenerate for c in after for i in c) <= 1  # then (almost) only prompts with mixed groups
    sel = tr.components.prompt_selection
    mean = sel.posterior_mean(N)
    assert all(mean[i] > 0.9 for i in ALWAYS) and all(mean[i] < 0.1 for i in NEVER)
    assert all(abs(float(mean[i]) - 0.5) < 1e-9 for i in range(4, N))  # as many successes as failures
    assert len(history(tr, "prompt_selection/mean_pq")) == len(history(tr, "prompt_selection/unseen_share")) == 12


def test_variance_resumed_mid_epoch_draws_the_uninterrupted_runs_chunks(tmp_path, opd_tokenizer):
    full, full_reward, full_observed, full_drawn = _run(tmp_path / "full", opd_tokenizer, VARIANCE, steps=8,
                                               save_strategy="steps", save_steps=3)
    checkpoint = tmp_path / "full" / "run" / "checkpoint-3"  # 3 of an epoch's 4 chunks trained
    resumed, reward, observed, drawn = _run(tmp_path / "resumed", opd_tokenizer, VARIANCE, steps=8,
                                            resume=str(checkpoint))
    assert _trained(reward) == _trained(full_reward)[3:]
    assert [(o[0], o[2]) for o in observed] == [(o[0], o[2]) for o in full_observed[3:]]
    # the chunks drawn before the checkpoint (3 trained, 1 read ahead) are replayed, not drawn again
    assert len(drawn) == len(full_drawn) - 4 and [c for c, _ in drawn] == [c for c, _ in full_drawn[4:]]
    a, b = full.components.prompt_selection.state_dict(), resumed.components.prompt_selection.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def test_the_lookahead_reads_a_copy_of_the_selection(tmp_path, opd_tokenizer):
    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0),
                 components=Components.build(pg_weight=1.0, prompt_selection=VARIANCE), dataset=_dataset(),
                 per_device_train_batch_size=K * G, num_generations=G, gradient_accumulation_steps=1)
    live = tr.components.prompt_selection
    ahead = [[r[DATASET_INDEX] for r in batch] for batch, _ in zip(tr._lookahead_dataloader(), range(3))]
    assert live.draws == 0 and tr._loader_selection is None  # the run's selection drew nothing
    run = [[r[DATASET_INDEX] for r in batch] for batch, _ in zip(tr.get_train_dataloader(), range(3))]
    assert ahead == run and live.draws >= 3  # the same chunks, from the same state


def test_a_selection_other_than_uniform_refuses_an_iterable_dataset(tmp_path, opd_tokenizer):
    stream = _dataset().to_iterable_dataset()
    with pytest.raises(OPDError) as err:
        trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0),
                components=Components.build(pg_weight=1.0, prompt_selection="variance"), dataset=stream)
    msg = str(err.value)
    assert "prompt_selection.name: 'variance'" in msg and "iterable dataset" in msg
    assert "prompt_selection.name: uniform" in msg
    # uniform streams in TRL's own order: trained, nothing observed (the rows have no index)
    comps = Components.build(pg_weight=1.0)
    streamed = trainer(tmp_path / "stream", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0), components=comps,
                       reward_funcs=[lambda completions, **kw: [0.0] * len(completions)], dataset=stream, max_steps=1,
                       per_device_train_batch_size=K * G, num_generations=G, max_completion_length=4)
    calls = []
    comps.prompt_selection.observe = lambda *a: calls.append(a)
    streamed.train()
    assert streamed.state.global_step == 1 and calls == []


def test_reports_show_the_selection():
    rows = dict(key_settings({"sampler": {"name": "none"}, "prompt_selection": {"name": "variance",
                                                                                 "params": {"decay": 0.9}}}))
    assert rows["prompt_selection"] == "variance(decay=0.9)"


def test_the_docs_recipe_validates(tmp_path):
    from opd_plugins.recipe import load_recipe

    doc = (Path(__file__).parents[2] / "docs" / "prompt_selection.md").read_text()
    block = re.search(r"### In a recipe.*?```yaml\n(.*?)```", doc, re.S).group(1)
    path = tmp_path / "r.yaml"
    path.write_text(block)
    recipe, pm = load_recipe(path)
    selection = Components.from_recipe(recipe, pm).prompt_selection
    assert selection.name == "variance" and selection.params.decay == 0.95 and selection.params.threshold == 1.0
