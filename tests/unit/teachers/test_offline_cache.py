"""Offline teacher cache: precompute, the offline_cache teacher and the replay rollout backend."""

import hashlib
import json

import pytest
import torch

from opd_plugins.errors import DataError, OPDError, TeacherError
from opd_plugins.manager import get_plugin_manager
from opd_plugins.models import load_tokenizer
from opd_plugins.precompute import precompute_teacher, tokenize_rollouts
from opd_plugins.recipe.loader import validate_recipe
from opd_plugins.registry import PluginInfo
from opd_plugins.rollout.replay import ReplayRollout
from opd_plugins.teachers.base import TeacherBatch
from opd_plugins.teachers.hf_model import HFModelTeacher
from opd_plugins.teachers.offline_cache import OfflineCacheTeacher, TeacherCache, row_key, tokenizer_sha256
from opd_plugins.testing import RolloutContract, TeacherContract, build_tiny_model, build_tokenizer, save_tiny_model
from opd_plugins.testing.contracts import fake_trainer

QUESTIONS = ["What is 3 + 4?", "What is 6 times 8?", "Which number is larger: 31 or 57?"]
COMPLETIONS = [["The answer is 7.", "7", "one two three"], ["48", "The answer is 48."], ["57", "31", "five six"]]


class TestOfflineCacheContract(TeacherContract):
    component = OfflineCacheTeacher
    require_registered = False  # registered by opd_plugins.teachers once wired in; the contract runs either way


class TestReplayContract(RolloutContract):
    component = ReplayRollout
    require_registered = False


def make_pm():
    pm = get_plugin_manager()
    info = PluginInfo("offline_cache_tests", __name__)
    for cls in (OfflineCacheTeacher, ReplayRollout):
        pm.registry.register(cls, info)  # a no-op once the built-ins register them
    return pm


def write_rollouts(path, questions=QUESTIONS, completions=COMPLETIONS):
    with open(path, "w") as f:
        for q, cs in zip(questions, completions):
            for c in cs:
                f.write(json.dumps({"prompt": [{"role": "user", "content": q}], "completion": c}) + "\n")
    return path


def recipe_for(tmp_path, student_dir, teacher_dir, rollouts, **args):
    raw = {
        "model": {"name_or_path": str(student_dir)},
        "data": {"dataset": {"path": str(rollouts)}},
        "trainer": {"args": {"max_completion_length": 16, "per_device_train_batch_size": 4, "num_generations": 4,
                             **args}},
        "teacher": {"name": "hf_model", "params": {"model": str(teacher_dir), "chunk_size": 3}},
        "divergence": {"name": "reverse_kl"},
        "objective": {"policy_gradient": 0.0, "divergence": 1.0},
        "output_dir": str(tmp_path / "run"),
    }
    return validate_recipe(raw, pm=make_pm())


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    tok = build_tokenizer()
    student = save_tiny_model(root / "student", seed=0, tokenizer=tok)
    teacher = save_tiny_model(root / "teacher", seed=3, hidden=96, tokenizer=tok)
    rollouts = write_rollouts(root / "rollouts.jsonl")
    return root, student, teacher, rollouts


@pytest.fixture(scope="module")
def cache16(setup_dirs):
    root, student, teacher, rollouts = setup_dirs
    recipe, pm = recipe_for(root, student, teacher, rollouts)
    out = root / "cache16"
    precompute_teacher(recipe, pm, rollouts=str(rollouts), out_dir=out, shard_size=3, top_k=8, progress=False)
    return out


def trainer_for(model_dir, tokenizer=None):
    tokenizer = tokenizer or load_tokenizer(str(model_dir))
    return fake_trainer(build_tiny_model(tokenizer), tokenizer)


