"""SODA end to end on tiny models: resumable pair building, a 2-step DPO run through ``runs.train`` and the CLI,
the recipe rules of ``trainer.name: soda``, and the lifecycle hooks it calls."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from opd_plugins.errors import OPDError, RecipeError
from opd_plugins.recipe import load_recipe
from opd_plugins.recipe.preference import Sampling
from opd_plugins.runs.soda import PAIRS_FILE, build_pairs, read_pairs
from opd_plugins.teachers.blackbox_text import BlackBoxTextTeacher


def column_teacher() -> BlackBoxTextTeacher:
    return BlackBoxTextTeacher(BlackBoxTextTeacher.Params(source="column", template="The answer is {answer}."))


@pytest.fixture
def rows():
    from helpers.tiny import prompt_dataset

    return prompt_dataset(n_repeat=3)  # 12 conversational rows with answer/hint


def lines(path):
    return path.read_text().splitlines()


def test_build_pairs_resumes_after_an_interruption(tmp_path, rows, opd_tokenizer):
    from opd_plugins.testing.models import build_tiny_model

    model = build_tiny_model(opd_tokenizer, seed=0)
    sampling = Sampling(max_completion_length=6, temperature=1.0, generation_batch_size=2)
    fingerprint = {"student": "tiny", "teacher": "column"}
    teacher = column_teacher()
    real = teacher.generate
    calls = []

    def interrupted(prompts, batch_rows=None):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise RuntimeError("teacher went away")
        return real(prompts, batch_rows)

    teacher.generate = interrupted
    with pytest.raises(RuntimeError, match="went away"):
        build_pairs(model, opd_tokenizer, rows, teacher, tmp_path, sampling=sampling, seed=0, fingerprint=fingerprint)
    path = tmp_path / PAIRS_FILE
    first = lines(path)
    assert len(first) == 1 + 4  # header + the two finished batches of 2
    assert [json.loads(x)["index"] for x in first[1:]] == [0, 1, 2, 3]
    with open(path, "ab") as f:  # a run killed in the middle of a write leaves a partial last line
        f.write(b'{"index": 4, "prompt": [{"ro')

    kept, stats = build_pairs(model, opd_tokenizer, rows, column_teacher(), tmp_path, sampling=sampling, seed=0,
                              fingerprint=fingerprint)
    after = lines(path)
    assert after[:5] == first  # finished rows untouched, partial line gone
    assert [json.loads(x)["index"] for x in after[1:]] == list(range(12))
    assert stats["resumed"] == 4 and stats["total"] == 12 and stats["kept"] == len(kept)
    assert stats["kept"] + sum(stats["dropped"].values()) == 12
    for pair, row in zip((json.loads(x) for x in after[1:]), rows, strict=True):
        assert pair["prompt"] == row["prompt"] and pair["chosen"] == f"The answer is {row['answer']}."
    assert read_pairs(path, [r["prompt"] for r in rows], fingerprint) == [json.loads(x) for x in after[1:]]

    # A file that belongs to other settings or other prompts is refused, not silently mixed in.
    with pytest.raises(OPDError, match=r"different settings \(teacher changed\)"):
        build_pairs(model, opd_tokenizer, rows, column_teacher(), tmp_path, sampling=sampling,
                    fingerprint={**fingerprint, "teacher": "other"})
    shuffled = rows.select([1, 0, *range(2, 12)])
    with pytest.raises(OPDError, match="different prompt"):
        build_pairs(model, opd_tokenizer, shuffled, column_teacher(), tmp_path, sampling=sampling,
                    fingerprint=fingerprint)


def test_identical_and_empty_pairs_are_dropped_and_counted(tmp_path, rows, opd_tokenizer, monkeypatch):
    import opd_plugins.generation as generation
    from opd_plugins.testing.models import build_tiny_model

    student = ["The answer is 7.", "", "something", "wrong"]
    monkeypatch.setattr(generation, "generate_text", lambda model, tok, prompts, **kw: student[:len(prompts)])
    teacher = column_teacher()
    real = teacher.generate
    teacher.generate = lambda prompts, batch_rows: ["" if i == 2 else t for i, t in enumerate(real(prompts, batch_rows))]
    kept, stats = build_pairs(build_tiny_model(opd_tokenizer), opd_tokenizer, rows.select(range(4)), teacher, tmp_path,
                              sampling=Sampling(generation_batch_size=4))
    assert stats["dropped"] == {"identical": 1, "empty_student": 1, "empty_teacher": 1}
    assert [(p["index"], p["chosen"], p["rejected"]) for p in kept] == [(3, "The answer is 42.", "wrong")]


def soda_recipe(model_dir, out, **changes):
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"task": {"name": "arithmetic", "params": {"op": "add", "digits": 1, "answer_format": "number_only"}},
                 "train_size": 8, "eval_size": 4},
        "trainer": {"name": "soda", "args": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1.0e-3,
                                             "max_completion_length": 6, "temperature": 1.0, "generation_batch_size": 4,
                                             "save_steps": 1, "gradient_checkpointing": False, "max_length": 128,
                                             "beta": 0.1}},
        "teacher": {"name": "blackbox_text", "params": {"source": "column", "template": "The answer is {answer}."}},
        "evaluation": {"num_prompts": 4, "max_new_tokens": 4, "batch_size": 4},
        "output_dir": str(out),
    }
    for key, value in changes.items():
        node = recipe
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return recipe


def write(tmp_path, recipe, name="soda.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_dpo_run_is_resumable_and_writes_the_run_directory(tmp_path, opd_tiny_model_dir, monkeypatch):
    from safetensors.torch import load_file

    from opd_plugins.runs import train

    out = tmp_path / "run"
    recipe, pm = load_recipe(write(tmp_path, soda_recipe(opd_tiny_model_dir, out)))
    real = BlackBoxTextTeacher.generate
    calls = []

    def flaky(self, prompts, rows=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user stops the run while the pairs are being built
        return real(self, prompts, rows)

    monkeypatch.setattr(BlackBoxTextTeacher, "generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, pm)
    first = lines(out / PAIRS_FILE)
    assert len(first) == 1 + 4 and not list(out.glob("checkpoint-*"))
    with pytest.raises(OPDError, match="already exists"):
        train(recipe, pm)  # refuses to clobber without --resume / --overwrite

    summary = train(recipe, pm, resume=True)
    pairs = lines(out / PAIRS_FILE)
    assert pairs[:5] == first and len(pairs) == 1 + 8
    assert summary["steps"] == 2 and summary["pairs"]["resumed"] == 4 and summary["pairs"]["total"] == 8
    assert summary["before"]["n"] == 4 and summary["after"]["n"] == 4
    for name in ("recipe.yaml", "plugins.json", "run_info.json", "eval_before.json", "eval_summary.json",
                 "metrics.jsonl", "final/model.safetensors", "checkpoint-2/opd_checkpoint_complete"):
        assert (out / name).exists(), name
    assert not (out / ".staging" / "checkpoint-2").exists()
    assert len(lines(out / "run_info.json")) == 2  # one line per start; the refused one wrote nothing
    assert json.loads((out / "eval_summary.json").read_text())["pairs"]["kept"] == summary["pairs"]["kept"]
    losses = [m["loss"] for m in map(json.loads, lines(out / "metrics.jsonl")) if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert any("rewards/margins" in json.loads(m) for m in lines(out / "metrics.jsonl"))
    trained = load_file(str(out / "final" / "model.safetensors"))
    initial = load_file(str(opd_tiny_model_dir / "model.safetensors"))
    changed = [k for k in initial if k in trained and not torch.equal(initial[k], trained[k])]
    assert len(changed) > len(initial) // 2, changed


def test_lora_run_through_the_cli(tmp_path, opd_tiny_model_dir, capsys):
    from safetensors.torch import load_file

    from opd_plugins.cli import main

    out = tmp_path / "run"
    path = write(tmp_path, soda_recipe(opd_tiny_model_dir, out, **{"model.lora": {"r": 4, "lora_alpha": 8},
                                                                    "evaluation.enabled": False}))
    assert main(["validate", str(path)]) == 0
    said = capsys.readouterr().out
    assert "trainer=soda, teacher=blackbox_text; trained as preference pairs" in said
    assert "advantage=" not in said and "rollout=" not in said  # components a preference recipe does not use
    assert main(["train", str(path), "trainer.args.max_steps=2"]) == 0
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: the adapter was trained
    summary = json.loads((out / "eval_summary.json").read_text())
    assert summary["steps"] == 2 and "after" not in summary


def problems(tmp_path, recipe):
    with pytest.raises(RecipeError) as exc:
        load_recipe(write(tmp_path, recipe, "bad.yaml"))
    return str(exc.value)


def test_recipe_rules_for_text_teachers_and_the_soda_trainer(tmp_path, opd_tiny_model_dir):
    base = soda_recipe(opd_tiny_model_dir, tmp_path / "run")

    opd = {**base, "trainer": {"args": {"per_device_train_batch_size": 4, "num_generations": 4}},
           "divergence": {"name": "reverse_kl"}, "objective": {"divergence": 1.0}}
    msg = problems(tmp_path, opd)  # a text-only teacher with the on-policy trainer
    assert "teacher.name: teacher 'blackbox_text' returns only response text" in msg and "trainer.name: soda" in msg
    msg = problems(tmp_path, {**base, "teacher": {"name": "hf_model", "params": {"model": str(opd_tiny_model_dir)}}})
    assert "teacher.name: teacher 'hf_model' scores tokens" in msg and "blackbox_text" in msg
    assert "has 1 problem" in msg  # not also reported by a token-level capability check
    msg = problems(tmp_path, {k: v for k, v in base.items() if k != "teacher"})
    assert "teacher: required key is missing" in msg and "text teacher" in msg

    args = {**base["trainer"]["args"], "num_generations": 4, "learning_rat": 1e-4, "temperature": -1}
    msg = problems(tmp_path, {**base, "trainer": {"name": "soda", "args": args}})
    assert "trainer.args.num_generations: not an argument of TRL's DPOConfig" in msg
    assert "on-policy (GRPO/OPD) option" in msg
    assert "trainer.args.learning_rat: not an argument of TRL's DPOConfig" in msg and "Did you mean 'learning_rate'?" in msg
    assert "trainer.args.temperature: Input should be greater than or equal to 0" in msg
    assert "has 3 problems" in msg

    args = {**base["trainer"]["args"], "loss_type": "exo_pair"}
    msg = problems(tmp_path, {**base, "trainer": {"name": "soda", "args": args}, "token_weighting": [{"name": "tip"}],
                              "objective": {"divergence": 1.0}, "divergence": {"name": "reverse_kl"}})
    assert "token_weighting: not used by trainer 'soda'" in msg
    assert "objective: not used by trainer 'soda'" in msg and "divergence: not used by trainer 'soda'" in msg
    assert "trainer.args.label_smoothing: loss_type: exo_pair needs label_smoothing > 0" in msg
    args = {**base["trainer"]["args"], "loss_type": "sigmoidd", "beta": 0}
    msg = problems(tmp_path, {**base, "trainer": {"name": "soda", "args": args}})
    assert "trainer.args.loss_type: unknown DPO loss type 'sigmoidd'" in msg and "trainer.args.beta: beta must be > 0" in msg

    msg = problems(tmp_path, {**base, "teacher": {"name": "blackbox_text", "params": {"source": "openai_chat",
                                                                                       "model": "m"}}})
    assert "teacher.params: source: openai_chat needs base_url" in msg
    msg = problems(tmp_path, {**base, "trainer": {"name": "sodaa", "args": {}}})
    assert "trainer.name: unknown trainer 'sodaa'. Did you mean 'soda'?" in msg and "registered: opd, soda" in msg

    # The token-level rules are unchanged for other recipes (e.g. GRPO batch divisibility still applies).
    grpo = {**base, "trainer": {"args": {"per_device_train_batch_size": 4, "num_generations": 3}}}
    del grpo["teacher"]
    assert "does not divide the generation batch" in problems(tmp_path, grpo)


def test_the_earlier_dpo_divergence_form_is_read_as_the_soda_trainer_with_a_note(tmp_path, opd_tiny_model_dir):
    legacy = soda_recipe(opd_tiny_model_dir, tmp_path / "run")
    args = dict(legacy["trainer"]["args"])
    beta = args.pop("beta")
    legacy["trainer"] = {"args": args}
    legacy["divergence"] = {"name": "dpo", "params": {"beta": beta, "loss_type": "ipo"}}
    recipe, _ = load_recipe(write(tmp_path, legacy))
    assert recipe.trainer.name == "soda" and recipe.divergence is None
    assert recipe.trainer.args["beta"] == beta and recipe.trainer.args["loss_type"] == "ipo"
    [note] = recipe.notes
    assert "divergence: {name: dpo} is now trainer: {name: soda}" in note and "beta, loss_type" in note


def test_soda_calls_its_lifecycle_hooks_and_refuses_plugins_whose_hooks_it_never_calls(tmp_path, opd_tiny_model_dir):
    import sys
    import types

    from opd_plugins import hookimpl
    from opd_plugins.runs import train

    calls = []
    module = types.ModuleType("soda_hook_recorder")
    for hook in ("opd_trainer_init", "opd_checkpoint_save"):
        setattr(module, hook, hookimpl(specname=hook)(lambda *a, _h=hook, **k: calls.append(_h)))
    sys.modules["soda_hook_recorder"] = module
    recipe = {**soda_recipe(opd_tiny_model_dir, tmp_path / "run", **{"evaluation.enabled": False}),
              "plugins": ["soda_hook_recorder"]}
    loaded, pm = load_recipe(write(tmp_path, recipe))
    train(loaded, pm)
    assert calls[0] == "opd_trainer_init" and calls.count("opd_checkpoint_save") == 2  # save_steps 1, 2 steps

    module.opd_rollout_end = hookimpl(specname="opd_rollout_end")(lambda **k: None)
    msg = problems(tmp_path, {**recipe, "output_dir": str(tmp_path / "run2")})
    assert "plugins[0]: plugin 'soda_hook_recorder' implements opd_rollout_end, which trainer 'soda' never calls" in msg
    del sys.modules["soda_hook_recorder"]


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_dpo_loss_equals_a_naive_reference(tmp_path, opd_tiny_model_dir, beta):
    """The loss the SODA trainer optimises is −log σ(β·[(log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)])
    with π_ref the initial weights, recomputed here from plain forward passes on the same token ids."""
    import torch.nn.functional as F

    from opd_plugins.models import load_causal_lm, load_tokenizer
    from opd_plugins.runs.soda import build_dpo_config, pairs_dataset
    from opd_plugins.trainers.soda_trainer import SODATrainer

    recipe, pm = load_recipe(write(tmp_path, soda_recipe(opd_tiny_model_dir, tmp_path / "run",
                                                         **{"trainer.args.beta": beta})))
    tok = load_tokenizer(str(opd_tiny_model_dir))
    model = load_causal_lm(str(opd_tiny_model_dir), tokenizer=tok)
    ref = load_causal_lm(str(opd_tiny_model_dir), tokenizer=tok)
    pairs = [{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}], "chosen": f"The answer is {2 * i}.",
              "rejected": f"maybe {i} or {3 * i} or so"} for i in range(4)]
    trainer = SODATrainer(model=model, ref_model=ref, args=build_dpo_config(recipe), train_dataset=pairs_dataset(pairs),
                          processing_class=tok, plugin_manager=pm)
    with torch.no_grad():  # move the policy away from the reference so the margins are not all zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.eval()
    with torch.no_grad():
        got = trainer.compute_loss(model, batch)

    def seq_logps(m):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        per_token = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        return (per_token * batch["completion_mask"][:, 1:]).sum(1)

    with torch.no_grad():
        pi, pi_ref = seq_logps(model), seq_logps(ref)
    n = pi.shape[0] // 2  # the first half of the batch holds the chosen responses, the second the rejected
    margin = (pi[:n] - pi_ref[:n]) - (pi[n:] - pi_ref[n:])
    want = -F.logsigmoid(beta * margin).mean()
    assert margin.abs().min() > 1e-3  # a non-trivial check
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
