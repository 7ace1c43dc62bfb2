"""Offline cache integrity (issue 13, items 13-15, and issue 12's provenance): a changed, swapped or truncated
shard, a corrupt header, implausible or NaN cached values are refused naming the shard or the teacher, before a
step trains on them; Lightning OPD's teacher-consistency condition is checked when the cache records it."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_offline_cache import cache16, cached_batch, make_pm, setup_dirs, trainer_for  # noqa: F401 - fixtures

from opd_plugins.errors import OPDError, TeacherError
from opd_plugins.recipe.loader import validate_recipe
from opd_plugins.rollout.replay import ReplayRollout
from opd_plugins.teachers.cache.format import FORMAT, MANIFEST, TeacherCache, file_sha256
from opd_plugins.teachers.offline_cache import OfflineCacheTeacher


@pytest.fixture
def cache(tmp_path, cache16):
    """A private copy of the module's cache, free to corrupt."""
    return shutil.copytree(cache16, tmp_path / "cache")


def manifest(cache):
    return json.loads((cache / MANIFEST).read_text())


def rehash(cache):
    """Record the shards' current sha256 in the manifest, as a precompute that wrote these bytes would have."""
    m = manifest(cache)
    for s in m["shards"]:
        s["sha256"] = file_sha256(cache / s["file"])
    (cache / MANIFEST).write_text(json.dumps(m))


def rewrite(cache, edit, shard=0):
    """Edit one shard's tensors in place (keeping its metadata)."""
    file = cache / manifest(cache)["shards"][shard]["file"]
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={FORMAT: json.dumps({"shard": shard, "top_k": 8}, sort_keys=True)})


