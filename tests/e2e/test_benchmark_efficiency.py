"""benchmarks/efficiency.py: ``--quick`` end to end (every arm, the JSON, equal token budgets; never an accuracy), the
token counter against TRL's own completion lengths, the teacher's cache and merge, and the tokens-to-reach rule."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.benchmarks import check_arms, quick, run, table_rows

import _arms  # benchmarks/, on sys.path through helpers.benchmarks
import efficiency

ARMS = ["grpo", "opd", "opd_dense", "opsd", "kdrl"]


def test_quick_runs_every_arm_to_the_same_budget(tmp_path):
    proc, r = quick("efficiency.py", tmp_path)
    check_arms(r, ARMS)
    assert {"task", "teacher"} <= set(r)
    assert r["teacher"]["trained_now"] and Path(r["teacher"]["path"]).name == "merged"
    assert r["teacher"]["n"] == r["settings"]["eval_n"]
    for name, arm in r["arms"].items():
        assert arm["overrides"] == list(efficiency.arms(r["teacher"]["path"], [name])[0].overrides)
    assert all(set(row) >= {"accuracy", "se", "tokens_used", "tokens_to_grpo_final", "grpo_tokens_over_arm_tokens"}
               for row in r["table"])
    header, arms = table_rows(proc.stdout)
    assert header == ["arm", "final accuracy ± SE", "tokens used", "tokens to GRPO's final accuracy",
                      "GRPO tokens / arm tokens", "per seed"]
    assert arms == ARMS
    assert "[efficiency] opd seed 0:" in proc.stderr  # progress lines
    assert all([p["seed"] for p in row["per_seed"]] == [0] for row in r["table"])
    for arm in r["arms"].values():  # what reached the loss with a signal, per batch and per run
        run_ = arm["runs"][0]
        assert set(run_["loss_signal"]) == {*_arms.SIGNAL_KEYS, *_arms.RULE_KEYS}
        assert all(set(_arms.SIGNAL_KEYS) <= set(b) for b in run_["per_batch"])
    assert "training batches, mean share of completions" in proc.stdout

    # --from-json: the same tables again, the curves drawn, the JSON left as it was
    out = tmp_path / "efficiency.json"
    before = out.read_bytes()
    again = run("efficiency.py", tmp_path, "--from-json", str(out), "--png", str(tmp_path / "again.png"))
    tables = proc.stdout[proc.stdout.index("| arm |"):proc.stdout.index("\nwrote ")]
    assert again.stdout.startswith(tables) and "held-out accuracy ± SE @ mean student tokens" in tables
    assert (tmp_path / "again.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.read_bytes() == before


def _counted_grpo_run(tmp_path, tokenizer, plugins=(), **args):
    """A tiny GRPO run (rewards 0, 1, 0, 1, ... in every group; "7" ends a completion) with a StudentTokens
    counter and ``plugins`` registered: (trainer, counter)."""
    from helpers.tiny import prompt_dataset

    from opd_plugins.manager import get_plugin_manager
    from opd_plugins.testing import build_tiny_model
    from opd_plugins.trainers import Components, OPDConfig, OPDTrainer

    pm = get_plugin_manager(entrypoints=False)
    counter = _arms.StudentTokens()
    pm.register(counter, name="counter")
    for i, plugin in enumerate(plugins):
        pm.register(plugin, name=f"plugin{i}")
    pm.check_hooks()
    args = OPDConfig(output_dir=str(tmp_path), logging_steps=1, report_to="none", save_strategy="no", bf16=False,
                     use_cpu=True, disable_tqdm=True, temperature=1.0, **args)
    model = build_tiny_model(tokenizer, seed=0)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["7"])]
    tr = OPDTrainer(model=model, args=args, components=Components.build(pg_weight=1.0), plugin_manager=pm,
                    reward_funcs=[lambda completions, **kw: [float(i % 2) for i in range(len(completions))]],
                    train_dataset=prompt_dataset(), processing_class=tokenizer)
    tr.train()
    return tr, counter


def test_student_tokens_equal_trls_completion_lengths(tmp_path, opd_tokenizer):
    """The counter's total over a run equals the completion lengths TRL logs for every generation batch."""
    tr, counter = _counted_grpo_run(tmp_path, opd_tokenizer, max_steps=4, per_device_train_batch_size=4,
                                    num_generations=2, max_completion_length=8)
    lengths = [h["completions/mean_length"] * 4 for h in tr.state.log_history if "completions/mean_length" in h]
    assert len(lengths) == 4 == counter.batches and counter.rollouts == 16
    assert counter.tokens == round(sum(lengths)) and counter.tokens < 16 * 8  # some stop early, at "7"
    assert counter.groups == 8 and counter.non_degenerate == 8  # rewards 0, 1 in every group of two


