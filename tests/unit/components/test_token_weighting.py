"""Token weightings (tip, correctness_gate, scope, quality_gate) on small hand-computed cases."""

import json
import math

import pytest
import torch
import yaml
from pydantic import ValidationError

from opd_plugins.divergences.base import StudentOutputs
from opd_plugins.errors import OPDError, RecipeError
from opd_plugins.manager import get_plugin_manager
from opd_plugins.recipe import load_recipe
from opd_plugins.teachers.base import TeacherScores
from opd_plugins.token_weighting import TIP, CorrectnessGate, QualityGate, Scope

NAN = float("nan")
E = math.e


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def sides(s_logps, t_logps, mask=None, s_logits=None, t_full=None):
    s_logps, t_logps = t(s_logps), t(t_logps)
    mask = torch.ones_like(s_logps) if mask is None else t(mask)
    student = StudentOutputs(token_logps=s_logps, mask=mask, logits=s_logits)
    teacher = TeacherScores(token_logps=t_logps, mask=mask.clone(), logps=t_full)
    return student, teacher


def test_registered_with_their_names():
    registry = get_plugin_manager().registry
    for cls in (TIP, CorrectnessGate, Scope, QualityGate):
        assert registry.get("token_weighting", cls.name) is cls
    assert [c.needs_rewards for c in (TIP, CorrectnessGate, Scope, QualityGate)] == [False, True, True, True]


# ---------------------------------------------------------------------------------------------------------------
# tip
# ---------------------------------------------------------------------------------------------------------------
# Five valid tokens p0..p4 = (0,0) (0,1) (0,2) (1,0) (1,1); (1,2) is padding.
# Surprisal entropy  H = [0.1, 2.0, 0.5, 1.0, 3.0]   percentile ranks [0, .75, .25, .5, 1]
# |log π_s − log π_t| D = [2.0, 0.2, 0.1, 0.3, 0.4]  percentile ranks [1, .25, 0, .5, .75]
# p0 is low-entropy, high-divergence (the paper's Q3: confident and wrong).
S_LOGPS = [[-0.1, -2.0, -0.5], [-1.0, -3.0, 0.0]]
T_LOGPS = [[-2.1, -1.8, -0.6], [-1.3, -3.4, 0.0]]
MASK = [[1, 1, 1], [1, 1, 0]]


def tip(**params):
    """A tip weighting; deterministic top-k unless the test asks for the paper's sampling."""
    return TIP(TIP.Params(**{"selection": "topk", **params}))


def test_tip_entropy_fraction_keeps_the_most_uncertain_tokens():
    student, _ = sides(S_LOGPS, T_LOGPS, MASK)
    w = tip(score="entropy", fraction=0.4).weights({}, student, None)  # 2 of 5 tokens: H = 3.0 and 2.0
    assert torch.equal(w, t([[0, 1, 0], [0, 1, 0]]))
    w = tip(score="entropy", fraction=0.5).weights({}, student, None)  # ceil(2.5) = 3 tokens: + H = 1.0
    assert torch.equal(w, t([[0, 1, 0], [1, 1, 0]]))


def test_tip_entropy_or_divergence_also_keeps_the_overconfident_token():
    student, teacher = sides(S_LOGPS, T_LOGPS, MASK)
    tw = tip(score="entropy_or_divergence", fraction=0.4)  # max ranks [1, .75, .25, .5, 1] -> p0 and p4
    assert torch.equal(tw.weights({}, student, teacher), t([[1, 0, 0], [0, 1, 0]]))
    assert tw.last_stats == {"kept_fraction": 0.4, "kept_tokens": 2.0, "valid_tokens": 5.0}
    assert torch.equal(tip(score="entropy_or_divergence", fraction=0.6).weights({}, student, teacher),
                       t([[1, 1, 0], [0, 1, 0]]))
    assert torch.equal(tip(score="divergence", fraction=0.4).weights({}, student, teacher), t([[1, 0, 0], [0, 1, 0]]))


