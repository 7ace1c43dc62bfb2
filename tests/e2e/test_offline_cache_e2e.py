"""Offline OPD end to end: precompute a teacher cache from a rollout file, then train on it with no teacher loaded."""

import json

import pytest
import torch
from helpers.tiny import config, history

from opd_plugins.data.loading import DatasetSource, load_source
from opd_plugins.manager import get_plugin_manager
from opd_plugins.models import load_causal_lm, load_tokenizer
from opd_plugins.precompute import precompute_teacher
from opd_plugins.recipe.loader import validate_recipe
from opd_plugins.registry import PluginInfo
from opd_plugins.rollout.replay import ReplayRollout
from opd_plugins.teachers.offline_cache import OfflineCacheTeacher
from opd_plugins.testing import save_tiny_model
from opd_plugins.trainers import Components, OPDTrainer

ROLLOUTS = {
    "What is 3 + 4?": ["The answer is 7.", "7", "one two three", "3 + 4 = 7"],
    "What is 6 times 8?": ["48", "The answer is 48.", "six", "6 times 8 is 48"],
    "Which number is larger: 31 or 57?": ["57", "31", "57 is larger.", "five seven"],
    "What is 12 + 30?": ["42", "The answer is 42.", "12 + 30 = 42", "four two"],
}
ARGS = {"max_steps": 2, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 12,
        "logging_steps": 1, "report_to": "none", "save_strategy": "no", "temperature": 1.0}


def make_pm():
    pm = get_plugin_manager()
    for cls in (OfflineCacheTeacher, ReplayRollout):
        pm.registry.register(cls, PluginInfo("offline_cache_tests", __name__))  # no-op once built in
    return pm


def recipe(tmp_path, model_dir, rollouts, teacher, *, learning_rate=1e-3, rollout=None):
    raw = {"model": {"name_or_path": str(model_dir)}, "data": {"dataset": {"path": str(rollouts)}},
           "trainer": {"args": {**ARGS, "learning_rate": learning_rate}}, "teacher": teacher,
           "divergence": {"name": "reverse_kl", "params": {"estimator": "sampled"}},
           "objective": {"policy_gradient": 0.0, "divergence": 1.0}, "output_dir": str(tmp_path / "run")}
    if rollout is not None:
        raw["rollout"] = rollout
    return validate_recipe(raw, pm=make_pm())


@pytest.fixture(scope="module")
def files(tmp_path_factory, opd_tokenizer):
    root = tmp_path_factory.mktemp("offline_e2e")
    student = save_tiny_model(root / "student", seed=0, tokenizer=opd_tokenizer)
    teacher = save_tiny_model(root / "teacher", seed=5, hidden=96, tokenizer=opd_tokenizer)
    rollouts = root / "rollouts.jsonl"
    with open(rollouts, "w") as f:
        for q, completions in ROLLOUTS.items():
            for c in completions:
                f.write(json.dumps({"prompt": [{"role": "user", "content": q}], "completion": c}) + "\n")
    return root, student, teacher, rollouts


def test_teacher_equal_to_student_through_the_cache_gives_zero_divergence(files, tmp_path, monkeypatch):
    """The whole workflow: precompute-teacher with the student as teacher, then `train` a recipe with
    offline_cache + replay: every replayed row is found and aligned, so KL(student ‖ itself) ≈ 0, and the only
    model loaded while training is the student."""
    from opd_plugins import models
    from opd_plugins.run import train

    root, student, _, rollouts = files
    cache = tmp_path / "cache"
    r, pm = recipe(tmp_path, student, rollouts, {"name": "hf_model", "params": {"model": str(student)}})
    manifest = precompute_teacher(r, pm, rollouts=str(rollouts), out_dir=cache, shard_size=5, top_k=8, progress=False)
    assert manifest["complete"] and manifest["data"]["num_rows"] == 16 and manifest["num_shards"] == 4

    r, pm = recipe(tmp_path, student, rollouts,
                   {"name": "offline_cache", "params": {"path": str(cache), "teacher": str(student)}},
                   rollout={"name": "replay", "params": {"path": str(cache)}}, learning_rate=1e-9)  # ~frozen (0 is refused)
    loads = []
    real = models.load_causal_lm
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: loads.append(a) or real(*a, **k))
    train(r, pm)
    assert len(loads) == 1  # the student; no teacher model
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    div = [row["opd/divergence"] for row in rows if "opd/divergence" in row]
    assert len(div) == 2 and all(abs(d) < 1e-5 for d in div), div
    assert all(row["completions/mean_length"] > 1 for row in rows if "completions/mean_length" in row)


def test_offline_training_matches_live_teacher_training(files, tmp_path):
    """Same replayed rollouts, same seed: training from the cache follows training with the live teacher."""
    root, student, teacher, rollouts = files
    cache = tmp_path / "cache"
    r, pm = recipe(tmp_path, student, rollouts, {"name": "hf_model", "params": {"model": str(teacher)}})
    precompute_teacher(r, pm, rollouts=str(rollouts), out_dir=cache, shard_size=8, top_k=8, progress=False)
    tokenizer = load_tokenizer(str(student))
    dataset = load_source(DatasetSource(path=str(rollouts)))

    def run(teacher_spec, out):
        comps = Components.build(pm, teacher=teacher_spec, rollout=("replay", {"path": str(cache)}),
                                 divergence=("reverse_kl", {"estimator": "sampled"}), pg_weight=0.0, div_weight=1.0)
        tr = OPDTrainer(model=load_causal_lm(str(student)), args=config(out, **{**ARGS, "learning_rate": 1e-2}),
                        components=comps, train_dataset=dataset, processing_class=tokenizer, plugin_manager=pm)
        tr.train()
        return history(tr, "opd/divergence"), history(tr, "completions/mean_length")

    offline = run(("offline_cache", {"path": str(cache), "teacher": str(teacher)}), tmp_path / "offline")
    live = run(("hf_model", {"model": str(teacher)}), tmp_path / "live")
    assert offline[1] == live[1]  # the same replayed completions
    assert len(offline[0]) == 2 and min(abs(d) for d in offline[0]) > 1e-3  # a different teacher: not ≈ 0
    assert torch.allclose(torch.tensor(offline[0]), torch.tensor(live[0]), rtol=1e-4, atol=1e-6), (offline, live)