def test_loss_signal_against_hand_counts():
    """Six completions in three groups of two, stop ids 2 (EOS) and 0 (pad), T = 3."""
    ids = torch.tensor([[5, 6, 7],   # cut (no stop id), in the loss, advantage 0
                        [5, 2, 0],   # ended, in the loss, advantage 1: 2 loss tokens
                        [5, 6, 7],   # cut and masked out of the loss (TRL's masking), advantage -1
                        [5, 6, 2],   # ended, in the loss, advantage 0.5: 3 loss tokens
                        [2, 0, 0],   # ended, in the loss, advantage 0
                        [5, 6, 2]])  # ended, in the loss, advantage 0
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    adv = torch.tensor([0.0, 1.0, -1.0, 0.5, 0.0, 0.0])
    got = _arms.loss_signal(ids, mask, adv, [2, 0, None], num_generations=2)
    assert got["cut_share"] == pytest.approx(2 / 6)
    assert got["in_loss_share"] == pytest.approx(5 / 6)
    assert got["signal_share"] == pytest.approx(2 / 6)  # rows 1 and 3; row 2's advantage is outside the loss
    assert got["signal_token_share"] == pytest.approx((2 + 3) / 12)  # 3 + 2 + 0 + 3 + 1 + 3 loss tokens
    assert got["signal_group_share"] == pytest.approx(2 / 3)  # groups 0 and 1; group 2 has none
    # per-token advantages: a row counts when a loss token has a non-zero advantage
    per_token = torch.zeros(6, 3)
    per_token[0, 2] = 0.3  # in the loss
    per_token[1, 2] = 0.3  # outside it (mask 0)
    got = _arms.loss_signal(ids, mask, per_token, [2, 0], num_generations=2)
    assert got["signal_share"] == pytest.approx(1 / 6) and got["signal_token_share"] == pytest.approx(3 / 12)
    assert _arms.loss_signal(ids, torch.zeros_like(mask), adv, [2, 0], 2)["signal_token_share"] == 0.0


def test_rule_signal_against_hand_counts():
    """Two groups of four. Group 0: rewards 1, 0, 1, 1 with the middle two cut; group 1: 1, 1, 0, 0, none cut."""
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    cut = torch.tensor([False, True, True, False, False, False, False, False])
    lengths = torch.tensor([2, 8, 8, 3, 2, 2, 2, 2])  # 29 tokens in all
    got = _arms.rule_signal(rewards, cut, lengths, num_generations=4)
    # keep: group means 0.75 and 0.5, so every completion has a non-zero advantage and all are in the loss
    assert got["if_keep_signal_share"] == 1.0 and got["if_keep_signal_token_share"] == 1.0
    # TRL's masking: the same advantages (the cut rewards stay in the baseline), the two cut rows leave the loss
    assert got["if_mask_truncated_signal_share"] == pytest.approx(6 / 8)
    assert got["if_mask_truncated_signal_token_share"] == 1.0  # 2 + 3 + 4 x 2: all 13 loss tokens
    # mask_reward: group 0's baseline is its two scored rewards (1, 1), so nothing there; group 1 as before; every
    # row stays in the loss, so group 0's 21 tokens dilute the other 8
    assert got["if_mask_reward_signal_share"] == pytest.approx(4 / 8)
    assert got["if_mask_reward_signal_token_share"] == pytest.approx(8 / 29)
    unscored = rewards.clone()
    unscored[4:] = float("nan")  # a group no reward function scored has no signal under any rule
    assert _arms.rule_signal(unscored, cut, lengths, 4)["if_keep_signal_share"] == pytest.approx(4 / 8)
    ids = torch.tensor([[5, 2, 0], [5, 6, 7], [5, 6, 2], [2, 0, 0], [5, 0, 0]])  # EOS 2, pad 0
    assert _arms.cut_rows(ids, [2, 0]).tolist() == [False, True, False, False, False]