def test_tip_quadrants_with_median_and_explicit_thresholds():
    student, teacher = sides(S_LOGPS, T_LOGPS, MASK)
    tw = tip(keep="quadrant")  # medians: H 1.0, D 0.3 ("high" is strictly above) -> only p0 is Q3
    assert torch.equal(tw.weights({}, student, teacher), t([[1, 0, 0], [0, 0, 0]]))
    stats = tw.last_stats
    assert stats["kept_fraction"] == pytest.approx(0.2)
    assert stats["entropy_threshold"] == pytest.approx(1.0) and stats["divergence_threshold"] == pytest.approx(0.3)
    assert stats["fraction/low_entropy_low_divergence"] == pytest.approx(0.4)  # p2, p3
    assert stats["fraction/high_entropy_high_divergence"] == pytest.approx(0.2)  # p4
    assert stats["fraction/high_entropy_low_divergence"] == pytest.approx(0.2)  # p1
    # H > 0.4: p1..p4; D > 0.15: p0, p1, p3, p4 -> high/high = p1, p3, p4, plus Q3 = p0
    tw = tip(keep="quadrant", entropy_threshold=0.4, divergence_threshold=0.15,
             quadrants=["high_entropy_high_divergence", "low_entropy_high_divergence"])
    assert torch.equal(tw.weights({}, student, teacher), t([[1, 1, 0], [1, 1, 0]]))
    assert tw.last_stats["kept_fraction"] == pytest.approx(0.8)


def test_tip_rescale_keeps_the_loss_size():
    student, _ = sides(S_LOGPS, T_LOGPS, MASK)
    w = tip(score="entropy", fraction=0.4, rescale=True).weights({}, student, None)
    assert torch.equal(w, t([[0, 2.5, 0], [0, 2.5, 0]]))  # 5 valid / 2 kept


def test_tip_uses_exact_entropy_and_kl_when_logits_are_present():
    # Token 0: uniform student over 4 (H = ln 4), sampled logp ln(1/4). Token 1: peaked student [5, 0, 0, 0]
    # (small H) but the sampled token is an unlikely one (surprisal ≈ 5.02): the two estimates disagree.
    logits = t([[[0, 0, 0, 0], [5, 0, 0, 0]]])
    logps = torch.log_softmax(logits, -1)
    tokens = torch.tensor([[0, 1]])
    s_tok = logps.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    uniform = torch.full((1, 2, 4), math.log(0.25))
    student, teacher = sides(s_tok.tolist(), [[math.log(0.25)] * 2], s_logits=logits, t_full=uniform)
    p = [math.exp(5) / (math.exp(5) + 3)] + [1 / (math.exp(5) + 3)] * 3
    h_peaked = -sum(q * math.log(q) for q in p)
    entropy, kl = tip(score="entropy_or_divergence").token_statistics(student, teacher)
    assert entropy[0].tolist() == pytest.approx([math.log(4), h_peaked], abs=1e-5)
    assert kl[0].tolist() == pytest.approx([0.0, math.log(4) - h_peaked], abs=1e-5)  # KL(p ‖ uniform) = ln 4 − H(p)
    exact = tip(score="entropy").weights({}, student, teacher)
    sampled = tip(score="entropy", statistics="sampled").weights({}, student, teacher)
    assert torch.equal(exact, t([[1, 0]])) and torch.equal(sampled, t([[0, 1]]))


def _inclusion_probabilities(w: list[float], k: int) -> list[float]:
    """P(token i is among k drawn one at a time without replacement, each draw ∝ w), by enumerating orders."""
    import itertools

    probs = [0.0] * len(w)
    for order in itertools.permutations(range(len(w)), k):
        p, left = 1.0, sum(w)
        for i in order:
            p, left = p * w[i] / left, left - w[i]
        for i in order:
            probs[i] += p
    return probs


