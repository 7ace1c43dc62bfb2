"""The privileged-context teacher: prompt rendering, column checks, live vs initial weights."""

import pytest
import torch

from opd_plugins.errors import DataError
from opd_plugins.teachers import SelfContextTeacher
from opd_plugins.testing.contracts import fake_trainer, teacher_batch


def test_template_renders_into_last_user_message():
    t = SelfContextTeacher(SelfContextTeacher.Params(template="{prompt}\nReference: {solution}"))
    prompt = [{"role": "system", "content": "sys"}, {"role": "user", "content": "What is 2+2?"}]
    out = t.teacher_prompt(prompt, {"solution": "4", "answer": "4"})
    assert out[0] == prompt[0] and out[1]["content"] == "What is 2+2?\nReference: 4"
    assert prompt[1]["content"] == "What is 2+2?"  # the student's prompt is untouched
    assert t.required_columns() == ("solution",)


def test_missing_column_is_a_clear_error():
    t = SelfContextTeacher(SelfContextTeacher.Params(template="{prompt} {solution}"))
    with pytest.raises(DataError, match="needs column\\(s\\) \\['solution'\\]"):
        t.teacher_prompt("q", {"answer": "1"})


def test_template_must_contain_prompt():
    with pytest.raises(ValueError, match="must contain \\{prompt\\}"):
        SelfContextTeacher.Params(template="{hint}")


def test_privileged_context_changes_scores_and_identity_template_matches_student(opd_tokenizer, opd_tiny_model):
    batch = teacher_batch(opd_tokenizer)
    plain = SelfContextTeacher(SelfContextTeacher.Params(template="{prompt}"))
    hinted = SelfContextTeacher()
    for t in (plain, hinted):
        t.setup(fake_trainer(opd_tiny_model, opd_tokenizer))
    s_plain = plain.score(batch).token_logps
    s_hint = hinted.score(batch).token_logps
    m = batch.completion_mask.bool()
    assert not torch.allclose(s_plain[m], s_hint[m])
    # With the identity template the teacher sees the student's full prompt: compare with a direct forward.
    for i in range(batch.completion_ids.shape[0]):
        text = opd_tokenizer.apply_chat_template(batch.prompts[i], add_generation_prompt=True, tokenize=False)
        prompt_ids = torch.tensor(opd_tokenizer(text, add_special_tokens=False)["input_ids"])
        ids = torch.cat([prompt_ids, batch.completion_ids[i]]).unsqueeze(0)
        with torch.no_grad():
            logps = torch.log_softmax(opd_tiny_model(ids).logits[0, -batch.completion_ids.shape[1] - 1:-1], -1)
        direct = logps.gather(-1, batch.completion_ids[i].unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(direct[m[i]], s_plain[i][m[i]], atol=1e-4)


def test_initial_weights_with_lora_disable_the_adapter(opd_tokenizer, opd_tiny_model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(opd_tiny_model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    batch = teacher_batch(opd_tokenizer)
    live, initial = SelfContextTeacher(), SelfContextTeacher(SelfContextTeacher.Params(weights="initial"))
    for t in (live, initial):
        t.setup(fake_trainer(model, opd_tokenizer))
    m = batch.completion_mask.bool()
    a, b = live.score(batch).token_logps, initial.score(batch).token_logps
    assert not torch.allclose(a[m], b[m])  # the random adapter changes the live policy only
    with model.disable_adapter():
        ref = SelfContextTeacher()
        ref.setup(fake_trainer(model, opd_tokenizer))
        assert torch.allclose(ref.score(batch).token_logps[m], b[m], atol=1e-5)
