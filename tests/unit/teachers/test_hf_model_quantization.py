"""hf_model's bitsandbytes option: validated before anything loads, refused with a clear reason on a CPU machine.

(Loading a real 8-bit/4-bit teacher needs a CUDA GPU; these tests check everything up to that point.)"""

import pytest
import torch
import yaml

from opd_plugins.errors import ModelLoadError, RecipeError
from opd_plugins.models import bitsandbytes_config
from opd_plugins.recipe import load_recipe


def _recipe(tmp_path, model_dir, **teacher_params):
    data = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"task": {"name": "arithmetic", "params": {"op": "add", "digits": 1}}},
        "trainer": {"args": {"max_steps": 1}},
        "teacher": {"name": "hf_model", "params": {"model": str(model_dir), **teacher_params}},
        "divergence": {"name": "reverse_kl"},
        "objective": {"policy_gradient": 0.0, "divergence": 1.0},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_quantization_is_a_recipe_error(tmp_path, opd_tiny_model_dir):
    with pytest.raises(RecipeError) as exc:
        load_recipe(_recipe(tmp_path, opd_tiny_model_dir, quantization="3bit"), device_check=False)
    assert "teacher.params.quantization" in str(exc.value) and "'8bit'" in str(exc.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_quantization_on_cpu_is_refused_before_training(tmp_path, opd_tiny_model_dir):
    path = _recipe(tmp_path, opd_tiny_model_dir, quantization="4bit")
    recipe, _ = load_recipe(path, device_check=False)  # `validate` accepts it (the recipe may target a GPU box)
    assert recipe.teacher.params["quantization"] == "4bit"
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)  # `train` checks the device
    assert "teacher.params.quantization: quantization '4bit' loads the weights through bitsandbytes" in str(exc.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_bitsandbytes_config_names_what_is_missing(bits):
    import importlib.util

    with pytest.raises(ModelLoadError) as exc:
        bitsandbytes_config(bits, torch.float32, "teacher-x")
    missing = "pip install 'opd-plugins[quant]'" if importlib.util.find_spec("bitsandbytes") is None else "CUDA GPU"
    assert missing in str(exc.value) and "teacher-x" in str(exc.value)


def test_bitsandbytes_config_rejects_unknown_modes():
    with pytest.raises(ModelLoadError, match="choose 8bit or 4bit"):
        bitsandbytes_config("2bit", torch.float32)