@pytest.mark.parametrize("setting", ["keep", "mask_truncated_completions", "mask_reward"])
def test_loss_signal_sees_trls_masking_and_mask_reward(tmp_path, opd_tokenizer, setting):
    """On a real run: TRL's masking takes the cut completions out of the loss (so what is in it is what ended), and
    ``mask_reward`` keeps them in it with no task-reward advantage (so every signal comes from what ended); and
    under each setting the signal the trainer's advantages carry is the one rule_signal predicts for its rule."""
    extra = {"keep": {}, "mask_truncated_completions": {"mask_truncated_completions": True},
             "mask_reward": {"truncated_completions": "mask_reward"}}[setting]
    rule = {"mask_truncated_completions": "mask_truncated"}.get(setting, setting)
    _, counter = _counted_grpo_run(tmp_path, opd_tokenizer, max_steps=3, per_device_train_batch_size=8,
                                   num_generations=4, max_completion_length=6, **extra)
    batches = [b for b in counter.per_batch if "cut_share" in b]
    assert len(batches) == 3
    assert any(0 < b["cut_share"] < 1 for b in batches)  # some stop at "7", some are cut
    for b in batches:
        if setting == "mask_truncated_completions":
            assert b["in_loss_share"] == pytest.approx(1 - b["cut_share"])
        else:
            assert b["in_loss_share"] == 1.0
        if setting != "keep":
            assert b["signal_share"] <= 1 - b["cut_share"] + 1e-9  # a cut completion never carries a reward signal
        assert b[f"if_{rule}_signal_share"] == pytest.approx(b["signal_share"])
        assert b[f"if_{rule}_signal_token_share"] == pytest.approx(b["signal_token_share"])


def test_zero_cut_advantage_keeps_trls_baseline_and_the_cut_tokens(tmp_path, opd_tokenizer):
    """The counterfactual: with ``keep``, every cut completion stays in the loss with advantage 0, and which
    completions carry a signal is what TRL's rule gives them (the cut rewards in the baseline)."""
    _, counter = _counted_grpo_run(tmp_path, opd_tokenizer, plugins=[_arms.ZeroCutAdvantage()], max_steps=3,
                                   per_device_train_batch_size=8, num_generations=4, max_completion_length=6)
    batches = [b for b in counter.per_batch if "cut_share" in b]
    assert any(0 < b["cut_share"] < 1 for b in batches)
    assert any(b["if_keep_signal_share"] > b["signal_share"] for b in batches)  # it did zero something
    for b in batches:
        assert b["in_loss_share"] == 1.0 and b["signal_share"] <= 1 - b["cut_share"] + 1e-9
        assert b["signal_share"] == pytest.approx(b["if_mask_truncated_signal_share"])