def scores_of(cache, setup_dirs):
    """Open the cache with the offline_cache teacher and score every cached row (topk), validated as the trainer
    validates."""
    root, student, teacher, _ = setup_dirs
    tr = trainer_for(student)
    t = OfflineCacheTeacher(OfflineCacheTeacher.Params(path=str(cache), teacher=str(teacher)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.setup(tr)
    batch = cached_batch(t.cache, tr.tokenizer.pad_token_id)
    t.score(batch, "topk").validate(batch, t.name)


def test_untouched_cache_is_accepted(cache, setup_dirs):
    scores_of(cache, setup_dirs)


def test_a_bit_flip_is_refused_naming_the_shard(cache, setup_dirs):
    file = cache / "shard-00001.safetensors"
    data = bytearray(file.read_bytes())
    data[-7] ^= 0x10  # one bit of one cached value
    file.write_bytes(bytes(data))
    with pytest.raises(TeacherError, match=r"shard shard-00001.safetensors does not match the sha256 the manifest "
                                           r"records .* changed, truncated or swapped"):
        scores_of(cache, setup_dirs)


def test_swapped_shards_are_refused(cache, setup_dirs):
    a, b = cache / "shard-00000.safetensors", cache / "shard-00002.safetensors"
    tmp = cache / "swap"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    with pytest.raises(TeacherError, match="shard-0000[02].safetensors does not match the sha256"):
        TeacherCache(cache).prompt_index()


def test_truncated_shard_and_corrupt_header(cache, setup_dirs):
    file = cache / "shard-00000.safetensors"
    full = file.read_bytes()
    file.write_bytes(full[: len(full) // 2])
    with pytest.raises(TeacherError, match="shard-00000.safetensors does not match the sha256"):
        TeacherCache(cache).read_row(0, 0)
    rehash(cache)  # even when the manifest agrees with the truncated bytes, the error is clear
    with pytest.raises(TeacherError, match=r"shard shard-00000.safetensors is not a readable safetensors file "
                                           r"\(SafetensorError"):
        TeacherCache(cache).read_row(0, 0)
    file.write_bytes(b"\xff" * 8 + full[8:])  # the header length is garbage
    rehash(cache)
    with pytest.raises(TeacherError, match="is not a readable safetensors file"):
        TeacherCache(cache).read_row(0, 0)


def test_inconsistent_shard_contents(cache, setup_dirs):
    rewrite(cache, lambda t: t.pop("entropy"))
    rehash(cache)
    with pytest.raises(TeacherError, match="lacks the tensors entropy"):
        TeacherCache(cache).read_row(0, 0)
    rewrite(cache, lambda t: t.update(entropy=t["token_logps"][:-1].clone()))
    rehash(cache)
    with pytest.raises(TeacherError, match=r"is inconsistent \(entropy"):
        TeacherCache(cache).read_row(0, 0)
    rewrite(cache, lambda t: t.update(entropy=t["token_logps"].clone(), token_logps=t["token_logps"].double()))
    rehash(cache)
    with pytest.raises(TeacherError, match="tensor token_logps has dtype torch.float64"):
        TeacherCache(cache).read_row(0, 0)


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t["token_logps"].add_(5.0).clamp_(min=0.5), "token log-prob above 0"),
    (lambda t: t["topk_logps"][:, 0].fill_(5.0), "top-k log-prob above 0"),
    (lambda t: t["topk_logps"][:, -1].fill_(float("nan")), "non-finite"),
    (lambda t: t["token_logps"].fill_(-1e30), "below -10000"),
])
def test_implausible_cached_values_are_refused(cache, setup_dirs, edit, needle):
    """A cache whose precompute wrote bad values (its manifest agrees with the bytes) is still not trained on."""
    for shard in range(len(manifest(cache)["shards"])):
        rewrite(cache, edit, shard)
    rehash(cache)
    with pytest.raises(TeacherError, match=needle) as exc:
        scores_of(cache, setup_dirs)
    assert "'offline_cache'" in str(exc.value)


def test_replay_checks_the_shards_at_setup(cache, setup_dirs):
    root, student, _, _ = setup_dirs
    (cache / "shard-00002.safetensors").write_bytes(b"not a shard")
    backend = ReplayRollout(ReplayRollout.Params(path=str(cache)))
    with pytest.raises(TeacherError, match="shard-00002.safetensors does not match"):
        backend.setup(trainer_for(student))


def train_on(cache, setup_dirs, tmp_path, **teacher_params):
    from opd_plugins.runs import train

    root, student, teacher, rollouts = setup_dirs
    raw = {"model": {"name_or_path": str(student)}, "data": {"dataset": {"path": str(rollouts)}},
           "trainer": {"args": {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 2,
                                "max_completion_length": 16, "save_steps": 1, "learning_rate": 1e-3}},
           "teacher": {"name": "offline_cache", "params": {"path": str(cache), "teacher": str(teacher),
                                                          **teacher_params}},
           "rollout": {"name": "replay", "params": {"path": str(cache)}},
           "divergence": {"name": "topk_kl"}, "objective": {"policy_gradient": 0.0, "divergence": 1.0},
           "evaluation": {"enabled": False}, "output_dir": str(tmp_path / "run")}
    recipe, pm = validate_recipe(raw, pm=make_pm())
    return train(recipe, pm)


def test_nan_in_cached_topk_never_reaches_a_checkpoint(cache, setup_dirs, tmp_path):
    """The issue's case: NaN in a cached top-k ended in exit code 0 with NaN checkpoints and final/."""
    for shard in range(len(manifest(cache)["shards"])):
        rewrite(cache, lambda t: t["topk_logps"][:, -1].fill_(float("nan")), shard)
    rehash(cache)
    with pytest.raises(TeacherError, match="'offline_cache' returned .* non-finite"):
        train_on(cache, setup_dirs, tmp_path)
    run = tmp_path / "run"
    assert not list(run.glob("checkpoint-*")) and not (run / "final").exists()


def test_provenance_is_recorded_and_checked(tmp_path, setup_dirs):
    from opd_plugins.commands.precompute_teacher import precompute_teacher
    from test_offline_cache import recipe_for

    root, student, teacher, rollouts = setup_dirs
    recipe, pm = recipe_for(root, student, teacher, rollouts)
    same, other = tmp_path / "same", tmp_path / "other"
    m = precompute_teacher(recipe, pm, rollouts=str(rollouts), out_dir=same, shard_size=4, top_k=4, progress=False,
                           provenance={"sft_teacher": str(teacher), "sft_data": "tulu-3 subset"})
    assert m["provenance"]["sft_teacher"]["id"] == str(teacher) and m["provenance"]["sft_data"] == "tulu-3 subset"
    shutil.copytree(same, other)
    mo = manifest(other)
    mo["provenance"]["sft_teacher"] = {"id": "Qwen/Qwen3-32B", "path": None}
    (other / MANIFEST).write_text(json.dumps(mo))
    tr = trainer_for(student)

    def setup(path, **params):
        OfflineCacheTeacher(OfflineCacheTeacher.Params(path=str(path), teacher=str(teacher), **params)).setup(tr)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setup(same)  # recorded and consistent: no warning
    with pytest.raises(TeacherError, match="fine-tuned on outputs of 'Qwen/Qwen3-32B'.*Lightning OPD"):
        setup(other)
    del mo["provenance"]
    (other / MANIFEST).write_text(json.dumps(mo))
    with pytest.warns(UserWarning, match="does not record which teacher produced the student's SFT data"):
        setup(other)
    with pytest.raises(TeacherError, match="require_provenance: true"):
        setup(other, require_provenance=True)
    with pytest.raises(OPDError, match="unknown provenance keys sft_techer"):
        precompute_teacher(recipe, pm, rollouts=str(rollouts), out_dir=tmp_path / "x", shard_size=4, top_k=4,
                           progress=False, provenance={"sft_techer": "x"})


def test_precompute_refuses_to_cache_nan_scores(tmp_path, setup_dirs, monkeypatch):
    from opd_plugins.commands.precompute_teacher import precompute_teacher
    from opd_plugins.teachers.hf_model import HFModelTeacher
    from test_offline_cache import recipe_for

    root, student, teacher, rollouts = setup_dirs
    real = HFModelTeacher.score

    def nan_score(self, batch, want="sampled"):
        out = real(self, batch, want)
        out.topk_logps[0, 0, -1] = float("nan")
        return out

    monkeypatch.setattr(HFModelTeacher, "score", nan_score)
    recipe, pm = recipe_for(root, student, teacher, rollouts)
    with pytest.raises(TeacherError, match=r"'hf_model \(precompute-teacher\)' returned .* non-finite"):
        precompute_teacher(recipe, pm, rollouts=str(rollouts), out_dir=tmp_path / "c", shard_size=4, top_k=4,
                           progress=False)
    assert not list((tmp_path / "c").glob("shard-*.safetensors"))
