"""Advantage estimators: hand-computed cases, naive loop references, bad input, recipe validation."""

import math

import pytest
import torch
import yaml

from opd_plugins.advantages import (
    ACEAdvantage,
    AdvantageInputs,
    DrGRPOAdvantage,
    GRPOAdvantage,
    MedianAdvantage,
    PassKAdvantage,
    ReinforcePPAdvantage,
    RLOOAdvantage,
    TeacherDenseAdvantage,
    UniOPDMarginAdvantage,
)
from opd_plugins.manager import get_plugin_manager
from opd_plugins.testing.contracts import AdvantageContract

_REGISTRY = get_plugin_manager().registry

NAN = float("nan")


def inp(rewards, G, local=None, **kw):
    return AdvantageInputs(rewards=torch.tensor(rewards, dtype=torch.float32), num_generations=G, local=local, **kw)


def close(a, b, atol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=atol)


def random_rewards(n, seed, nan_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 3, (n,), generator=g).float() / 2  # ties are common
    r[torch.rand(n, generator=g) < nan_frac] = NAN
    return r


def test_all_new_estimators_are_registered():
    from opd_plugins.manager import get_plugin_manager

    names = set(get_plugin_manager().registry.names("advantage"))
    assert {"dr_grpo", "rloo", "median", "reinforce_pp", "passk", "teacher_dense", "uni_opd_margin", "ace"} <= names


# ---------------------------------------------------------------------------------------------------------------
# dr_grpo
# ---------------------------------------------------------------------------------------------------------------


def test_dr_grpo_hand_computed():
    adv = DrGRPOAdvantage().compute(inp([1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5, 2, 0, NAN, 1], 4))
    assert close(adv, [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 1, -1, 0, 0])
    assert close(DrGRPOAdvantage().compute(inp([3, 1], 2)), [1, -1])  # G = 2


def test_dr_grpo_equals_grpo_without_scaling_and_slices():
    r = random_rewards(24, seed=1)
    full = DrGRPOAdvantage().compute(AdvantageInputs(r, 4))
    assert close(full, GRPOAdvantage(GRPOAdvantage.Params(scale="none")).compute(AdvantageInputs(r, 4)))
    assert close(DrGRPOAdvantage().compute(AdvantageInputs(r, 4, local=slice(6, 18))), full[6:18])


# ---------------------------------------------------------------------------------------------------------------
# rloo
# ---------------------------------------------------------------------------------------------------------------


def naive_rloo(r, G):
    out = []
    for i, ri in enumerate(r.tolist()):
        start = i // G * G
        others = [x for j, x in enumerate(r[start:start + G].tolist()) if start + j != i and not math.isnan(x)]
        out.append(0.0 if math.isnan(ri) or not others else ri - sum(others) / len(others))
    return torch.tensor(out)


def test_rloo_hand_computed():
    # [1,0,0]: baselines 0, 0.5, 0.5. G/(G-1)·(r − mean) gives the same.
    assert close(RLOOAdvantage().compute(inp([1, 0, 0], 3)), [1, -0.5, -0.5])
    assert close(RLOOAdvantage().compute(inp([0.3, 0.7], 2)), [-0.4, 0.4])  # G = 2: r_i − r_j
    assert close(RLOOAdvantage().compute(inp([1, 1, 1, 0, 0, 0], 3)), [0] * 6)  # all-equal groups
    # NaN: left out of the baseline, advantage 0; a lone scored completion has no baseline → 0
    assert close(RLOOAdvantage().compute(inp([1, NAN, 0, NAN, 1, NAN], 3)), [1, 0, -1, 0, 0, 0])


def test_rloo_matches_naive_loop_and_slices():
    r = random_rewards(30, seed=2)
    full = RLOOAdvantage().compute(AdvantageInputs(r, 5))
    assert close(full, naive_rloo(r, 5))
    assert close(RLOOAdvantage().compute(AdvantageInputs(r, 5, local=slice(10, 20))), full[10:20])