def test_zero_cut_advantage_is_for_the_reward_only_arm(tmp_path, capsys):
    with pytest.raises(SystemExit):
        efficiency.main(["--quick", "--arms", "grpo,opd", "--zero-cut-advantage", "--out", str(tmp_path / "x.json")])
    assert "--zero-cut-advantage is a counterfactual for the reward-only arm" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_tokens_to_reach_interpolates_between_checkpoints():
    curve = [{"tokens": 0, "accuracy": 0.1}, {"tokens": 100, "accuracy": 0.2}, {"tokens": 200, "accuracy": 0.4},
             {"tokens": 300, "accuracy": 0.3}]
    assert _arms.tokens_to_reach(curve, 0.3) == pytest.approx(150.0)  # 100 + (0.3 - 0.2) / (0.4 - 0.2) * 100
    assert _arms.tokens_to_reach(curve, 0.4) == 200.0
    assert _arms.tokens_to_reach(curve, 0.05) == 0.0  # reached before training
    assert _arms.tokens_to_reach(curve, 0.5) is None
    rows = efficiency.table({"grpo": {"summary": _arms_summary(curve)},
                             "opd": {"summary": _arms_summary([{"tokens": 0, "accuracy": 0.1},
                                                               {"tokens": 100, "accuracy": 0.5}])}})
    grpo, opd = rows
    assert grpo["tokens_to_grpo_final"] == pytest.approx(150.0) and grpo["grpo_tokens_over_arm_tokens"] == 1.0
    assert opd["tokens_to_grpo_final"] == pytest.approx(50.0)
    assert opd["grpo_tokens_over_arm_tokens"] == pytest.approx(3.0)


def test_per_seed_ratios_pair_each_seed_with_grpos_run_of_that_seed():
    def run(seed, accs, tokens=(0, 100, 200)):
        return {"seed": seed, "checkpoints": [{"tokens": t, "accuracy": a} for t, a in zip(tokens, accs)]}

    grpo = {"runs": [run(0, [0.2, 0.3, 0.8]), run(1, [0.2, 0.6, 0.7]), run(2, [0.2, 0.2, 0.1])]}
    opd = {"runs": [run(0, [0.2, 0.9, 0.9]), run(1, [0.2, 0.5, 0.6]), run(2, [0.2, 0.5, 0.5])]}
    got = efficiency.per_seed(grpo, opd)
    assert [p["seed"] for p in got] == [0, 1, 2] and [p["grpo_final"] for p in got] == [0.8, 0.7, 0.1]
    # seed 0: GRPO reaches its 0.8 at its last checkpoint (200); opd at 0.2 + 0.6/0.7 of the way to 100 tokens
    assert got[0]["tokens_to_grpo_final"] == pytest.approx(600 / 7)
    assert got[0]["ratio"] == pytest.approx(200 / (600 / 7)) and got[0]["note"] == ""
    assert got[1]["ratio"] is None and got[1]["note"] == "not reached"  # opd's 0.6 < 0.7
    assert got[2]["ratio"] is None and got[2]["note"] == "GRPO did not improve on the initial model"
    assert [p["ratio"] for p in efficiency.per_seed(grpo, grpo)][:2] == [1.0, 1.0]
    assert efficiency.per_seed(None, opd) == []
    with pytest.raises(ValueError, match="seed order"):
        efficiency.per_seed(grpo, {"runs": [run(1, [0.2, 0.5, 0.6])]})