def cached_batch(cache: TeacherCache, pad: int) -> TeacherBatch:
    """Every cached row, padded as the trainer pads (prompts left, completions right)."""
    rows = [(cache.prompt_ids(s, r), cache.completion_ids(s, r)) for s in range(len(cache.shards))
            for r in range(len(cache.shards[s]["keys"]))]
    P, T = max(len(p) for p, _ in rows), max(len(c) for _, c in rows)
    return TeacherBatch(
        torch.tensor([[pad] * (P - len(p)) + p for p, _ in rows]),
        torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p, _ in rows]),
        torch.tensor([c + [pad] * (T - len(c)) for _, c in rows]),
        torch.tensor([[1] * len(c) + [0] * (T - len(c)) for _, c in rows]),
    )


# ---------------------------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("topk_dtype", ["float16", "float32"])
def test_cached_scores_equal_the_live_teacher(setup_dirs, cache16, topk_dtype):
    root, student, teacher, rollouts = setup_dirs
    if topk_dtype == "float16":
        out = cache16
    else:
        recipe, pm = recipe_for(root, student, teacher, rollouts)
        out = root / "cache32"
        precompute_teacher(recipe, pm, rollouts=str(rollouts), out_dir=out, shard_size=3, top_k=8,
                           topk_dtype="float32", progress=False)
    tr = trainer_for(student)
    offline = OfflineCacheTeacher(OfflineCacheTeacher.Params(path=str(out), teacher=str(teacher)))
    offline.setup(tr)
    batch = cached_batch(offline.cache, tr.tokenizer.pad_token_id)
    live = HFModelTeacher(HFModelTeacher.Params(model=str(teacher), top_k=8))
    live.setup(tr)
    got, ref = offline.score(batch, "topk"), live.score(batch, "topk")
    m = batch.completion_mask.bool()
    assert m.shape[0] == sum(map(len, COMPLETIONS))
    # Token log-probs are stored in float32: equal up to the float noise of a different batch padding.
    assert torch.allclose(got.token_logps[m], ref.token_logps[m], atol=1e-5, rtol=0)
    assert torch.allclose(got.entropy[m], ref.entropy[m], atol=1e-5, rtol=0)
    assert torch.equal(got.topk_ids[m], ref.topk_ids[m])
    if topk_dtype == "float32":
        assert torch.allclose(got.topk_logps[m], ref.topk_logps[m], atol=1e-5, rtol=0)
    else:  # float16: relative error at most 2^-11, plus the same float noise
        err = (got.topk_logps[m] - ref.topk_logps[m]).abs()
        assert (err <= ref.topk_logps[m].abs() * 2 ** -11 + 1e-5).all(), err.max()
    assert torch.allclose(got.topk_mass[m], ref.topk_mass[m], atol=1e-3)
    assert (got.token_logps[~m] == 0).all()
    sampled = offline.score(batch, "sampled")
    assert sampled.topk_logps is None and torch.equal(sampled.token_logps, got.token_logps)


def test_manifest_records_identity_hashes_and_keys(setup_dirs, cache16):
    root, student, teacher, rollouts = setup_dirs
    manifest = json.loads((cache16 / "manifest.json").read_text())
    weights = hashlib.sha256(b"model.safetensors\0" + (teacher / "model.safetensors").read_bytes()).hexdigest()
    tok = load_tokenizer(str(student))
    assert manifest["complete"] and manifest["teacher"]["id"] == str(teacher)
    assert manifest["teacher"]["weights_sha256"] == weights
    assert manifest["teacher"]["weights_hashed"] == "safetensors files"
    assert manifest["tokenizer"]["vocab_sha256"] == tokenizer_sha256(tok)
    assert manifest["top_k"] == 8 and manifest["topk_dtype"] == "float16"
    n = sum(map(len, COMPLETIONS))
    assert manifest["data"]["num_rows"] == n and manifest["num_shards"] == 3
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:05d}.safetensors" for i in range(3)]
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(rollouts), split="train")
    examples = tokenize_rollouts(ds, tok, max_completion_length=16)
    keys = [k for s in manifest["shards"] for k in s["keys"]]
    assert keys == [row_key(p, c) for p, c in examples]
    assert all(c[-1] == tok.eos_token_id for _, c in examples)
    data = hashlib.sha256()
    for p, c in examples:
        data.update(torch.tensor([len(p), len(c), *p, *c], dtype=torch.int64).numpy().tobytes())
    assert manifest["data"]["sha256"] == data.hexdigest()
    assert sorted(p.name for p in cache16.iterdir()) == ["manifest.json"] + [s["file"] for s in manifest["shards"]]
    from safetensors import safe_open

    with safe_open(str(cache16 / "shard-00000.safetensors"), "pt") as f:
        assert f.get_tensor("topk_ids").dtype == torch.int32 and f.get_tensor("topk_logps").dtype == torch.float16
        assert f.get_tensor("token_logps").dtype == torch.float32 and f.get_tensor("topk_ids").shape[1] == 8


