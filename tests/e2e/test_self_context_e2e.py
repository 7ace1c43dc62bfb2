"""self_context in real tiny training runs: the EMA teacher follows the optimizer steps (with gradient
accumulation), survives a checkpoint resume, and the reveal ratio follows its schedule."""

import pytest
import torch
from helpers.tiny import even_token_reward, history, trainer
from transformers import TrainerCallback

from opd_plugins.teachers import SelfContextTeacher
from opd_plugins.testing import build_tiny_model
from opd_plugins.testing.contracts import fake_trainer, teacher_batch
from opd_plugins.trainers import Components

DECAY = 0.7


def _student(tokenizer, kind):
    model = build_tiny_model(tokenizer, seed=0)
    if kind == "full":
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class _Recorder(TrainerCallback):
    """The trainable parameters after every optimizer step, and how many micro-batches ran."""

    def __init__(self, model):
        self.model, self.after_step, self.substeps, self.at_train_begin = model, [], 0, None
        self.teacher = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.teacher is not None:
            self.at_train_begin = {k: v.clone() if isinstance(v, torch.Tensor) else v
                                   for k, v in self.teacher.state_dict().items()}

    def on_substep_end(self, args, state, control, **kwargs):
        self.substeps += 1

    def on_step_end(self, args, state, control, **kwargs):
        self.after_step.append({n: p.detach().double().clone() for n, p in _trainable(self.model).items()})


def _run(tmp_path, tokenizer, model, teacher, **cfg):
    comps = Components.build(teacher=teacher, divergence="reverse_kl", pg_weight=1.0, div_weight=1.0)
    tr = trainer(tmp_path, tokenizer, model, components=comps, reward_funcs=[even_token_reward],
                 learning_rate=2e-2, **cfg)
    rec = _Recorder(model)
    rec.teacher = teacher
    tr.add_callback(rec)
    return tr, rec


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_ema_follows_optimizer_steps_with_gradient_accumulation(kind, tmp_path, opd_tokenizer):
    model = _student(opd_tokenizer, kind)
    start = {n: p.detach().double().clone() for n, p in _trainable(model).items()}
    teacher = SelfContextTeacher(SelfContextTeacher.Params(weights="ema", ema_decay=DECAY))
    tr, rec = _run(tmp_path / "run", opd_tokenizer, model, teacher, max_steps=3, gradient_accumulation_steps=2)
    tr.train()
    assert len(rec.after_step) == 3 and rec.substeps == 3  # 2 micro-batches per optimizer step
    ref = dict(start)
    for params in rec.after_step:
        ref = {n: DECAY * ref[n] + (1 - DECAY) * params[n] for n in ref}
    state = teacher.state_dict()
    assert state["ema_updates"] == 3
    assert {k[4:] for k in state if k.startswith("ema.")} == set(ref)
    for n, r in ref.items():
        torch.testing.assert_close(state[f"ema.{n}"].double(), r, atol=1e-6, rtol=0)
    moved = max(float((rec.after_step[-1][n] - start[n]).abs().max()) for n in ref)
    assert moved > 1e-3  # training moved the weights, so the check above is not trivially true

    # The teacher scores with the averaged weights: equal to a live teacher on a copy holding them by hand.
    batch = teacher_batch(opd_tokenizer)
    m = batch.completion_mask.bool()
    got = teacher.score(batch).token_logps
    averaged = _student(opd_tokenizer, kind)  # same base weights (a deepcopy of a prepared model would share
    with torch.no_grad():                    # its wrapped forward with the original)
        for n, p in _trainable(averaged).items():
            p.copy_(ref[n].float())
    for target, same in ((averaged, True), (model, False)):
        live = SelfContextTeacher()
        live.setup(fake_trainer(target, opd_tokenizer, temperature=tr.temperature))
        diff = float((live.score(batch).token_logps[m] - got[m]).abs().max())
        assert diff < 1e-5 if same else diff > 1e-4, (same, diff)


