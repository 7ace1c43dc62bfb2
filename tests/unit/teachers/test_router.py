"""Multi-teacher routing by a dataset column."""

import pytest
import torch
import yaml

from opd_plugins.errors import DataError, RecipeError
from opd_plugins.recipe import load_recipe
from opd_plugins.teachers import HFModelTeacher, RouterTeacher
from opd_plugins.testing import save_tiny_model
from opd_plugins.testing.contracts import fake_trainer, teacher_batch


def built(**params):
    """A router built by the registry, as a recipe builds it (the routed teachers are nested components)."""
    from opd_plugins.manager import get_plugin_manager

    return get_plugin_manager().registry.build("teacher", ("router", params))


@pytest.fixture
def two_teachers(tmp_path, opd_tokenizer):
    a = save_tiny_model(tmp_path / "a", seed=1, tokenizer=opd_tokenizer)
    b = save_tiny_model(tmp_path / "b", seed=2, hidden=96, tokenizer=opd_tokenizer)
    return a, b


def test_rows_are_scored_by_their_routed_teacher(two_teachers, opd_tokenizer, opd_tiny_model):
    a, b = two_teachers
    batch = teacher_batch(opd_tokenizer, n=4)
    for i, row in enumerate(batch.rows):
        row["data_source"] = ["math", "code", "math", "code"][i]
    router = built(teachers={
        "math": {"name": "hf_model", "params": {"model": str(a)}},
        "code": {"name": "hf_model", "params": {"model": str(b)}},
    })
    trainer = fake_trainer(opd_tiny_model, opd_tokenizer)
    router.setup(trainer)
    got = router.score(batch, "full")
    for path, rows in ((a, [0, 2]), (b, [1, 3])):
        direct = HFModelTeacher(HFModelTeacher.Params(model=str(path)))
        direct.setup(trainer)
        ref = direct.score(batch, "full")
        for i in rows:
            assert torch.allclose(got.token_logps[i], ref.token_logps[i], atol=1e-5)
            assert torch.allclose(got.logps[i], ref.logps[i], atol=1e-5)


def test_unrouted_value_and_missing_column(two_teachers, opd_tokenizer, opd_tiny_model):
    a, _ = two_teachers
    batch = teacher_batch(opd_tokenizer, n=2)
    router = built(teachers={"math": {"name": "hf_model", "params": {"model": str(a)}}})
    router.setup(fake_trainer(opd_tiny_model, opd_tokenizer))
    with pytest.raises(DataError, match="rows have no column 'data_source'"):
        router.score(batch)
    for row in batch.rows:
        row["data_source"] = "poetry"
    with pytest.raises(DataError, match="no teacher for data_source='poetry'"):
        router.score(batch)


def test_default_must_be_a_route():
    with pytest.raises(ValueError, match="default 'x' is not a key"):
        RouterTeacher(RouterTeacher.Params(teachers={"a": {"name": "self_context"}}, default="x"))


def test_nested_specs_are_validated_with_the_recipe(tmp_path, opd_tiny_model_dir):
    recipe = {
        "model": {"name_or_path": str(opd_tiny_model_dir)},
        "data": {"task": {"name": "arithmetic"}},
        "teacher": {"name": "router", "params": {"teachers": {
            "math": {"name": "hf_modl", "params": {"model": "x"}},
            "code": {"name": "self_context", "params": {"templat": "{prompt}"}},
        }}},
        "divergence": {"name": "reverse_kl"},
        "objective": {"divergence": 1.0},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    msg = str(exc.value)
    assert "teacher.params.teachers.math.name: unknown teacher 'hf_modl'. Did you mean 'hf_model'?" in msg
    assert "teacher.params.teachers.code.params.templat" in msg


def test_a_route_that_cannot_serve_the_divergence_fails_at_validation(tmp_path, opd_tiny_model_dir):
    """The router's capabilities are those every routed teacher has, known when it is built (at validation), so a
    full-vocabulary divergence with a top-k-only route is refused before any model loads."""
    recipe = {
        "model": {"name_or_path": str(opd_tiny_model_dir)},
        "data": {"task": {"name": "arithmetic"}},
        "teacher": {"name": "router", "params": {"column": "task", "teachers": {
            "a": {"name": "hf_model", "params": {"model": str(opd_tiny_model_dir)}},
            "b": {"name": "openai_server", "params": {"base_url": "http://127.0.0.1:9", "model": "t"}},
        }, "default": "a"}},
        "divergence": {"name": "reverse_kl", "params": {"estimator": "full"}},
        "objective": {"divergence": 1.0},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    assert "reverse_kl needs 'full' teacher scores, but teacher 'router' provides only sampled, topk" in str(exc.value)
    recipe["divergence"] = {"name": "reverse_kl"}
    path.write_text(yaml.safe_dump(recipe))
    recipe_obj, _ = load_recipe(path)
    assert recipe_obj.components["teacher"].capabilities == {"sampled", "topk"}


def test_a_router_cannot_route_to_a_router(tmp_path):
    from opd_plugins.manager import get_plugin_manager

    inner = {"name": "router", "params": {"teachers": {"x": {"name": "self_context"}}}}
    problems = get_plugin_manager().registry.problems("teacher", ("router", {"teachers": {"a": inner}}), "teacher")
    assert [(p.path, p.message) for p in problems] == [
        ("teacher.params.teachers.a.name", "a router cannot route to another router")]