def test_tip_sampling_draws_tokens_with_probability_proportional_to_entropy():
    # Surprisal entropies [0.1, 2.0, 0.5, 1.0, 3.0]; keep 2 of 5 by the paper's entropy-based sampling.
    student, _ = sides(S_LOGPS, T_LOGPS, MASK)
    tw = TIP(TIP.Params(score="entropy", fraction=0.4))
    assert tw.params.selection == "sample"  # the paper's rule is the default
    n, counts = 4000, torch.zeros(2, 3)
    for _ in range(n):
        w = tw.weights({}, student, None)
        assert int(w.sum()) == 2 and float(w[1, 2]) == 0.0  # exactly k tokens, never padding
        counts += w
    exact = _inclusion_probabilities([0.1, 2.0, 0.5, 1.0, 3.0], 2)
    freq = [float(counts[0, 0]), float(counts[0, 1]), float(counts[0, 2]), float(counts[1, 0]), float(counts[1, 1])]
    for f, p in zip(freq, exact):
        assert abs(f / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (freq, exact)
    assert tw.draws == n


def test_tip_sampling_is_reproducible_and_resumes_its_sequence():
    student, _ = sides(S_LOGPS, T_LOGPS, MASK)
    a, b = TIP(TIP.Params(fraction=0.4, seed=3)), TIP(TIP.Params(fraction=0.4, seed=3))
    first = [a.weights({}, student, None) for _ in range(5)]
    assert all(torch.equal(x, b.weights({}, student, None)) for x in first)
    assert len({tuple(x.flatten().tolist()) for x in first + [a.weights({}, student, None) for _ in range(20)]}) > 1
    resumed = TIP(TIP.Params(fraction=0.4, seed=3))
    resumed.load_state_dict(b.state_dict())
    assert all(torch.equal(b.weights({}, student, None), resumed.weights({}, student, None)) for _ in range(5))
    other = TIP(TIP.Params(fraction=0.4, seed=4))
    assert any(not torch.equal(x, other.weights({}, student, None)) for x in first)


def test_tip_ranks_by_the_entropies_the_forward_computed_not_the_surprisal():
    student, _ = sides(S_LOGPS, T_LOGPS, MASK)  # surprisal [0.1, 2.0, 0.5, 1.0, 3.0]: would keep p4, p1
    student.entropy = t([[3.0, 0.2, 0.1], [2.0, 0.3, 9.0]])  # exact H: keep p0, p3 (9.0 is padding)
    tw = tip(score="entropy", fraction=0.4)
    assert tw.needs_entropy()
    assert torch.equal(tw.weights({}, student, None), t([[1, 0, 0], [1, 0, 0]]))
    assert torch.equal(tip(score="entropy", fraction=0.4, statistics="sampled").weights({}, student, None),
                       t([[0, 1, 0], [0, 1, 0]]))
    assert not tip(score="divergence").needs_entropy() and not tip(statistics="sampled").needs_entropy()


def test_tip_errors():
    student, _ = sides(S_LOGPS, T_LOGPS, MASK)
    with pytest.raises(OPDError, match="'tip' needs teacher scores"):
        tip(score="divergence").weights({}, student, None)
    for bad in ({"fraction": 0}, {"fraction": 1.5}, {"quadrants": []}, {"quadrants": ["q3"]},
                {"quadrants": ["low_entropy_high_divergence"] * 2}, {"entropy_threshold": -1}):
        with pytest.raises(ValidationError):
            TIP.Params(**bad)


# ---------------------------------------------------------------------------------------------------------------
# correctness_gate
# ---------------------------------------------------------------------------------------------------------------
# rewards [1.0, 0.0, nan, 0.5]; with threshold 1: row 0 correct, rows 1 and 3 incorrect, row 2 unscored.
# Sampled divergence log π_s − log π_t: row 0 [0.5, 0.0], row 1 [1.0, 0.0], row 3 [-2.0, (masked)].
GATE_S = [[-1.0, -2.0], [-0.5, -0.5], [-1.0, -1.0], [-3.0, 0.0]]
GATE_T = [[-1.5, -2.0], [-1.5, -0.5], [-1.0, -1.0], [-1.0, 0.0]]
GATE_MASK = [[1, 1], [1, 1], [1, 1], [1, 0]]
REWARDS = {"rewards": t([1.0, 0.0, NAN, 0.5])}


def gate(**params):
    return CorrectnessGate(CorrectnessGate.Params(**params))


def test_correctness_gate_routes_rows_and_reports_both_groups():
    student, teacher = sides(GATE_S, GATE_T, GATE_MASK)
    g = gate()
    assert torch.equal(g.weights(REWARDS, student, teacher), t([[0, 0], [1, 1], [0, 0], [1, 0]]))
    assert g.last_stats == pytest.approx({
        "correct_fraction": 0.25, "incorrect_fraction": 0.5, "unscored_fraction": 0.25, "kept_fraction": 0.5,
        "divergence_correct": 0.25, "divergence_incorrect": -1 / 3,
    })
    assert torch.equal(gate(apply_to="correct").weights(REWARDS, student, teacher), t([[1, 1], [0, 0], [0, 0], [0, 0]]))
    assert torch.equal(gate(apply_to="all").weights(REWARDS, student, teacher), t([[1, 1], [1, 1], [0, 0], [1, 0]]))
    distill = gate(unscored="distill").weights(REWARDS, student, teacher)
    assert torch.equal(distill, t([[0, 0], [1, 1], [1, 1], [1, 0]]))
    assert torch.equal(gate(threshold=0.5).weights(REWARDS, student, teacher), t([[0, 0], [1, 1], [0, 0], [0, 0]]))


def test_correctness_gate_omits_an_empty_group_and_warns_without_rewards():
    student, teacher = sides(GATE_S, GATE_T, GATE_MASK)
    g = gate(threshold=5.0)
    g.weights(REWARDS, student, teacher)
    assert "divergence_correct" not in g.last_stats and "divergence_incorrect" in g.last_stats
    with pytest.warns(UserWarning, match="no scored rollout"):
        w = gate().weights({"rewards": t([NAN] * 4)}, student, teacher)
    assert not w.any()
    with pytest.raises(OPDError, match="has no 'rewards' entry"):
        gate().weights({}, student, teacher)
    with pytest.raises(OPDError, match="got 3 rewards for 4 completions"):
        gate().weights({"rewards": t([0, 0, 0])}, student, teacher)


# ---------------------------------------------------------------------------------------------------------------
# scope
# ---------------------------------------------------------------------------------------------------------------
W_HI, W_LO = 2 * E / (E + 1), 2 / (E + 1)  # 2·softmax([a, a − 1]): 1.4621, 0.5379


def scope(**params):
    return Scope(Scope.Params(**params))


def test_scope_dual_path_weights_by_hand():
    # Rows 0, 1 incorrect: teacher NLL 1 and 2 -> the lower teacher perplexity weighs more.
    # Rows 2, 3 correct: student NLL 0.5 and 1.5 -> the less confident correct rollout weighs more.
    student, teacher = sides([[-9, -9], [-9, -9], [-0.5, -0.5], [-1.5, -1.5]], [[-1, -1], [-2, -2], [0, 0], [0, 0]])
    inputs = {"rewards": t([0, 0, 1, 1])}
    s = scope(group_by="batch")
    w = s.weights(inputs, student, teacher)
    assert w[:, 0].tolist() == pytest.approx([W_HI, W_LO, W_LO, W_HI], abs=1e-5) and torch.equal(w[:, 0], w[:, 1])
    assert s.last_stats["teacher_ppl_incorrect"] == pytest.approx((E + E**2) / 2)
    assert s.last_stats["student_ppl_correct"] == pytest.approx((E**0.5 + E**1.5) / 2)
    assert s.last_stats["weight_max"] == pytest.approx(W_HI, abs=1e-5)
    # τ = 2 halves the score gaps: 2·softmax([-0.5, -1]).
    w2 = scope(group_by="batch", temperature=2.0).weights(inputs, student, teacher)
    assert w2[:2, 0].tolist() == pytest.approx([2 / (1 + E**-0.5), 2 / (1 + E**0.5)], abs=1e-5)
    # correct: skip leaves correct rollouts out of the divergence.
    w3 = scope(group_by="batch", correct="skip").weights(inputs, student, teacher)
    assert w3[:, 0].tolist() == pytest.approx([W_HI, W_LO, 0, 0], abs=1e-5)


def test_scope_groups_rows_by_prompt_after_shuffling():
    # Prompt A (left-padded; garbage at the padded position) in rows 0 and 2, prompt B in rows 1 and 3.
    inputs = {"rewards": t([0, 0, 0, 0]),
              "prompt_ids": torch.tensor([[0, 5, 6], [7, 8, 9], [99, 5, 6], [7, 8, 9]]),
              "prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1]])}
    student, teacher = sides([[-1, -1]] * 4, [[-1, -1], [-2, -2], [-2, -2], [-3, -3]])
    w = scope().weights(inputs, student, teacher)[:, 0]
    assert w.tolist() == pytest.approx([W_HI, W_HI, W_LO, W_LO], abs=1e-5)  # A: NLL 1 vs 2, B: NLL 2 vs 3
    whole = scope(group_by="batch").weights(inputs, student, teacher)[:, 0]
    z = E**-1 + 2 * E**-2 + E**-3
    assert whole.tolist() == pytest.approx([4 * E**-1 / z, 4 * E**-2 / z, 4 * E**-2 / z, 4 * E**-3 / z], abs=1e-5)


def test_scope_single_rows_unscored_rows_and_errors():
    student, teacher = sides([[-1, -1]] * 3, [[-1, -1], [-2, -2], [-3, -3]], mask=[[1, 1], [1, 0], [1, 1]])
    inputs = {"rewards": t([0, 1, NAN])}
    assert scope(group_by="batch").weights(inputs, student, teacher).tolist() == [[1, 1], [1, 0], [0, 0]]
    distill = scope(group_by="batch", unscored="distill").weights(inputs, student, teacher)
    assert distill.tolist() == [[1, 1], [1, 0], [1, 1]]
    with pytest.raises(OPDError, match="group_by=prompt needs inputs\\['prompt_ids'\\]"):
        scope().weights(inputs, student, teacher)
    with pytest.raises(OPDError, match="'scope' needs teacher scores"):
        scope(group_by="batch").weights(inputs, student, None)
    with pytest.raises(ValidationError):
        Scope.Params(temperature=0)


# ---------------------------------------------------------------------------------------------------------------
# quality_gate
# ---------------------------------------------------------------------------------------------------------------
def quality(**params):
    return QualityGate(QualityGate.Params(**params))


def test_quality_gate_on_reward():
    student, teacher = sides([[-1, -1]] * 3, [[-1, -1]] * 3)
    inputs = {"rewards": t([1.0, 0.5, NAN])}
    assert quality().weights(inputs, student, teacher).tolist() == [[1, 1], [0, 0], [0, 0]]
    q = quality(threshold=0.5)
    assert q.weights(inputs, student, teacher).tolist() == [[1, 1], [1, 1], [0, 0]]
    assert q.last_stats == pytest.approx({"kept_fraction": 2 / 3, "quality_mean": 0.75})
    assert quality(unscored="distill").weights(inputs, student, teacher).tolist() == [[1, 1], [0, 0], [1, 1]]


def test_quality_gate_on_teacher_logp_needs_no_reward():
    # Mean teacher log-prob of the valid tokens: -0.3, -1.5, -1.0 (the -9 is padding).
    student, teacher = sides([[-1, -1]] * 3, [[-0.2, -0.4], [-2.0, -1.0], [-1.0, -9.0]], mask=[[1, 1], [1, 1], [1, 0]])
    q = quality(metric="teacher_logp", threshold=-1.0)
    assert q.weights({}, student, teacher).tolist() == [[1, 1], [0, 0], [1, 0]]
    assert q.last_stats == pytest.approx({"kept_fraction": 2 / 3, "quality_mean": -2.8 / 3})
    with pytest.raises(OPDError, match="'quality_gate' needs teacher scores"):
        q.weights({}, student, None)
    with pytest.raises(ValidationError, match="unreachable with metric=teacher_logp"):
        QualityGate.Params(metric="teacher_logp")


# ---------------------------------------------------------------------------------------------------------------
# Recipes: a reward-reading weighting without a task is refused before anything loads
# ---------------------------------------------------------------------------------------------------------------
def _no_task_recipe(tmp_path, model_dir, weightings):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) for i in range(4)))
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"dataset": {"path": str(rows)}},
        "teacher": {"name": "self_context"},
        "divergence": {"name": "reverse_kl"},
        "objective": {"policy_gradient": 0.0, "divergence": 1.0},
        "token_weighting": weightings,
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_quality_gate_on_teacher_logp_is_accepted_without_a_task(tmp_path, opd_tiny_model_dir):
    recipe, _ = load_recipe(_no_task_recipe(tmp_path, opd_tiny_model_dir, [
        {"name": "quality_gate", "params": {"metric": "teacher_logp", "threshold": -1.0}}]))
    assert recipe.token_weighting[0].name == "quality_gate"