def test_rloo_normalize_standardises_scored_rows():
    r = random_rewards(32, seed=3)
    adv = RLOOAdvantage(RLOOAdvantage.Params(normalize=True)).compute(AdvantageInputs(r, 4))
    ref = naive_rloo(r, 4)
    valid = ~torch.isnan(r)
    valid &= torch.tensor([(~torch.isnan(r[i // 4 * 4:i // 4 * 4 + 4])).sum() > 1 for i in range(32)])
    expect = (ref[valid] - ref[valid].mean()) / (ref[valid].std() + 1e-4)
    assert close(adv[valid], expect) and close(adv[~valid], torch.zeros(int((~valid).sum())))


# ---------------------------------------------------------------------------------------------------------------
# median (MC-GRPO)
# ---------------------------------------------------------------------------------------------------------------


def naive_mc_grpo(r, G, eps=1e-3):
    """The authors' computation for odd, fully scored groups: torch.median and the MAD."""
    g = r.view(-1, G)
    med = g.median(dim=1, keepdim=True).values
    mad = (g - med).abs().median(dim=1, keepdim=True).values
    return ((g - med) / (mad + eps)).reshape(-1)


NO_RESCALE = MedianAdvantage.Params(rescale=False)  # the median/MAD formula alone, without the authors' rescale


def test_median_hand_computed():
    adv = MedianAdvantage(NO_RESCALE).compute(inp([0.2, 0.5, 0.9], 3))
    assert close(adv, [-0.3 / 0.301, 0, 0.4 / 0.301])  # med 0.5, MAD median(0.3, 0, 0.4) = 0.3
    assert close(MedianAdvantage(MedianAdvantage.Params(scale="none", rescale=False)).compute(inp([0.2, 0.5, 0.9], 3)), [-0.3, 0, 0.4])
    # 0/1 rewards: MAD 0, so the minority rollout gets ±1/eps; ties at the median all get 0
    assert close(MedianAdvantage(NO_RESCALE).compute(inp([1, 0, 0, 1, 1, 0], 3)), [1000, 0, 0, 0, 0, -1000], atol=1e-2)
    assert close(MedianAdvantage(NO_RESCALE).compute(inp([1, 1, 1, 0, 0, 0], 3)), [0] * 6)  # all-equal groups


def test_median_pivot_gets_zero_and_matches_authors_code():
    r = torch.rand(5 * 7, generator=torch.Generator().manual_seed(4))
    adv = MedianAdvantage(NO_RESCALE).compute(AdvantageInputs(r, 5))
    assert close(adv, naive_mc_grpo(r, 5), atol=1e-4)
    assert ((adv.view(-1, 5) == 0).sum(1) == 1).all()  # exactly one pivot per odd group
    assert close(MedianAdvantage(NO_RESCALE).compute(AdvantageInputs(r, 5, local=slice(10, 25))), adv[10:25])


def test_median_nan_rewards_use_the_scored_ones():
    # scored [1, 2, 3, 10]: lower median 2; |dev| [1, 0, 1, 8] → lower median 1
    adv = MedianAdvantage(NO_RESCALE).compute(inp([NAN, 1, 2, 3, 10], 5))
    assert close(adv, [0, -1 / 1.001, 0, 1 / 1.001, 8 / 1.001])
    assert close(MedianAdvantage(NO_RESCALE).compute(inp([NAN, NAN, NAN], 3)), [0, 0, 0])


def test_median_authors_rescale_and_pivot_match_their_code():
    """The authors' MC-GRPO: non-zero advantages × (G+1)/n_nonzero per group, and the pivot leaves the loss."""
    adv = MedianAdvantage().compute(inp([1, 0, 0, 1, 1, 0], 3))
    assert close(adv, [3000, 0, 0, 0, 0, -3000], atol=3e-2)  # one non-zero of 3 in each group: × 3 (the review's case)
    r = torch.rand(5 * 7, generator=torch.Generator().manual_seed(4))
    g = naive_mc_grpo(r, 5).view(-1, 5)
    nonzero = (g.abs() > 1e-9).sum(1, keepdim=True)
    assert close(MedianAdvantage().compute(AdvantageInputs(r, 5)), (g * 5 / nonzero).reshape(-1), atol=1e-3)
    excluded = MedianAdvantage().excluded(AdvantageInputs(r, 5))
    assert excluded.view(-1, 5).sum(1).tolist() == [1] * 7  # one pivot per group
    assert (MedianAdvantage().compute(AdvantageInputs(r, 5))[excluded] == 0).all()  # the pivot is the median
    ties = MedianAdvantage().excluded(inp([1, 0, 0], 3))  # stable order 0, 0, 1: the middle is the second 0
    assert ties.tolist() == [False, False, True]
    assert MedianAdvantage(MedianAdvantage.Params(drop_pivot=False)).excluded(inp([1, 0, 0], 3)) is None
    assert MedianAdvantage(MedianAdvantage.Params(even_groups="midpoint")).excluded(inp([1, 0, 0, 1], 4)) is None


def test_median_even_group_is_a_clear_error():
    with pytest.raises(ValueError) as exc:
        MedianAdvantage().compute(inp([1, 0, 0, 1], 4))
    msg = str(exc.value)
    assert "num_generations=4" in msg and "odd" in msg and "trainer.args.num_generations" in msg
    assert "even_groups: midpoint" in msg
    assert MedianAdvantage().num_generations_problem(4) == msg
    assert MedianAdvantage().num_generations_problem(3) is None
    assert dense(sparse={"name": "median"}).num_generations_problem(4) == msg  # nested estimators pass it on
    assert ace(base={"name": "median"}).num_generations_problem(5) is None
    assert dense().num_generations_problem(4) is None


def test_median_midpoint_for_even_groups():
    est = MedianAdvantage(MedianAdvantage.Params(even_groups="midpoint"))
    # med (1 + 2) / 2 = 1.5; |dev| [1.5, .5, .5, 8.5] → (0.5 + 1.5) / 2 = 1
    assert close(est.compute(inp([0, 1, 2, 10], 4)), [-1.5 / 1.001, -0.5 / 1.001, 0.5 / 1.001, 8.5 / 1.001])
    assert close(est.compute(inp([0.25, 0.75], 2)), [-0.25 / 0.251, 0.25 / 0.251])  # G = 2


class TestMedianPaperDefaultsContract(AdvantageContract):
    """The full contract on the paper's configuration: odd groups (G + 1 = 5), default params."""

    component = MedianAdvantage
    num_generations = 5
    test_module_import_does_not_import_vllm = None  # run once per module by tests/contract

    def make(self, **overrides):
        return MedianAdvantage(MedianAdvantage.Params(**overrides))


# ---------------------------------------------------------------------------------------------------------------
# reinforce_pp
# ---------------------------------------------------------------------------------------------------------------


SEQUENCE = ReinforcePPAdvantage.Params(whiten="sequence")  # the per-sequence form (the earlier default)


def test_reinforce_pp_hand_computed():
    # x = r: mean 0.5, Bessel variance 1/3
    adv = ReinforcePPAdvantage(SEQUENCE).compute(inp([1, 0, 0, 1], 2))
    assert close(adv, torch.tensor([1, -1, -1, 1]) * 0.5 / math.sqrt(1 / 3 + 1e-8))
    # group baseline: x = [.5, -.5, 0, 0], mean 0, variance 0.5/3
    est = ReinforcePPAdvantage(ReinforcePPAdvantage.Params(baseline="group", whiten="sequence"))
    assert close(est.compute(inp([1, 0, 1, 1], 2)), torch.tensor([0.5, -0.5, 0, 0]) / math.sqrt(0.5 / 3 + 1e-8))
    assert close(ReinforcePPAdvantage(SEQUENCE).compute(inp([2, 2, 2, 2], 2)), [0] * 4)  # all equal
    assert close(ReinforcePPAdvantage(SEQUENCE).compute(inp([1, NAN, 0, NAN], 2)), [1 / math.sqrt(0.5 + 1e-8) * 0.5, 0,
                                                                              -1 / math.sqrt(0.5 + 1e-8) * 0.5, 0])


def test_reinforce_pp_groups_only_for_the_group_baseline():
    assert ReinforcePPAdvantage().min_generations == 1
    assert ReinforcePPAdvantage(ReinforcePPAdvantage.Params(baseline="group", whiten="sequence")).min_generations == 2
    r = random_rewards(12, seed=5)
    full = ReinforcePPAdvantage(SEQUENCE).compute(AdvantageInputs(r, 1))  # G = 1: the batch is the baseline
    ref = (r - torch.nanmean(r)) / torch.sqrt(r[~torch.isnan(r)].var() + 1e-8)
    assert close(full, torch.nan_to_num(ref, nan=0.0))
    assert close(ReinforcePPAdvantage(SEQUENCE).compute(AdvantageInputs(r, 1, local=slice(3, 9))), full[3:9])


def test_reinforce_pp_token_level_returns_with_a_kl_reward_are_whitened_over_tokens():
    """REINFORCE++ proper: r_t = −β(log π − log π_ref) + outcome at the last token, G_t = Σ_{k≥t} r_k, whitened over
    every valid token — checked against a hand loop."""
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    logps = torch.tensor([[-0.5, -1.0, -0.2], [-0.3, -0.7, 0.0]])
    ref = torch.tensor([[-0.6, -0.8, -0.4], [-0.3, -0.9, 0.0]])
    x = AdvantageInputs(rewards=torch.tensor([1.0, 0.0]), num_generations=1, mask=mask, logps=logps, ref_logps=ref)
    est = _REGISTRY.build("advantage", ("reinforce_pp", {"kl_coef": 0.1, "reference": {
        "name": "self_context", "params": {"weights": "initial", "template": "{prompt}"}}}))
    got = est.compute(x)
    returns = []
    for i, n in enumerate((3, 2)):
        r = [-0.1 * (float(logps[i, t]) - float(ref[i, t])) for t in range(n)]
        r[-1] += float(x.rewards[i])
        returns.append([sum(r[t:]) for t in range(n)])
    flat = torch.tensor([g for row in returns for g in row])
    want = (flat - flat.mean()) / torch.sqrt(flat.var() + 1e-8)
    assert close(got[mask.bool()], want, atol=1e-5) and (got[~mask.bool()] == 0).all()
    plain = ReinforcePPAdvantage().compute(x)  # β = 0: each token's return is its completion's outcome
    outcome = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    assert close(plain[mask.bool()], (outcome - outcome.mean()) / torch.sqrt(outcome.var() + 1e-8), atol=1e-5)
    with pytest.raises(ValueError, match="kl_coef > 0 .* needs reference"):
        ReinforcePPAdvantage.Params(kl_coef=0.1)


# ---------------------------------------------------------------------------------------------------------------
# passk
# ---------------------------------------------------------------------------------------------------------------


def test_passk_hand_computed():
    std = torch.tensor([0, 1, 0.5, 0.2]).std()
    assert close(PassKAdvantage().compute(inp([0, 1, 0.5, 0.2], 4)), [0, 0.5 / (std + 1e-6), 0, 0])
    assert close(PassKAdvantage(PassKAdvantage.Params(scale="none")).compute(inp([0, 1, 0.5, 0.2], 4)), [0, 0.5, 0, 0])
    assert close(PassKAdvantage().compute(inp([0, 1, 0.5, 1], 4)), [0] * 4)  # tie at the top
    assert close(PassKAdvantage().compute(inp([0.3, 0.1], 2)), [0.2 / (torch.tensor([0.3, 0.1]).std() + 1e-6), 0])
    assert close(PassKAdvantage().compute(inp([NAN, 1, NAN, NAN, 0, NAN, 1, NAN], 4)),
                 [0, 0, 0, 0, 0, 0, 1 / (math.sqrt(0.5) + 1e-6), 0])  # < 2 scored → 0; NaN skipped


def test_passk_local_slice():
    r = random_rewards(24, seed=6)
    full = PassKAdvantage().compute(AdvantageInputs(r, 4))
    assert close(PassKAdvantage().compute(AdvantageInputs(r, 4, local=slice(8, 20))), full[8:20])
    assert int((full != 0).sum()) <= 6  # at most one credited completion per group


# ---------------------------------------------------------------------------------------------------------------
# teacher_dense
# ---------------------------------------------------------------------------------------------------------------

TOKEN_REWARD = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5], [0.0, -1.0, -3.0], [-2.0, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def build(name, **params):
    """Build an estimator through the registry, as a recipe does (nested estimators included)."""
    return _REGISTRY.build("advantage", (name, params))


def dense(**params):
    return build("teacher_dense", **params)


def ace(**params):
    return build("ace", **params)


def test_teacher_dense_sum_of_dense_and_sparse():
    x = inp([1, 0, 0, 1], 2, mask=MASK, token_reward=TOKEN_REWARD * MASK)
    seq = GRPOAdvantage().compute(x)
    adv = dense(dense_coef=0.5).compute(x)
    assert adv.shape == (4, 3)
    assert close(adv, 0.5 * TOKEN_REWARD * MASK + seq.unsqueeze(1) * MASK)
    assert close(dense(sparse={"name": "rloo"}, sparse_coef=2.0).compute(x),
                 TOKEN_REWARD * MASK + 2 * torch.tensor([1.0, -1, -1, 1]).unsqueeze(1) * MASK)


def test_teacher_dense_schedules():
    est = dense(dense_coef=1.0, dense_coef_end=0.0, dense_schedule="linear_decay")
    assert est.dense_coefficient(3, 10) == pytest.approx(0.7) and est.dense_coefficient(10, 10) == 0.0
    est = dense(dense_coef=5e-3, dense_coef_end=1e-3, dense_schedule="cosine_decay")
    assert est.dense_coefficient(0, 10) == pytest.approx(5e-3)
    assert est.dense_coefficient(5, 10) == pytest.approx(3e-3) and est.dense_coefficient(10, 10) == pytest.approx(1e-3)
    assert dense(dense_coef=0.3).dense_coefficient(7, 10) == 0.3
    assert dense(dense_coef=2.0, dense_schedule="linear_decay").dense_coefficient(0, 0) == 2.0  # no max_steps yet
    x = inp([NAN] * 4, 2, mask=MASK, token_reward=TOKEN_REWARD * MASK, step=3, max_steps=10)
    assert close(dense(dense_schedule="linear_decay").compute(x), 0.7 * TOKEN_REWARD * MASK)


def test_teacher_dense_without_task_reward_is_pure_distillation():
    x = inp([NAN] * 4, 2, mask=MASK, token_reward=TOKEN_REWARD * MASK)
    assert close(dense().compute(x), TOKEN_REWARD * MASK)  # all NaN → sparse part 0
    est = dense(sparse=None)
    assert est.min_generations == 1 and est.sparse is None
    assert close(est.compute(inp([1, 0, 0, 1], 1, mask=MASK, token_reward=TOKEN_REWARD * MASK)), TOKEN_REWARD * MASK)


def test_teacher_dense_reward_guided_and_local_slice():
    x = inp([1, 0, NAN, 1, 0, 0], 2, mask=MASK, token_reward=TOKEN_REWARD * MASK, local=slice(2, 6))
    adv = dense(dense_on="incorrect", sparse=None).compute(x)
    assert close(adv, TOKEN_REWARD * MASK * torch.tensor([1.0, 0, 1, 1]).unsqueeze(1))  # NaN keeps the term
    full = dense().compute(inp([1, 0, NAN, 1, 0, 0], 2, mask=torch.cat([MASK[:2], MASK]),
                               token_reward=torch.cat([TOKEN_REWARD[:2], TOKEN_REWARD]) * torch.cat([MASK[:2], MASK])))
    assert close(dense().compute(x), full[2:])


def test_teacher_dense_adopts_the_nested_estimators_needs():
    assert dense().min_generations == 2 and dense().needs_token_reward and not dense().needs_logps
    assert dense(sparse={"name": "median"}).min_generations == 3
    assert dense(sparse={"name": "ace"}).needs_logps
    assert TeacherDenseAdvantage.needs_logps is False  # the class is untouched


def test_teacher_dense_needs_the_token_reward():
    with pytest.raises(ValueError, match="needs inputs.token_reward.*teacher and a divergence"):
        dense().compute(inp([1, 0], 2))


def test_nested_spec_problems_name_the_key(tmp_path):
    def problems(name, **params):
        return [(p.path, p.message) for p in _REGISTRY.problems("advantage", (name, params), "advantage")]

    [(path, msg)] = problems("teacher_dense", sparse={"name": "grpoo"})
    assert path == "advantage.params.sparse.name" and "unknown advantage 'grpoo'. Did you mean 'grpo'?" in msg
    from opd_plugins.errors import RecipeError

    with pytest.raises(RecipeError, match="params.sparse.name: unknown advantage 'grpoo'"):
        dense(sparse={"name": "grpoo"})
    [(path, msg)] = problems("teacher_dense", sparse={"name": "grpo", "params": {"scale": "groupp"}})
    assert path == "advantage.params.sparse.params.scale" and "'group'" in msg
    [(path, msg)] = problems("ace", base={"name": "grpo", "params": {"sclae": "none"}})
    assert path == "advantage.params.base.params.sclae" and "Did you mean 'scale'" in msg
    assert problems("teacher_dense") == []
    with pytest.raises(ValueError, match="must be built by the registry"):
        TeacherDenseAdvantage()  # direct construction cannot resolve a nested spec


def test_nested_estimator_from_a_recipe_plugin_is_built_with_the_recipes_registry():
    import types

    from opd_plugins import hookimpl
    from opd_plugins.manager import get_plugin_manager

    class Mine(RLOOAdvantage):
        """A recipe-local estimator."""

        name = "my_local_adv"

    module = types.ModuleType("my_recipe_plugin")
    module.opd_register_components = hookimpl(lambda: [Mine])
    pm = get_plugin_manager()
    pm.load_module(module)
    est = pm.registry.build("advantage", ("teacher_dense", {"sparse": {"name": "my_local_adv"}}))
    assert isinstance(est.sparse, Mine)
    assert "my_local_adv" not in _REGISTRY.names("advantage")  # the plugin lives in that manager only


def test_nested_state_round_trips():
    est = dense()
    assert est.state_dict() == {}
    est.load_state_dict({})
    with pytest.raises(ValueError, match="unknown state keys"):
        est.load_state_dict({"x": 1})


# ---------------------------------------------------------------------------------------------------------------
# uni_opd_margin
# ---------------------------------------------------------------------------------------------------------------

# Row means of the teacher reward: s = [-0.5, -0.1, -0.2, 0.0] (all tokens unmasked)
GUIDE = torch.tensor([[-0.5, -0.5], [-0.1, -0.1], [-0.3, -0.1], [0.0, 0.0]])


def margin(**params):
    params.setdefault("balance", "none")
    return UniOPDMarginAdvantage(UniOPDMarginAdvantage.Params(**params))


def test_uni_opd_margin_mean_mode_both_directions():
    # correct {0, 1}: mean −0.3; incorrect {2, 3}: mean −0.1; gap −0.2 < 0.4 → shift 0.6, ±0.3 each side
    x = inp([1, 1, 0, 0], 4, token_reward=GUIDE, mask=torch.ones(4, 2))
    adv = margin().compute(x)
    assert close(adv, GUIDE + torch.tensor([0.3, 0.3, -0.3, -0.3]).unsqueeze(1))
    s = adv.mean(1)
    assert s[:2].mean() - s[2:].mean() == pytest.approx(0.4)  # exactly delta afterwards


def test_uni_opd_margin_minmax_correct_up():
    # min correct −0.5, max incorrect 0.0: gap −0.5 → shift 0.9 on the correct rows only
    x = inp([1, 1, 0, 0], 4, token_reward=GUIDE, mask=torch.ones(4, 2))
    adv = margin(mode="minmax", direction="correct_up").compute(x)
    assert close(adv, GUIDE + torch.tensor([0.9, 0.9, 0, 0]).unsqueeze(1))
    adv = margin(mode="minmax", direction="incorrect_down").compute(x)
    assert close(adv, GUIDE - torch.tensor([0, 0, 0.9, 0.9]).unsqueeze(1))


def test_uni_opd_margin_leaves_consistent_and_one_sided_groups_alone():
    consistent = inp([0, 0, 1, 1], 4, token_reward=GUIDE, mask=torch.ones(4, 2))  # gap 0.2 ≥ delta already
    assert close(margin(delta=0.1).compute(consistent), GUIDE)
    assert close(margin().compute(inp([1, 1, 1, 1], 4, token_reward=GUIDE)), GUIDE)  # all correct (all-equal)
    # NaN rows are neither side and untouched; s1 = −0.1, s2 = −0.2: gap 0.1 → shift 0.3, ±0.15
    assert close(margin().compute(inp([NAN, 1, 0, NAN], 4, token_reward=GUIDE)),
                 GUIDE + torch.tensor([0, 0.15, -0.15, 0]).unsqueeze(1))


def test_uni_opd_margin_group_scope_vs_batch_scope_and_g2():
    tr = torch.tensor([[-1.0], [0.0], [0.0], [-1.0]])
    x = inp([1, 0, 1, 0], 2, token_reward=tr)
    # group 0: correct −1 vs incorrect 0 → shift 1.4 (±0.7); group 1: gap 1 ≥ 0.4 → none
    assert close(margin().compute(x), tr + torch.tensor([[0.7], [-0.7], [0.0], [0.0]]))
    # batch: correct mean −0.5, incorrect mean −0.5 → shift 0.4 (±0.2) on every row
    assert close(margin(scope="batch").compute(x), tr + torch.tensor([[0.2], [-0.2], [0.2], [-0.2]]))


def test_uni_opd_margin_balancing_drops_the_excess_side():
    tr = -torch.rand(8, 3, generator=torch.Generator().manual_seed(0))
    x = inp([1, 1, 1, 0, 1, 0, 0, 0], 4, token_reward=tr, step=5)
    est = margin(balance="group")
    adv = est.compute(x)
    zero = (adv == 0).all(1)
    assert int(zero[:3].sum()) == 2 and not zero[3]  # 3 correct : 1 incorrect → keep 1 : 1
    assert int(zero[5:].sum()) == 2 and not zero[4]
    assert torch.equal(adv, est.compute(x))  # seeded: the same rows on every call (and every rank)
    kept = ~zero
    s = tr.mean(1)
    for rows, c in ((range(0, 4), [1, 1, 1, 0]), (range(4, 8), [1, 0, 0, 0])):  # margin over the kept rows only
        rows = [r for r in rows if kept[r]]
        cor = [r for r in rows if c[r % 4]]
        inc = [r for r in rows if not c[r % 4]]
        gap = float(s[cor].mean() - s[inc].mean())
        expect = max(0.4 - gap, 0) / 2
        assert close(adv[cor], tr[cor] + expect) and close(adv[inc], tr[inc] - expect)
    bal = margin(balance="batch", balance_ratio=0.5).balanced(torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool),
                                                              torch.tensor([0, 0, 0, 0, 1, 1], dtype=torch.bool),
                                                              inp([1] * 6, 2))
    assert int(bal[:4].sum()) == 1 and bal[4:].all()  # correct : incorrect = 0.5 : 1 → 1 : 2


def test_uni_opd_margin_local_slice_of_whole_groups():
    g = torch.Generator().manual_seed(1)
    tr = -torch.rand(12, 3, generator=g)
    r = [1, 0, 1, 0, 1, 1, 0, 0, NAN, 1, 0, 1]
    full = margin(balance="group").compute(inp(r, 4, token_reward=tr))
    part = margin(balance="group").compute(inp(r, 4, token_reward=tr[4:8], local=slice(4, 8)))
    assert close(part, full[4:8])


def _margin_rank(rank, world, path, r, tr):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    B = tr.shape[0] // world
    local = slice(rank * B, (rank + 1) * B)
    x = AdvantageInputs(rewards=r, num_generations=3, local=local, token_reward=tr[local], mask=torch.ones(B, 2))
    adv = margin(balance="group").compute(x)
    torch.save(adv, f"{path}.{rank}")
    dist.destroy_process_group()


def test_uni_opd_margin_gathers_groups_split_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    r = torch.tensor([1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0], dtype=torch.float32)
    tr = -torch.rand(12, 2, generator=torch.Generator().manual_seed(2))
    path = str(tmp_path / "pg")
    # groups of 3 straddle the 6-row rank boundary; fork: the children need not re-import torch
    mp.start_processes(_margin_rank, args=(2, path, r, tr), nprocs=2, start_method="fork")
    sharded = torch.cat([torch.load(f"{path}.{i}") for i in range(2)])
    full = margin(balance="group").compute(AdvantageInputs(rewards=r, num_generations=3, token_reward=tr,
                                                           mask=torch.ones(12, 2)))
    assert close(sharded, full)


# ---------------------------------------------------------------------------------------------------------------
# ace
# ---------------------------------------------------------------------------------------------------------------

LOGPS = torch.tensor([[-0.1, -0.1], [-2.0, -2.0], [-0.2, -0.4], [-1.0, -3.0]])


def test_ace_token_prob_amplifies_only_negative_advantages():
    x = inp([1, 0, 0, 0], 4, logps=LOGPS, mask=torch.ones(4, 2))
    base = GRPOAdvantage().compute(x)
    adv = ace(confidence="token_prob", alpha=0.5).compute(x)
    m = torch.exp(LOGPS.mean(1))
    assert close(adv, torch.where(base < 0, base * (1 + 0.5 * m), base))
    assert adv[0] == base[0] > 0
    assert adv[2] < adv[3] < 0  # same base advantage; the more confident error is pushed harder


def test_ace_groups_of_two():
    x = inp([0, 1], 2, logps=torch.tensor([[-0.1], [-1.0]]))
    base = GRPOAdvantage().compute(x)  # [-0.707.., 0.707..]
    m0 = torch.nn.functional.softplus(torch.tensor(-0.1 + 0.55))  # ℓ_0 − mean(ℓ) = 0.45
    assert close(ace().compute(x), [base[0] * (1 + m0), base[1]])


def test_ace_group_shift_is_softplus_of_the_log_prob_shift():
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    x = inp([1, 0, 0, 0], 4, logps=LOGPS * mask, mask=mask)
    ell = torch.tensor([-0.1, -2.0, -0.2, -2.0])  # masked token means
    m = torch.nn.functional.softplus(ell - ell.mean())
    base = GRPOAdvantage().compute(x)
    assert close(ace().compute(x), torch.where(base < 0, base * (1 + m), base))
    assert close(ace(alpha=0.0).compute(x), base)
    assert close(ace().compute(inp([1, 1, 1, 1], 4, logps=LOGPS)), [0] * 4)  # all equal stays 0
    assert close(ace().compute(inp([1, NAN, 0, 0], 4, logps=LOGPS)),
                 ace().compute(inp([1, NAN, 0, 0], 4, logps=LOGPS))) and \
        ace().compute(inp([1, NAN, 0, 0], 4, logps=LOGPS))[1] == 0


def test_ace_local_slice_and_token_level_base():
    r = [1, 0, 0, 1, 0, 1, 0, 0]
    logps = -torch.rand(8, 3, generator=torch.Generator().manual_seed(3))
    full = ace().compute(inp(r, 4, logps=logps))
    assert close(ace().compute(inp(r, 4, logps=logps[4:], local=slice(4, 8))), full[4:])
    est = ace(base={"name": "teacher_dense", "params": {"sparse": {"name": "rloo"}}})
    assert est.needs_logps and est.needs_token_reward and est.min_generations == 2
    tr = -torch.rand(8, 3)
    adv = est.compute(inp(r, 4, logps=logps, token_reward=tr))
    assert adv.shape == (8, 3) and torch.isfinite(adv).all()
    with pytest.raises(ValueError, match="needs inputs.logps"):
        ace().compute(inp(r, 4))


# ---------------------------------------------------------------------------------------------------------------
# Recipe validation
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def recipe(opd_tiny_model_dir, tmp_path):
    def write(advantage, **args):
        data = {
            "model": {"name_or_path": str(opd_tiny_model_dir)},
            "data": {"task": {"name": "arithmetic", "params": {"op": "add", "digits": 2}}},
            "trainer": {"args": {"per_device_train_batch_size": 4, "num_generations": 4, "max_steps": 2, **args}},
            "teacher": {"name": "self_context"},
            "divergence": {"name": "reverse_kl"},
            "objective": {"policy_gradient": 1.0, "divergence": 0.0},
            "advantage": advantage,
            "output_dir": str(tmp_path / "run"),
        }
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write


def _problems(path):
    from opd_plugins.errors import RecipeError
    from opd_plugins.recipe import load_recipe

    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    return str(exc.value)


def test_recipe_rejects_groups_of_one_for_group_estimators(recipe):
    msg = _problems(recipe({"name": "rloo"}, num_generations=1))
    assert "trainer.args.num_generations: advantage 'rloo' needs groups of at least 2" in msg
    assert "num_generations=1" in msg
    msg = _problems(recipe({"name": "teacher_dense", "params": {"sparse": {"name": "median"}}}, num_generations=2))
    assert "advantage 'teacher_dense' needs groups of at least 3" in msg


def test_recipe_accepts_the_new_estimators(recipe):
    from opd_plugins.recipe import load_recipe

    for spec, G in (({"name": "teacher_dense", "params": {"sparse": None}}, 2), ({"name": "reinforce_pp"}, 2),
                    ({"name": "median"}, 3), ({"name": "uni_opd_margin"}, 4), ({"name": "ace"}, 4)):
        load_recipe(recipe(spec, num_generations=G, per_device_train_batch_size=G * 2))


def test_recipe_reports_a_misspelled_nested_estimator(recipe):
    msg = _problems(recipe({"name": "teacher_dense", "params": {"sparse": {"name": "rlooo"}}}))
    assert "advantage.params.sparse.name: unknown advantage 'rlooo'. Did you mean 'rloo'?" in msg
    msg = _problems(recipe({"name": "ace", "params": {"base": {"name": "grpo", "params": {"scale": 3}}}}))
    assert "advantage.params.base.params.scale" in msg


def test_recipe_token_guided_estimators_need_a_teacher(recipe, tmp_path):
    path = recipe({"name": "uni_opd_margin"})
    data = yaml.safe_load(path.read_text())
    del data["teacher"], data["divergence"]
    path.write_text(yaml.safe_dump(data))
    assert "uni_opd_margin turns teacher guidance into advantages" in _problems(path)


def test_recipe_rejects_an_even_group_for_median_before_any_model_loads(recipe):
    msg = _problems(recipe({"name": "median"}, num_generations=4))
    assert "trainer.args.num_generations: advantage 'median' (MC-GRPO) needs an odd group" in msg
    msg = _problems(recipe({"name": "teacher_dense", "params": {"sparse": {"name": "median"}}}, num_generations=4))
    assert "needs an odd group" in msg
