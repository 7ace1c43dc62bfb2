"""Greedy decoding that drops finished rows and runs the shared prompt prefix once (opd_plugins.generation)
gives the tokens ``model.generate`` gives, and really does less work."""

from __future__ import annotations

import pytest
import torch

from opd_plugins import generation
from opd_plugins.testing.models import build_tiny_model, build_tokenizer

QUESTIONS = ["Which number is larger: 37 or 26?", "Which number is larger: 5 or 81? Reply briefly.",
             "Which number is larger: 123 or 9?", "Add 4 and 5.", "Which number is larger: 7 or 70? Think."]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


SYSTEM = "You are a careful assistant. Answer questions about numbers with the number alone."


def _messages(q):
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]


def _encode(tok, questions):
    texts = [tok.apply_chat_template(_messages(q), add_generation_prompt=True, tokenize=False) for q in questions]
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _reference(model, enc, eos, max_new_tokens, pad):
    """``model.generate``'s greedy tokens per row, cut after the first ``eos``."""
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                         temperature=None, top_p=None, top_k=None)[:, enc["input_ids"].shape[1]:]
    rows = []
    for r in out.tolist():
        rows.append(r[:r.index(eos) + 1] if eos in r else r)
    return rows


def _frequent_token(model, enc, tok, max_new_tokens):
    """A token that some rows emit early and others never: used as EOS so that rows finish at different steps."""
    free = _reference(model, enc, tok.eos_token_id, max_new_tokens, tok.pad_token_id)
    candidates = [(sum(t in r for r in free), t) for t in sorted({t for r in free for t in r[1:5]})]
    hits, token = max((h, t) for h, t in candidates if h < len(free))
    assert hits >= 2
    return token


def _model(tok, arch="qwen2", seed=3):
    """A tiny random model whose weights are large enough that greedy decoding differs between rows and steps
    (at the default initialisation every row repeats one token)."""
    model = build_tiny_model(tok, arch=arch, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


def _both(model, tok, max_new_tokens, **kw):
    """(``model.generate``'s tokens, ``greedy_dropping_finished``'s) on QUESTIONS, with an EOS that rows reach at
    different steps."""
    enc = _encode(tok, QUESTIONS)
    eos = _frequent_token(model, enc, tok, max_new_tokens)
    with torch.no_grad():
        want = _reference(model, enc, eos, max_new_tokens, tok.pad_token_id)
        got = generation.greedy_dropping_finished(model, enc["input_ids"], enc["attention_mask"],
                                                  max_new_tokens=max_new_tokens, eos_token_id=eos, **kw)
    return want, got


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_same_tokens_as_generate(tok, arch):
    model = _model(tok, arch)
    want, got = _both(model, tok, 10)
    assert got == want
    assert _both(model, tok, 10, min_shared_prefix=10**6)[1] == want     # without the shared prefix too
    assert {len(r) for r in want} != {10}, "some rows must finish early for the test to mean anything"


def test_prefix_runs_once_and_finished_rows_leave(tok):
    model = _model(tok)
    enc = _encode(tok, QUESTIONS)
    eos = _frequent_token(model, enc, tok, 10)
    shapes: list[tuple[int, int]] = []
    hook = model.model.register_forward_hook(lambda m, args, kwargs, out: shapes.append(tuple(kwargs["input_ids"].shape)),
                                             with_kwargs=True)
    try:
        with torch.no_grad():
            got = generation.greedy_dropping_finished(model, enc["input_ids"], enc["attention_mask"],
                                                      max_new_tokens=10, eos_token_id=eos)
    finally:
        hook.remove()
    real = [ids[m.bool()] for ids, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
    shared = generation._shared_prefix_length(real)
    # Counted naively: the first position where some row differs from the first (the system prompt is common).
    lists = [r.tolist() for r in real]
    naive = next(i for i in range(min(map(len, lists))) if len({r[i] for r in lists}) > 1)
    system = tok(SYSTEM, add_special_tokens=False)["input_ids"]
    assert shared == naive and shared > len(system)
    assert shapes[0] == (1, shared)                         # the shared prefix, once
    assert shapes[1] == (len(QUESTIONS), max(len(r) for r in real) - shared)   # then each row's rest, padded
    rows_per_step = [s[0] for s in shapes[2:]]
    assert all(s[1] == 1 for s in shapes[2:])
    # A row leaves the batch at the step after its EOS: the batch shrinks exactly as the rows finish.
    finished_by = [sum(len(r) <= t + 1 for r in got) for t in range(len(rows_per_step))]
    assert rows_per_step == [len(QUESTIONS) - f for f in finished_by]
    assert sum(rows_per_step) < len(QUESTIONS) * 9


def test_shared_prefix_leaves_every_row_a_token():
    rows = [torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 3, 5])]
    assert generation._shared_prefix_length(rows) == 2
    assert generation._shared_prefix_length([torch.tensor([1, 2]), torch.tensor([9, 2])]) == 0


def test_generate_batch_uses_it_only_when_exact(tok, monkeypatch):
    model = _model(tok)
    prompts = [_messages(q) for q in QUESTIONS]
    calls: list[str] = []
    real = generation.greedy_dropping_finished
    monkeypatch.setattr(generation, "greedy_dropping_finished", lambda *a, **k: calls.append("fast") or real(*a, **k))
    with generation.generation_mode(model, tok):
        fast = generation.generate_batch(model, tok, prompts, max_new_tokens=6, temperature=0)
        assert calls == ["fast"]
        model.generation_config.repetition_penalty = 1.3    # a logits processor: model.generate must decode
        generation.generate_batch(model, tok, prompts, max_new_tokens=6, temperature=0)
        assert calls == ["fast"]
        model.generation_config.repetition_penalty = 1.0
        torch.manual_seed(0)
        generation.generate_batch(model, tok, prompts, max_new_tokens=6, temperature=0.7)   # sampling: generate
        assert calls == ["fast"]
        enc = _encode(tok, QUESTIONS)
        want = tok.batch_decode(_reference(model, enc, tok.eos_token_id, 6, tok.pad_token_id), skip_special_tokens=True)
    assert fast == want


def test_lora_model_same_tokens(tok):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(_model(tok, seed=5), lora).eval()
    assert generation._greedy_can_drop_rows(model)
    want, got = _both(model, tok, 8)
    assert got == want