@pytest.mark.parametrize("name", ["correctness_gate", "scope", "quality_gate"])
def test_reward_gated_weighting_needs_a_task(name, tmp_path, opd_tiny_model_dir):
    path = _no_task_recipe(tmp_path, opd_tiny_model_dir, [{"name": "tip"}, {"name": name}])
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    msg = str(exc.value)
    assert f"token_weighting[1]: {name} gates on task rewards, but the recipe has no reward: add data.task" in msg
    assert "token_weighting[0]" not in msg  # tip reads no reward


def test_scope_prepared_on_the_generation_batch_survives_the_shuffle():
    """Issue 12.4: with the batch shuffled into micro-batches of 2, most rows have no sibling of their group in
    their micro-batch; weights computed there give those rows weight 1. prepare() computes them on whole groups of
    the generation batch, and every micro-batch then gets the whole-group weight of its rows."""
    from opd_plugins.teachers.base import TeacherScores
    from opd_plugins.token_weighting.base import GenerationBatch

    g = torch.Generator().manual_seed(0)
    B, T, G = 8, 3, 4
    rewards = torch.tensor([0.0, 0, 1, 0, 0, 1, 0, 0])  # two groups of 4, mixed correctness
    t_lp, s_lp = -torch.rand(B, T, generator=g) * 3, -torch.rand(B, T, generator=g) * 3
    mask = torch.ones(B, T)
    teacher = TeacherScores(token_logps=t_lp, mask=mask.clone())
    batch = GenerationBatch(rewards=rewards, global_rewards=rewards, num_generations=G, local=slice(0, B), mask=mask,
                            teacher=teacher, _student_logps=lambda: s_lp)
    sc = scope(threshold=1.0)
    prepared = sc.prepare(batch)["row_weight"]
    # Naive reference: per group, per path, w = n·softmax(score/τ) with score −NLL_T (incorrect) or +NLL_S (correct).
    want = torch.zeros(B)
    for grp in range(2):
        rows = list(range(grp * G, grp * G + G))
        for correct in (False, True):
            sel = [i for i in rows if (rewards[i] >= 1.0) == correct]
            score = torch.tensor([float(-s_lp[i].mean()) if correct else float(t_lp[i].mean()) for i in sel])
            want[sel] = len(sel) * torch.softmax(score, 0)
    assert prepared.tolist() == pytest.approx(want.tolist(), abs=1e-5)
    perm = torch.randperm(B, generator=g)
    for mb in perm.split(2):  # TRL's shuffle and split
        student, te = StudentOutputs(token_logps=s_lp[mb], mask=mask[mb]), TeacherScores(t_lp[mb], mask[mb].clone())
        ids = torch.arange(B)[mb].unsqueeze(1).repeat(1, 2)  # distinct prompts: no sibling found in the micro-batch
        inputs = {"rewards": rewards[mb], "prompt_ids": ids}
        got = sc.weights({**inputs, "prepared": {"row_weight": prepared[mb]}}, student, te)[:, 0]
        assert got.tolist() == pytest.approx(want[mb].tolist(), abs=1e-5)
        fallback = sc.weights(inputs, student, te)[:, 0]  # the first wave's computation: singletons get 1
        assert fallback.tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