def test_ema_state_survives_checkpoint_resume(tmp_path, opd_tokenizer):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    params = SelfContextTeacher.Params(weights="ema", ema_decay=DECAY)
    first = SelfContextTeacher(params)
    tr, _ = _run(out, opd_tokenizer, _student(opd_tokenizer, "lora"), first, max_steps=2, save_strategy="steps",
                 save_steps=2)
    tr.train()
    saved = first.state_dict()
    assert saved["ema_updates"] == 2
    ckpt = out / "checkpoint-2"
    on_disk = load_file(str(ckpt / "opd_components.safetensors"))
    assert all(torch.equal(on_disk[f"teacher::{k}"], v) for k, v in saved.items() if k.startswith("ema."))

    model = _student(opd_tokenizer, "lora")  # fresh weights: its own average would start elsewhere
    second = SelfContextTeacher(params)
    tr2, rec = _run(out, opd_tokenizer, model, second, max_steps=3, save_strategy="no")
    assert not all(torch.equal(second.state_dict()[k], v) for k, v in saved.items() if k.startswith("ema."))
    tr2.train(resume_from_checkpoint=str(ckpt))
    restored = rec.at_train_begin  # after the checkpoint was loaded, before the first resumed step
    assert restored["ema_updates"] == 2
    assert all(torch.equal(restored[k], v) for k, v in saved.items() if k.startswith("ema."))
    assert len(rec.after_step) == 1 and tr2.state.global_step == 3
    final = second.state_dict()
    assert final["ema_updates"] == 3
    for n, p in rec.after_step[0].items():
        expected = DECAY * saved[f"ema.{n}"].double() + (1 - DECAY) * p
        torch.testing.assert_close(final[f"ema.{n}"].double(), expected, atol=1e-6, rtol=0)


def test_reveal_ratio_follows_a_linear_schedule(tmp_path, opd_tokenizer):
    from opd_plugins.manager import get_plugin_manager

    teacher = get_plugin_manager().registry.build("teacher", ("self_context", {
        "template": "{prompt}\n{hint}", "reveal_column": "hint", "reveal": {"name": "linear", "params": {"start": 0.0, "end": 1.0}}}))
    shown = []
    render = teacher.teacher_prompt

    def spy(prompt, row, reveal_ratio=None):
        out = render(prompt, row, reveal_ratio)
        shown.append(out[-1]["content"].split("\n", 1)[1])
        return out

    teacher.teacher_prompt = spy
    tr, _ = _run(tmp_path / "run", opd_tokenizer, build_tiny_model(opd_tokenizer, seed=0), teacher, max_steps=3)
    tr.train()
    assert history(tr, "teacher/reveal_ratio") == pytest.approx([0.0, 1 / 3, 2 / 3])
    # 4 completions per step, hints of 6 words "(Hint: the correct answer is N.)": 0, 2 then 4 words shown.
    assert len(shown) == 12
    assert {len(s.split()) for s in shown[:4]} == {0} and all(s == "" for s in shown[:4])
    assert {s for s in shown[4:8]} == {"(Hint: the"}
    assert {s for s in shown[8:]} == {"(Hint: the correct answer"}


def test_initial_weights_for_full_fine_tuning_stay_initial_after_training(tmp_path, opd_tokenizer):
    # (A deepcopy of the model would not do: TRL patches model.forward with a closure over the live model.)
    model = _student(opd_tokenizer, "full")
    teacher = SelfContextTeacher(SelfContextTeacher.Params(weights="initial"))
    tr, _ = _run(tmp_path / "run", opd_tokenizer, model, teacher, max_steps=2)
    tr.train()
    batch = teacher_batch(opd_tokenizer)
    m = batch.completion_mask.bool()
    got = teacher.score(batch).token_logps
    for target, same in ((_student(opd_tokenizer, "full"), True), (model, False)):
        live = SelfContextTeacher()
        live.setup(fake_trainer(target, opd_tokenizer, temperature=tr.temperature))
        diff = float((live.score(batch).token_logps[m] - got[m]).abs().max())
        assert diff < 1e-5 if same else diff > 1e-4, (same, diff)