def test_from_json_refuses_what_is_not_an_efficiency_run(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no such file"):
        efficiency.main(["--from-json", str(tmp_path / "missing.json")])
    other = tmp_path / "samplers.json"
    other.write_text(json.dumps({"benchmark": "samplers", "arms": {}}))
    with pytest.raises(SystemExit, match="no arm of an efficiency benchmark in it"):
        efficiency.main(["--from-json", str(other)])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(SystemExit, match="not an efficiency benchmark's JSON"):
        efficiency.main(["--from-json", str(broken)])
    assert not list(tmp_path.glob("*.png"))


def _arms_summary(curve):
    return {"curve": curve, "final": {**curve[-1], "se": 0.0}, "se_over": "seeds"}


def test_summary_means_and_standard_errors_over_seeds():
    def run(acc, tokens):
        return {"tokens": tokens, "non_degenerate_share": 0.5, "guided_share": 0.0,
                "checkpoints": [{"tokens": 0, "accuracy": 0.1, "stderr": 0.02}, {"tokens": tokens, "accuracy": acc,
                                                                                   "stderr": 0.03}]}

    one = _arms.summarize([run(0.3, 100)])
    assert one["final"]["se"] == 0.03 and one["se_over"] == "prompts (binomial)"
    three = _arms.summarize([run(0.2, 100), run(0.3, 104), run(0.7, 102)])
    assert three["final"]["accuracy"] == pytest.approx(0.4) and three["final"]["tokens"] == pytest.approx(102)
    assert three["final"]["se"] == pytest.approx((((0.2 - 0.4) ** 2 + 0.1**2 + 0.3**2) / 2) ** 0.5 / 3**0.5)
    assert three["curve"][0]["se"] == 0.0


def test_signal_table_has_a_row_per_seed_and_their_mean():
    def run(seed, cut, rules=None):
        signal = dict(zip(_arms.SIGNAL_KEYS, [cut, 1.0, 0.25, 0.2, 0.5], strict=True))
        return {"seed": seed, "loss_signal": {**signal, **(rules or {})}}

    rules = dict(zip(_arms.RULE_KEYS, [0.5, 0.6, 0.4, 1.0, 0.1, 0.125], strict=True))
    runs = [run(0, 0.5, rules), run(1, 0.25)]  # seed 1 written before the rules were recorded
    results = {"grpo": {"runs": runs, "summary": {"loss_signal": _arms.mean_signal([r["loss_signal"] for r in runs])}},
               "opd": {"runs": [{"seed": 0}], "summary": {}}}  # written before the signal was recorded: no row
    text = efficiency.signal_table(results)
    actual, by_rule = text.split("the same rollouts under each treatment")
    assert actual.strip().splitlines()[-3:] == ["| grpo seed 0 | 0.50 | 1.00 | 0.25 | 0.20 | 0.50 |",
                                                "| grpo seed 1 | 0.25 | 1.00 | 0.25 | 0.20 | 0.50 |",
                                                "| grpo (mean) | 0.38 | 1.00 | 0.25 | 0.20 | 0.50 |"]
    assert by_rule.strip().splitlines()[-4:] == ["| arm | keep | mask_truncated | mask_reward |", "|---|---|---|---|",
                                                 "| grpo seed 0 | 0.50 (0.60) | 0.40 (1.00) | 0.10 (0.12) |",
                                                 "| grpo (mean) | 0.50 (0.60) | 0.40 (1.00) | 0.10 (0.12) |"]
    assert efficiency.signal_table({"opd": results["opd"]}) == ""


def test_teacher_is_trained_once_and_cached_by_recipe(tmp_path):
    """A second call reuses the cached teacher; a changed recipe trains another; what is cached is a plain merged
    checkpoint of the run's adapter."""
    _, tiny = _arms.tiny_models(tmp_path)
    over = [f"model.name_or_path={tiny}", *_arms.QUICK_TRAINER, "data.train_size=8", "trainer.args.max_steps=1"]
    cache = tmp_path / "cache"
    first = efficiency.ensure_teacher(efficiency.TEACHER_RECIPE, over, cache, retrain=False)
    again = efficiency.ensure_teacher(efficiency.TEACHER_RECIPE, over, cache, retrain=False)
    assert first["trained_now"] and not again["trained_now"] and again["path"] == first["path"]
    assert again["steps"] == 1
    evaluation_only = efficiency.ensure_teacher(efficiency.TEACHER_RECIPE, [*over, "evaluation.num_prompts=3"], cache,
                                                retrain=False)
    assert not evaluation_only["trained_now"]  # evaluation settings do not change what is trained
    other = efficiency.ensure_teacher(efficiency.TEACHER_RECIPE, [*over, "trainer.args.learning_rate=0.01"], cache,
                                      retrain=False)
    assert other["trained_now"] and other["key"] != first["key"]
    merged = Path(first["path"])
    assert (merged / efficiency.MERGED_MARKER).is_file() and not (merged / "adapter_config.json").exists()
    assert (merged.parent / "run" / "final" / "adapter_config.json").is_file()


def test_merged_teacher_computes_what_base_plus_adapter_computes(tmp_path):
    from types import SimpleNamespace

    from peft import LoraConfig, PeftModel, get_peft_model

    from opd_plugins.models import load_causal_lm

    _, tiny = _arms.tiny_models(tmp_path)
    peft = get_peft_model(load_causal_lm(str(tiny)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)  # a trained-looking adapter (B = 0 would be the identity)
    peft.save_pretrained(tmp_path / "final")
    efficiency.merge_into(SimpleNamespace(model=SimpleNamespace(name_or_path=str(tiny), dtype="float32")),
                          tmp_path / "final", tmp_path / "merged")
    ids = torch.tensor([[5, 9, 17, 33, 2, 41]])
    merged = load_causal_lm(str(tmp_path / "merged")).eval()
    with_adapter = PeftModel.from_pretrained(load_causal_lm(str(tiny)), str(tmp_path / "final")).eval()
    with torch.no_grad():
        got, want, base = merged(ids).logits, with_adapter(ids).logits, load_causal_lm(str(tiny))(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - base).abs().max() > 1e-3
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


def test_probe_measures_every_candidate_task(tmp_path):
    run("efficiency.py", tmp_path, "--quick", "--probe", "--out", str(tmp_path / "efficiency.json"))
    rows = json.loads((tmp_path / "efficiency_probe.json").read_text())["rows"]
    assert [(r["op"], r["digits"]) for r in rows] == list(efficiency.PROBES)
    assert all(r["n"] == 8 and r["in_band"] == (0.1 <= r["accuracy"] <= 0.4) for r in rows)
    # one-digit multiplication has too few held-out problems to be the benchmark's task (n >= 200)
    assert [r["held_out_problems"] for r in rows] == [None, None, 16, None]
    assert not (tmp_path / "efficiency.json").exists()


def test_set_overrides_reach_every_arm_after_the_benchmarks_own(tmp_path):
    """``--set`` lands in each arm's recipe after the benchmark's settings: a shorter completion cap than --quick's 8
    shows in the counted tokens, and the JSON records it with the other common overrides."""
    out = tmp_path / "efficiency.json"
    run("efficiency.py", tmp_path, "--quick", "--arms", "grpo,opd", "--out", str(out),
        "--set", "trainer.args.max_completion_length=3", "--set", "trainer.args.mask_truncated_completions=true")
    r = json.loads(out.read_text())
    assert r["settings"]["common_overrides"][-2:] == ["trainer.args.max_completion_length=3",
                                                      "trainer.args.mask_truncated_completions=true"]
    for arm in r["arms"].values():
        (only,) = arm["runs"]
        assert only["batch_max_tokens"] == 4 * 3  # 4 rows per generation batch, 3 tokens each at most
        assert all(b["tokens"] - a["tokens"] <= 12 for a, b in zip([{"tokens": 0}, *only["per_batch"]],
                                                                   only["per_batch"]))


def test_set_refuses_a_bad_override_before_anything_trains(tmp_path):
    out = tmp_path / "efficiency.json"
    proc = subprocess.run([sys.executable, str(_arms.ROOT / "benchmarks" / "efficiency.py"), "--quick", "--out",
                           str(out), "--set", "trainer.args.mask_truncated=true"], cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--set trainer.args.mask_truncated=true" in proc.stderr
    assert "Did you mean 'mask_truncated_completions'?" in proc.stderr
    assert not out.exists() and "[efficiency]" not in proc.stderr  # no teacher, no arm: no progress line yet