# ---------------------------------------------------------------------------------------------------------------
# Consistency checks
# ---------------------------------------------------------------------------------------------------------------


def test_refuses_a_different_teacher(setup_dirs, cache16):
    root, student, teacher, _ = setup_dirs
    t = OfflineCacheTeacher(OfflineCacheTeacher.Params(path=str(cache16), teacher="Qwen/Qwen3-8B"))
    with pytest.raises(TeacherError, match=rf"made by teacher '{teacher}', the recipe names 'Qwen/Qwen3-8B'"):
        t.setup(trainer_for(student))
    t = OfflineCacheTeacher(OfflineCacheTeacher.Params(path=str(cache16), teacher=str(teacher), weights_sha256="0" * 64))
    with pytest.raises(TeacherError, match="made from weights with sha256"):
        t.setup(trainer_for(student))


def test_refuses_a_different_tokenizer(setup_dirs, cache16):
    root, student, teacher, _ = setup_dirs
    t = OfflineCacheTeacher(OfflineCacheTeacher.Params(path=str(cache16), teacher=str(teacher)))
    with pytest.raises(TeacherError, match="tokenized with a different tokenizer"):
        t.setup(trainer_for(student, build_tokenizer(vocab_size=300)))
    loose = OfflineCacheTeacher(OfflineCacheTeacher.Params(path=str(cache16), teacher=str(teacher), tokenizer_check=False))
    loose.setup(trainer_for(student, build_tokenizer(vocab_size=300)))


def test_refuses_tokens_not_in_the_cache(setup_dirs, cache16):
    root, student, teacher, _ = setup_dirs
    tr = trainer_for(student)
    t = OfflineCacheTeacher(OfflineCacheTeacher.Params(path=str(cache16), teacher=str(teacher)))
    t.setup(tr)
    batch = cached_batch(t.cache, tr.tokenizer.pad_token_id)
    batch.completion_ids[1, 0] = (batch.completion_ids[1, 0] + 1) % 300
    with pytest.raises(TeacherError, match=r"has no scores for these tokens: rows \[1\].*prompt is cached, this "
                                           r"completion is not.*rollout: \{name: replay"):
        t.score(batch)
    batch = cached_batch(t.cache, tr.tokenizer.pad_token_id)
    batch.completion_mask[2, 1:] = 0  # a prefix of a cached completion is another completion
    with pytest.raises(TeacherError, match=r"rows \[2\]"):
        t.score(batch)
    batch = cached_batch(t.cache, tr.tokenizer.pad_token_id)
    batch.prompt_ids[0, -2] = 5
    with pytest.raises(TeacherError, match="prompt is not in the cache either"):
        t.score(batch)
    batch = cached_batch(t.cache, tr.tokenizer.pad_token_id)
    batch.completion_mask[0] = 0  # an all-masked row (a masked truncated completion) needs no scores
    assert t.score(batch).mask[0].sum() == 0


