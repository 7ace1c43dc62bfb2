"""self_context: the EMA teacher (update rule, swap-in scoring, state) and the reveal schedule (prefix, recipe
validation). Trainer-driven checks (per optimizer step, resume, logged ratios) are in tests/e2e/test_self_context_e2e.py."""

import copy
from types import SimpleNamespace

import pytest
import torch
import yaml

from opd_plugins.errors import RecipeError
from opd_plugins.recipe import load_recipe
from opd_plugins.teachers import SelfContextTeacher
from opd_plugins.teachers.self_context import reveal_prefix
from opd_plugins.testing.contracts import fake_trainer, teacher_batch
from opd_plugins.trainers.state import load_component_states, save_component_states

P = SelfContextTeacher.Params


def built(params):
    """A self_context teacher built by the registry (its reveal schedule is a nested component)."""
    from opd_plugins.manager import get_plugin_manager

    return get_plugin_manager().registry.build("teacher", ("self_context", params))


def _model(opd_tiny_model, kind):
    if kind == "full":
        return opd_tiny_model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(opd_tiny_model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _fake_step(model, seed, scale=0.05):
    """Stand-in for an optimizer step: move every trainable parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in _trainable(model).values():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _ema_teacher(model, tokenizer, decay):
    t = SelfContextTeacher(P(weights="ema", ema_decay=decay))
    t.setup(fake_trainer(model, tokenizer))
    return t


def _live_scores(model, tokenizer, batch, want="full"):
    live = SelfContextTeacher()
    live.setup(fake_trainer(model, tokenizer))
    return live.score(batch, want)


# -- EMA -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_ema_update_matches_hand_loop_and_scores_with_averaged_weights(kind, opd_tiny_model, opd_tokenizer):
    model = _model(opd_tiny_model, kind)
    d = 0.6
    teacher = _ema_teacher(model, opd_tokenizer, d)
    ref = {n: p.detach().double().clone() for n, p in _trainable(model).items()}
    for step in range(4):
        _fake_step(model, seed=step)
        teacher.update_ema()
        for n, p in _trainable(model).items():
            ref[n] = d * ref[n] + (1 - d) * p.detach().double()
    state = teacher.state_dict()
    assert state["ema_updates"] == 4
    assert {k for k in state if k.startswith("ema.")} == {f"ema.{n}" for n in ref}
    for n, r in ref.items():
        assert state[f"ema.{n}"].dtype == torch.float32
        torch.testing.assert_close(state[f"ema.{n}"].double(), r, atol=1e-6, rtol=0)

    batch = teacher_batch(opd_tokenizer)
    m = batch.completion_mask.bool()
    ema_scores = teacher.score(batch, "full")
    averaged = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in _trainable(averaged).items():
            p.copy_(ref[n].float())
    manual = _live_scores(averaged, opd_tokenizer, batch)
    live = _live_scores(model, opd_tokenizer, batch)
    torch.testing.assert_close(ema_scores.token_logps[m], manual.token_logps[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(ema_scores.logps[m], manual.logps[m], atol=1e-5, rtol=0)
    assert (ema_scores.token_logps[m] - live.token_logps[m]).abs().max() > 1e-3  # the average lags the policy


def test_decay_towards_zero_is_the_live_teacher(opd_tiny_model, opd_tokenizer):
    model = _model(opd_tiny_model, "lora")
    teacher = _ema_teacher(model, opd_tokenizer, 1e-9)
    batch = teacher_batch(opd_tokenizer)
    m = batch.completion_mask.bool()
    _fake_step(model, seed=0, scale=0.2)
    before = teacher.score(batch).token_logps  # the average still holds the starting adapter
    assert (before[m] - _live_scores(model, opd_tokenizer, batch, "sampled").token_logps[m]).abs().max() > 1e-3
    teacher.update_ema()
    torch.testing.assert_close(teacher.score(batch).token_logps[m],
                               _live_scores(model, opd_tokenizer, batch, "sampled").token_logps[m], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_student_weights_are_restored_bit_for_bit_even_when_scoring_raises(kind, opd_tiny_model, opd_tokenizer,
                                                                            monkeypatch):
    from opd_plugins.teachers import self_context

    model = _model(opd_tiny_model, kind)
    teacher = _ema_teacher(model, opd_tokenizer, 0.5)
    _fake_step(model, seed=1)
    teacher.update_ema()
    model.train()
    params = _trainable(model)
    saved = {n: p.detach().clone() for n, p in params.items()}
    storage = {n: p.data_ptr() for n, p in params.items()}
    batch = teacher_batch(opd_tokenizer)

    teacher.score(batch)
    assert all(torch.equal(p, saved[n]) and p.data_ptr() == storage[n] for n, p in params.items())
    assert model.training

    seen = {}

    def boom(target, *args, **kwargs):
        ema = teacher.state_dict()
        seen["swapped"] = all(torch.equal(p.detach(), ema[f"ema.{n}"]) for n, p in _trainable(target).items())
        raise RuntimeError("scoring failed")

    monkeypatch.setattr(self_context, "score_with_causal_lm", boom)
    with pytest.raises(RuntimeError, match="scoring failed"):
        teacher.score(batch)
    assert seen["swapped"]  # the EMA tensors really were in place while scoring
    assert all(torch.equal(p, saved[n]) and p.data_ptr() == storage[n] for n, p in params.items())
    assert all(p.requires_grad for p in params.values()) and model.training


def test_state_round_trip_through_checkpoint_files_and_mismatches(tmp_path, opd_tiny_model, opd_tokenizer):
    model = _model(opd_tiny_model, "lora")
    a = _ema_teacher(model, opd_tokenizer, 0.5)
    for step in range(2):
        _fake_step(model, seed=step)
        a.update_ema()
    save_component_states(str(tmp_path), {"teacher": a})
    batch = teacher_batch(opd_tokenizer)

    b = _ema_teacher(model, opd_tokenizer, 0.5)  # starts from the current weights: a different average
    assert not torch.equal(b.score(batch).token_logps, a.score(batch).token_logps)
    assert load_component_states(str(tmp_path), {"teacher": b}) == ["teacher"]
    sa, sb = a.state_dict(), b.state_dict()
    assert sb["ema_updates"] == 2 and sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith("ema."))
    assert torch.equal(b.score(batch).token_logps, a.score(batch).token_logps)

    c = SelfContextTeacher(P(weights="ema", ema_decay=0.5))  # state given before setup() is applied by setup()
    c.load_state_dict(sa)
    c.setup(fake_trainer(model, opd_tokenizer))
    assert all(torch.equal(sa[k], c.state_dict()[k]) for k in sa if k.startswith("ema."))

    name = next(k for k in sa if k.startswith("ema."))
    with pytest.raises(ValueError, match=r"does not match .*missing \['" + name[4:]):
        b.load_state_dict({k: v for k, v in sa.items() if k != name})
    with pytest.raises(ValueError, match="shape mismatch"):
        b.load_state_dict({**sa, name: torch.zeros(3)})
    with pytest.raises(ValueError, match="unexpected"):
        b.load_state_dict({**sa, "ema.not.a.param": torch.zeros(3)})
    with pytest.raises(ValueError, match="weights: live"):
        SelfContextTeacher().load_state_dict(sa)


# -- reveal ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "ratio", "expected"), [
    ("one two three four", 0.0, ""),
    ("one two three four", 0.5, "one two"),
    ("one two three four", 1.0, "one two three four"),
    ("one two three four five", 0.5, "one two"),           # floor(2.5) words
    ("one two three four five", 0.6, "one two three"),     # 3 words exactly (no float shortfall)
    ("one two three four five", 0.99, "one two three four"),
    ("a  b\n c d e ", 0.4, "a  b"),                        # original spacing kept inside the prefix
    ("a  b\n c d e ", 1.0, "a  b\n c d e "),
    ("", 0.0, ""), ("", 0.5, ""), ("", 1.0, ""),
    ("   ", 0.0, ""),
    ("one two", -0.5, ""), ("one two", 1.5, "one two"),     # clamped
])
def test_reveal_prefix_hand_cases(text, ratio, expected):
    assert reveal_prefix(text, ratio) == expected


def test_reveal_renders_a_prefix_of_the_column_following_the_schedule():
    t = built(P(template="{prompt}\nReference: {solution}\nAnswer: {answer}", reveal_column="solution",
                reveal={"name": "linear", "params": {"start": 0.0, "end": 1.0}}))
    assert t.required_columns() == ("solution", "answer")
    row = {"solution": "a b c d e f g h", "answer": "8"}
    assert t.teacher_prompt("Q", row, reveal_ratio=0.25) == "Q\nReference: a b\nAnswer: 8"
    progress = {"step": 5}
    trainer = SimpleNamespace(progress=lambda: (progress["step"], 10))
    t.ctx = trainer
    assert t.reveal_ratio() == 0.5
    assert t.teacher_prompt([{"role": "user", "content": "Q"}], row)[0]["content"] == "Q\nReference: a b c d\nAnswer: 8"
    progress["step"] = 10
    assert t.teacher_prompt("Q", row) == "Q\nReference: a b c d e f g h\nAnswer: 8"
    constant = built(P(template="{prompt} {hint}", reveal_column="hint", reveal=7.0))
    constant.ctx = trainer
    assert constant.reveal_ratio() == 1.0  # clamped to [0, 1]


def test_reveal_ratio_is_logged_and_changes_teacher_scores(opd_tiny_model, opd_tokenizer):
    batch = teacher_batch(opd_tokenizer)
    logged = []
    trainer = fake_trainer(opd_tiny_model, opd_tokenizer, log=lambda name, value: logged.append((name, value)))
    scores = {}
    for ratio in (0.0, 1.0):
        t = built(P(reveal_column="hint", reveal=ratio))
        t.setup(trainer)
        scores[ratio] = t.score(batch).token_logps
    assert logged == [("teacher/reveal_ratio", 0.0), ("teacher/reveal_ratio", 1.0)]
    plain, full = SelfContextTeacher(P(template="{prompt}\n\n")), SelfContextTeacher()
    for t in (plain, full):
        t.setup(trainer)
    assert torch.equal(scores[0.0], plain.score(batch).token_logps)  # nothing revealed: an empty field
    assert torch.equal(scores[1.0], full.score(batch).token_logps)
    assert not torch.equal(scores[0.0], scores[1.0])


# -- recipe validation -----------------------------------------------------------------------------------------


def _recipe_errors(tmp_path, model_dir, teacher_params):
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"task": {"name": "arithmetic"}},
        "teacher": {"name": "self_context", "params": teacher_params},
        "divergence": {"name": "reverse_kl"},
        "objective": {"divergence": 1.0},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    return str(exc.value)


def test_recipe_validation_errors(tmp_path, opd_tiny_model_dir):
    msg = _recipe_errors(tmp_path, opd_tiny_model_dir, {"template": "{prompt}\n{hint}", "reveal_column": "solution",
                                                         "reveal": 0.5, "weights": "ema", "ema_decay": 1.5})
    assert "teacher.params.reveal_column: reveal_column 'solution' is not a field of template" in msg
    assert "teacher.params.ema_decay: Input should be less than 1" in msg

    msg = _recipe_errors(tmp_path, opd_tiny_model_dir, {"reveal_column": "hint",
                                                         "reveal": {"name": "linera", "params": {"end": 1.0}}})
    assert "teacher.params.reveal.name: unknown schedule 'linera'. Did you mean 'linear'?" in msg

    msg = _recipe_errors(tmp_path, opd_tiny_model_dir, {"reveal_column": "hint",
                                                         "reveal": {"name": "linear", "params": {"strat": 0.0}}})
    assert "teacher.params.reveal.params.strat: unknown key 'strat'. Did you mean 'start'?" in msg

    msg = _recipe_errors(tmp_path, opd_tiny_model_dir, {"ema_decay": 0.9, "reveal": 0.5})
    assert "teacher.params.ema_decay: ema_decay applies only to weights: ema, but weights is 'live'" in msg
    assert "teacher.params.reveal: reveal is set but reveal_column is not" in msg


def test_valid_recipe_with_ema_and_reveal(tmp_path, opd_tiny_model_dir):
    recipe = {
        "model": {"name_or_path": str(opd_tiny_model_dir)},
        "data": {"task": {"name": "arithmetic"}},
        "teacher": {"name": "self_context", "params": {
            "weights": "ema", "ema_decay": 0.95, "reveal_column": "hint",
            "reveal": {"name": "linear", "params": {"start": 0.2, "end": 1.0}}}},
        "divergence": {"name": "reverse_kl"},
        "objective": {"divergence": 1.0},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    recipe, _ = load_recipe(path)
    params = P(**recipe.teacher.params)
    assert params.reveal.name == "linear" and params.ema_decay == 0.95
    assert SelfContextTeacher(P(weights="ema")).ema_decay == 0.99


@pytest.mark.parametrize("weights, sharding, refused", [
    ("initial", "fsdp", False),  # FSDP2: the initial copy is kept as each rank's shard (tests/e2e/test_sharded.py)
    ("initial", "deepspeed_zero3", True),
    ("ema", "fsdp", True),
    ("ema", "deepspeed_zero3", True),
    ("ema", "ddp", False),
])
def test_engines_the_frozen_weights_cannot_follow_are_refused_with_an_alternative(weights, sharding, refused,
                                                                                  opd_tiny_model, opd_tokenizer):
    from opd_plugins.errors import OPDError

    teacher = SelfContextTeacher(SelfContextTeacher.Params(template="{prompt} {answer}", weights=weights))
    ctx = fake_trainer(copy.deepcopy(opd_tiny_model), opd_tokenizer, sharding=sharding)
    if not refused:
        teacher.setup(ctx)
        assert teacher.shadow is not None
        return
    with pytest.raises(OPDError) as err:
        teacher.setup(ctx)
    msg = str(err.value)
    assert f"weights: {weights}" in msg and ("ZeRO-3" in msg or "FSDP" in msg) and "use " in msg and "weights: live" in msg
