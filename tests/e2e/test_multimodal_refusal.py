"""Vision-language inputs are refused wherever opd_plugins would score them as text only."""

import pytest
import torch
from helpers.tiny import even_token_reward, prompt_dataset, trainer
from trl import GRPOTrainer

from opd_plugins.errors import OPDError
from opd_plugins.testing import build_tiny_model
from opd_plugins.trainers import Components
from opd_plugins.trainers.opd_trainer import _image_columns


def _with_images():
    ds = prompt_dataset(1)
    return ds.add_column("image", [None] * len(ds))


@pytest.mark.parametrize("build, named", [
    (dict(teacher="self_context", divergence="reverse_kl"), "teacher 'self_context'"),
    (dict(correction={"mode": "token_tis"}), "correction 'token_tis'"),
])
def test_an_image_column_is_refused_before_training_with_a_teacher_or_correction(tmp_path, opd_tokenizer, build,
                                                                                  named):
    comps = Components.build(**build)
    with pytest.raises(OPDError, match=rf"the training dataset carries images \(image\), but .*{named}.* text only"):
        trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0), components=comps,
                reward_funcs=[even_token_reward], dataset=_with_images())


def test_images_in_a_generation_batch_are_refused(tmp_path, opd_tokenizer, monkeypatch):
    comps = Components.build(teacher="self_context", divergence="reverse_kl")
    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0), components=comps,
                 reward_funcs=[even_token_reward])
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "image": object()}]
    with pytest.raises(OPDError, match=r"this generation batch carries images \(image\).*divergence 'reverse_kl'"):
        tr._generate_and_score_completions(rows)

    # A processor's fields in TRL's output (a dataset whose images are inside the prompt messages) are caught too.
    def fake(self, inputs):
        return {"pixel_values": torch.zeros(1, 3, 4, 4), "completion_mask": torch.ones(1, 2)}

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", fake)
    with pytest.raises(OPDError, match=r"carries images \(pixel_values\).*teacher 'self_context'"):
        tr._generate_and_score_completions([{"prompt": [{"role": "user", "content": "hi"}]}])


def test_policy_gradient_alone_has_no_text_only_part(tmp_path, opd_tokenizer):
    tr = trainer(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0), components=Components(),
                 reward_funcs=[even_token_reward])
    assert tr.text_only_parts() == []
    assert _image_columns(_with_images()) == ["image"]
    assert _image_columns([{"images": [1]}, {"prompt": "x"}]) == ["images"] and _image_columns([{"image": None}]) == []