def test_refuses_a_rollout_backend_that_does_not_replay_this_cache(tmp_path, setup_dirs, cache16):
    import dataclasses

    from opd_plugins.precompute import cache_teacher_batch
    from opd_plugins.rollout import HFGenerate
    from opd_plugins.testing.contracts import teacher_batch

    root, student, teacher, _ = setup_dirs
    tr = trainer_for(student)
    params = OfflineCacheTeacher.Params(path=str(cache16), teacher=str(teacher))
    tr = dataclasses.replace(tr, peers={"rollout": HFGenerate()})
    with pytest.raises(TeacherError, match="rollout backend is 'hf_generate', which samples new ones: set rollout: "
                                           r"\{name: replay"):
        OfflineCacheTeacher(params).setup(tr)
    other = cache_teacher_batch(teacher_batch(build_tokenizer()), teacher, tmp_path / "other")
    assert other["complete"]
    tr = dataclasses.replace(tr, peers={"rollout": ReplayRollout(ReplayRollout.Params(path=str(tmp_path / "other")))})
    with pytest.raises(TeacherError, match="a cache of other rollouts"):
        OfflineCacheTeacher(params).setup(tr)
    tr = dataclasses.replace(tr, peers={"rollout": ReplayRollout(ReplayRollout.Params(path=str(cache16)))})
    OfflineCacheTeacher(params).setup(tr)


def test_missing_or_incomplete_cache(tmp_path, setup_dirs):
    root, student, teacher, rollouts = setup_dirs
    t = OfflineCacheTeacher(OfflineCacheTeacher.Params(path=str(tmp_path / "nope"), teacher=str(teacher)))
    with pytest.raises(TeacherError, match="no teacher cache at .*precompute-teacher"):
        t.setup(trainer_for(student))
    recipe, pm = recipe_for(root, student, teacher, rollouts)

    def stop(idx):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        precompute_teacher(recipe, pm, rollouts=str(rollouts), out_dir=tmp_path / "c", shard_size=3, top_k=4,
                           progress=False, on_shard=stop)
    t = OfflineCacheTeacher(OfflineCacheTeacher.Params(path=str(tmp_path / "c"), teacher=str(teacher)))
    with pytest.raises(TeacherError, match=r"incomplete \(1 of 3 shards\): re-run"):
        t.setup(trainer_for(student))


def test_precompute_needs_a_local_teacher(tmp_path, setup_dirs):
    root, student, teacher, rollouts = setup_dirs
    raw = {"model": {"name_or_path": str(student)}, "data": {"dataset": {"path": str(rollouts)}},
           "teacher": {"name": "self_context"}, "divergence": {"name": "reverse_kl"},
           "objective": {"policy_gradient": 0.0, "divergence": 1.0}, "output_dir": str(tmp_path / "r")}
    recipe, pm = validate_recipe(raw, pm=make_pm())
    with pytest.raises(OPDError, match="teacher must be hf_model .*not 'self_context'"):
        precompute_teacher(recipe, pm, rollouts=str(rollouts), out_dir=tmp_path / "c", progress=False)
    # The training recipe itself (teacher offline_cache) also works: its `teacher` is loaded and scores.
    raw["teacher"] = {"name": "offline_cache", "params": {"path": str(tmp_path / "c"), "teacher": str(teacher)}}
    recipe, pm = validate_recipe(raw, pm=make_pm())
    manifest = precompute_teacher(recipe, pm, rollouts=str(rollouts), out_dir=tmp_path / "c", top_k=2, progress=False)
    assert manifest["complete"] and manifest["teacher"]["id"] == str(teacher)


# ---------------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------------


def test_resume_after_a_kill_keeps_finished_shards_byte_identical(tmp_path, setup_dirs, cache16):
    root, student, teacher, rollouts = setup_dirs
    recipe, pm = recipe_for(root, student, teacher, rollouts)
    out = tmp_path / "cache"
    written = []

    def kill_after_two(idx):
        written.append(idx)
        if len(written) == 2:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        precompute_teacher(recipe, pm, rollouts=str(rollouts), out_dir=out, shard_size=3, top_k=8,
                           progress=False, on_shard=kill_after_two)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and [s["index"] for s in manifest["shards"]] == [0, 1]
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("shard-*.safetensors")}
    assert sorted(before) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    (out / "shard-00002.safetensors.tmp-999").write_bytes(b"half a shard")  # killed mid-write

    resumed = []
    precompute_teacher(recipe, pm, rollouts=str(rollouts), out_dir=out, shard_size=3, top_k=8, progress=False,
                       on_shard=resumed.append)
    assert resumed == [2]  # only the unfinished shard is computed
    for name, (data, mtime) in before.items():
        assert (out / name).read_bytes() == data and (out / name).stat().st_mtime_ns == mtime
    assert not list(out.glob("*.tmp-*"))
    # The resumed cache is byte for byte the cache of an uninterrupted run.
    for name in ("manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"):
        assert (out / name).read_bytes() == (cache16 / name).read_bytes(), name

    with pytest.raises(OPDError, match=r"different inputs \(differs in: top_k\)"):
        precompute_teacher(recipe, pm, rollouts=str(rollouts), out_dir=out, shard_size=3, top_k=4, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Replay
# ---------------------------------------------------------------------------------------------------------------


def replay_generate(backend, prompt_ids, num_generations):
    from opd_plugins.context import Sampling

    out = backend.generate(prompt_ids, Sampling(num_generations=num_generations))
    return out.completion_ids, out.behaviour_logps


def test_replay_hands_out_cached_completions_round_robin(setup_dirs, cache16):
    root, student, teacher, rollouts = setup_dirs
    tr = trainer_for(student)
    replay = ReplayRollout(ReplayRollout.Params(path=str(cache16)))
    replay.setup(tr)
    cache = replay.cache
    by_prompt = {}
    for s in range(len(cache.shards)):
        for r in range(len(cache.shards[s]["keys"])):
            by_prompt.setdefault(tuple(cache.prompt_ids(s, r)), []).append(cache.completion_ids(s, r))
    prompts = list(by_prompt)
    assert [len(v) for v in by_prompt.values()] == [3, 2, 3]
    # Two completions cached for prompt 1, four generations asked: c0 c1 c0 c1.
    ids, logps = replay_generate(replay, [list(prompts[1])] * 4, 4)
    assert logps is None and ids == [by_prompt[prompts[1]][i] for i in (0, 1, 0, 1)]
    # Three cached, two asked per visit: the next visit continues where the last stopped.
    first, _ = replay_generate(replay, [list(prompts[0])] * 2, 2)
    state = replay.state_dict()
    second, _ = replay_generate(replay, [list(prompts[0])] * 2, 2)
    assert first + second == [by_prompt[prompts[0]][i] for i in (0, 1, 2, 0)]
    restored = ReplayRollout(ReplayRollout.Params(path=str(cache16)))
    restored.setup(tr)
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert replay_generate(restored, [list(prompts[0])] * 2, 2)[0] == second
    with pytest.raises(DataError, match="prompt 0 of this batch .* has no cached completions"):
        replay_generate(replay, [[2, 5, 6]], 1)


def test_cli_entry_point_writes_a_cache(tmp_path, setup_dirs, capsys):
    import yaml

    import argparse

    from opd_plugins import precompute
    from opd_plugins.teachers import offline_cache

    root, student, teacher, rollouts = setup_dirs
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(student)}, "data": {"dataset": {"path": str(rollouts)}},
        "teacher": {"name": "hf_model", "params": {"model": str(teacher)}}, "divergence": {"name": "reverse_kl"},
        "objective": {"policy_gradient": 0.0, "divergence": 1.0}, "output_dir": str(tmp_path / "run")}))
    assert (precompute.FORMAT, precompute.MANIFEST) == (offline_cache.FORMAT, offline_cache.MANIFEST)
    parser = argparse.ArgumentParser()
    precompute.add_arguments(parser)
    args = parser.parse_args([str(path), "trainer.args.max_completion_length=4", "--rollouts", str(rollouts),
                              "--out", str(tmp_path / "c"), "--top-k", "2", "--shard-size", "4"])
    assert precompute.run(args) == 0
    out = capsys.readouterr().out
    assert "teacher cache of 8 rollouts" in out and "offline_cache" in out and "replay" in out
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["num_shards"] == 2 and manifest["data"]["max_completion_tokens"] == 4
