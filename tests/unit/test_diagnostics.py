"""The diag/* maths on hand-built tensors, against counts done by hand (opd_plugins.diagnostics), the gradient
cosine against two naive backward passes, and the recipe's ``diagnostics:`` section."""

import math

import pytest
import torch

from opd_plugins import diagnostics as diag
from opd_plugins.teachers.base import TeacherScores
from opd_plugins.trainers.diagnostics import ROW_KEY, StepDiagnostics

# Student logits, one row, three positions, vocabulary of 4:
#   position 0: [3, 1, 0, 2] -> argmax 0, top-2 {0, 3}
#   position 1: [0, 5, 4, 1] -> argmax 1, top-2 {1, 2}
#   position 2: [1, 0, 0, 9] -> argmax 3, top-2 {3, 0}
STUDENT = torch.tensor([[[3.0, 1, 0, 2], [0, 5, 4, 1], [1, 0, 0, 9]]])
# A top-2 teacher: position 0 [0, 1], position 1 [2, 1], position 2 [1, 2]
TOPK_IDS = torch.tensor([[[0, 1], [2, 1], [1, 2]]])
MASK = torch.tensor([[1.0, 1.0, 0.0]])  # the last position is padding


def test_top1_agreement_counts_matching_argmaxes_on_valid_tokens():
    # top-1 teacher 0, 2, 1 vs student 0, 1, 3: agree at position 0 only; position 2 is masked -> 1 of 2
    stat = diag.top1_agreement(STUDENT, MASK, teacher_topk_ids=TOPK_IDS)
    assert stat.tolist() == [1.0, 2.0] and diag.mean(stat) == 0.5
    assert diag.mean(diag.top1_agreement(STUDENT, torch.ones(1, 3), teacher_topk_ids=TOPK_IDS)) == pytest.approx(1 / 3)


def test_topk_overlap_uses_the_teachers_k():
    # K = 2. position 0: {0,3} ∩ {0,1} = {0} -> 1/2; position 1: {1,2} ∩ {2,1} -> 2/2;
    # position 2: {3,0} ∩ {1,2} -> 0
    # valid positions 0 and 1: (0.5 + 1) / 2 = 0.75; all three: 1.5 / 3 = 0.5
    assert diag.mean(diag.topk_overlap(STUDENT, MASK, teacher_topk_ids=TOPK_IDS, k=8)) == 0.75
    assert diag.mean(diag.topk_overlap(STUDENT, torch.ones(1, 3), teacher_topk_ids=TOPK_IDS)) == 0.5


def test_a_full_vocabulary_teacher_uses_k_from_the_params_capped_at_the_vocabulary():
    # teacher logits at position 0: [0, 2, 1, 3] -> argmax 3 (student: 0, disagree); top-2 {3, 1} ∩ {0, 3} -> 1/2
    teacher = torch.log_softmax(torch.tensor([[[0.0, 2, 1, 3]]]), -1)
    student, mask = STUDENT[:, :1], torch.ones(1, 1)
    assert diag.mean(diag.top1_agreement(student, mask, teacher_logps=teacher)) == 0.0
    assert diag.mean(diag.topk_overlap(student, mask, teacher_logps=teacher, k=2)) == 0.5
    # k = 8 > V = 4: every token is in both top-4s
    assert diag.mean(diag.topk_overlap(student, mask, teacher_logps=teacher, k=8)) == 1.0


def test_teacher_entropy_and_topk_mass():
    # uniform over 4 tokens: ln 4; a point mass (the rest -inf): 0
    logps = torch.tensor([[[math.log(0.25)] * 4, [0.0, -math.inf, -math.inf, -math.inf]]])
    mask = torch.ones(1, 2)
    assert diag.mean(diag.teacher_entropy(mask, logps=logps)) == pytest.approx(math.log(4) / 2)
    assert diag.mean(diag.teacher_entropy(mask, entropy=torch.tensor([[1.0, 3.0]]), logps=logps)) == 2.0
    assert diag.teacher_entropy(mask) is None
    # top-2 probabilities 0.5 + 0.3 and 0.6 + 0.1 -> masses 0.8 and 0.7, the second masked out -> 0.8
    topk = torch.tensor([[[0.5, 0.3], [0.6, 0.1]]]).log()
    assert diag.mean(diag.teacher_topk_mass(torch.tensor([[1.0, 0.0]]), topk_logps=topk)) == pytest.approx(0.8)
    # the teacher's own topk_mass wins
    own = diag.teacher_topk_mass(mask, topk_mass=torch.tensor([[0.9, 0.5]]), topk_logps=topk)
    assert diag.mean(own) == pytest.approx(0.7)


def test_a_teacher_with_only_token_logps_gets_no_distribution_metric():
    teacher = TeacherScores(token_logps=torch.zeros(1, 3), mask=torch.ones(1, 3))
    stats = diag.token_stats(MASK, teacher, STUDENT)
    assert set(stats) == set(diag.TOKEN_METRICS) and all(v is None for v in stats.values())
    topk = TeacherScores(token_logps=torch.zeros(1, 3), mask=torch.ones(1, 3), topk_ids=TOPK_IDS,
                         topk_logps=torch.full((1, 3, 2), math.log(0.25)))
    stats = diag.token_stats(MASK, topk, None)  # no student logits (fused_lm_head): teacher-only metrics
    assert stats["diag/top1_agreement"] is None and stats["diag/topk_overlap"] is None
    assert diag.mean(stats["diag/teacher_topk_mass"]) == 0.5


def test_sequence_guidance_is_the_mean_over_valid_tokens():
    teacher = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    student = torch.tensor([[-1.5, -1.0, -9.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    g = diag.sequence_guidance(teacher, student, mask)
    # row 0: (0.5 + (-1.0)) / 2 = -0.25 (the masked -3 - (-9) = 6 does not count); row 1: no valid token -> NaN
    assert g[0].item() == pytest.approx(-0.25) and math.isnan(g[1].item())


def test_order_discordance_counts_pairs_by_hand():
    # group 0: rewards [1, 0, 1, 0], guidance [0.5, 0.2, 0.1, 0.1]. Pairs with different rewards:
    #   (0,1) r↓ g↓ concordant; (0,3) concordant; (1,2) r 0<1 but g 0.2>0.1 discordant; (2,3) g tie -> 1/2
    #   -> 1.5 discordant of 4
    # group 1: rewards [1, NaN, 0, 0], guidance [0, 1, 2, 3]: the NaN reward leaves; (0,2), (0,3) both discordant
    #   ((2,3) same reward) -> 2 of 2
    # a trailing single completion (no whole group) is ignored
    rewards = torch.tensor([1.0, 0, 1, 0, 1, float("nan"), 0, 0, 1])
    guidance = torch.tensor([0.5, 0.2, 0.1, 0.1, 0, 1, 2, 3, 7])
    counts = diag.order_discordance(guidance, rewards, 4)
    assert counts.tolist() == [3.5, 6.0]
    assert diag.mean(counts) == pytest.approx(3.5 / 6)
    # every completion of a group with the same reward: nothing comparable
    assert diag.mean(diag.order_discordance(guidance[:4], torch.ones(4), 4)) is None


def test_group_guidance_fills_a_micro_batch_at_a_time_and_keeps_pairs_of_this_rank():
    # 8 completions over 2 ranks in groups of 4; this rank holds rows 2..5 (half of each group)
    rewards = torch.tensor([1.0, 0, 1, 0, 0, 1, 0, 1])
    groups = diag.GroupGuidance(rewards, 4, slice(2, 6))
    groups.add(torch.tensor([3, 0]), torch.tensor([0.0, 0.3]))  # local rows 3 and 0 = global 5 and 2
    assert not groups.complete
    groups.add(torch.tensor([1, 2]), torch.tensor([0.1, 0.2]))  # global 3 and 4
    assert groups.complete
    # group 0, rows (2, 3): r 1>0, g 0.3>0.1 concordant; group 1, rows (4, 5): r 0<1, g 0.2>0.0 discordant
    assert groups.counts().tolist() == [1.0, 2.0]


def _naive_gradient(loss_fn, params):
    for p in params:
        p.grad = None
    loss_fn().backward()
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    for p in params:
        p.grad = None
    return flat


def _model():
    torch.manual_seed(0)
    layers = {"a": torch.nn.Linear(3, 2), "b": torch.nn.Linear(2, 1), "only_pg": torch.nn.Linear(3, 1)}
    return torch.nn.ModuleDict(layers)


def _terms(model, x):
    h = torch.tanh(model["a"](x))
    return {"divergence": (model["b"](h) ** 2).mean(), "policy_gradient": (h.sum() - model["only_pg"](x).sum()) ** 2}


def test_grad_cosine_equals_the_cosine_of_two_naive_gradients():
    model, x = _model(), torch.randn(5, 3)
    params = list(model.parameters())
    a = _naive_gradient(lambda: _terms(model, x)["divergence"], params)
    b = _naive_gradient(lambda: _terms(model, x)["policy_gradient"], params)
    expected = float(torch.dot(a, b) / (a.norm() * b.norm()))
    terms = _terms(model, x)
    grads = [torch.autograd.grad(terms[k], params, retain_graph=True, allow_unused=True)
             for k in ("divergence", "policy_gradient")]
    assert grads[0][-1] is None  # only_pg does not reach the divergence: counted as zeros
    assert diag.grad_cosine(*grads) == pytest.approx(expected, abs=1e-6)
    assert math.isnan(diag.grad_cosine([torch.zeros(2)], [torch.ones(2)]))


def test_step_diagnostics_grad_cosine_leaves_the_training_gradient_alone():
    model, x = _model(), torch.randn(5, 3)
    params = list(model.parameters())
    reference = _naive_gradient(lambda: sum(_terms(model, x).values()), params)
    logged = {}
    steps = StepDiagnostics(diag.DiagnosticsSpec(every=2), reduce=lambda t: t, log=logged.__setitem__)
    terms = _terms(model, x)
    assert steps.grad_cosine_due("train", 4, terms) and not steps.grad_cosine_due("train", 3, terms)
    assert not steps.grad_cosine_due("eval", 4, terms)
    steps.grad_cosine(model, terms, 4)
    assert not steps.grad_cosine_due("train", 4, terms)  # once per optimizer step: the first micro-batch only
    assert all(p.grad is None for p in params)
    a = _naive_gradient(lambda: _terms(model, x)["divergence"], params)
    b = _naive_gradient(lambda: _terms(model, x)["policy_gradient"], params)
    assert logged["diag/grad_cosine"] == pytest.approx(float(torch.dot(a, b) / (a.norm() * b.norm())), abs=1e-6)
    assert logged["diag/grad_cosine_s"] >= 0
    sum(terms.values()).backward()  # the graph was retained for the training backward
    assert torch.equal(torch.cat([p.grad.flatten() for p in params]), reference)


def test_step_diagnostics_logs_the_order_once_per_generation_batch():
    logged: dict[str, list[float]] = {}
    steps = StepDiagnostics(diag.DiagnosticsSpec(), reduce=lambda t: t,
                            log=lambda k, v: logged.setdefault(k, []).append(v))
    out = {"completion_ids": torch.zeros(4, 2, dtype=torch.long)}
    steps.start_generation_batch("train", out, torch.tensor([1.0, 0, 0, 1]), slice(0, 4), 2)
    assert out[ROW_KEY].tolist() == [0, 1, 2, 3]
    teacher = TeacherScores(token_logps=torch.tensor([[-1.0, -1.0], [-2.0, -2.0]]), mask=torch.ones(2, 2),
                            entropy=torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    student = torch.zeros(2, 2)
    # micro-batch 1: rows 2 and 0 (guidance -1 and -2); micro-batch 2: rows 1 and 3 (guidance -1 and -2)
    steps.record("train", {ROW_KEY: torch.tensor([2, 0])}, teacher, student, torch.ones(2, 2))
    assert "diag/order_discordant_frac" not in logged and logged["diag/teacher_entropy"] == [2.5]
    steps.record("train", {ROW_KEY: torch.tensor([1, 3])}, teacher, student, torch.ones(2, 2))
    # group (0, 1): g -2 < -1 but r 1 > 0: discordant; group (2, 3): g -1 > -2 but r 0 < 1: discordant
    assert logged["diag/order_discordant_frac"] == [1.0]
    steps.record("train", {ROW_KEY: torch.tensor([0, 1])}, teacher, student, torch.ones(2, 2))  # 2nd iteration
    assert logged["diag/order_discordant_frac"] == [1.0]
    assert "diag/top1_agreement" not in logged and "diag/teacher_topk_mass" not in logged


def test_hybrid_problem():
    from opd_plugins.schedules import Constant, Linear

    one, zero = Constant(Constant.Params(value=1.0)), Constant(Constant.Params(value=0.0))
    assert diag.hybrid_problem(one, one) is None
    assert "never both non-zero" in diag.hybrid_problem(one, zero)
    assert diag.hybrid_problem(Linear(Linear.Params(start=0.0, end=1.0)), one) is None  # non-zero after step 0


def test_recipe_section_validates_and_refuses_a_gradient_cosine_without_a_hybrid(opd_tiny_model_dir, tmp_path):
    from opd_plugins.errors import RecipeError
    from opd_plugins.recipe.loader import validate_recipe
    from opd_plugins.trainers import Components

    base = {"model": {"name_or_path": str(opd_tiny_model_dir)}, "data": {"task": {"name": "arithmetic"}},
            "teacher": {"name": "self_context", "params": {"weights": "initial"}}, "divergence": {"name": "reverse_kl"},
            "trainer": {"args": {"per_device_train_batch_size": 4, "num_generations": 4}}, "output_dir": str(tmp_path)}
    recipe, pm = validate_recipe({**base, "objective": {"divergence": 1.0}, "diagnostics": {"every": 5, "topk": 4}},
                                 "r.yaml")
    components = Components.from_recipe(recipe, pm)
    assert components.diagnostics == diag.DiagnosticsSpec(every=5, topk=4)
    assert Components().diagnostics == diag.DiagnosticsSpec()
    with pytest.raises(RecipeError) as exc:
        validate_recipe({**base, "objective": {"policy_gradient": 0.0, "divergence": 1.0}, "diagnostics": {"every": 5}},
                        "r.yaml")
    assert "diagnostics.every: 5: the gradient cosine" in str(exc.value) and "never both non-zero" in str(exc.value)
    no_div = {k: v for k, v in base.items() if k not in ("teacher", "divergence")}
    with pytest.raises(RecipeError, match="diagnostics.every: 3: .*no divergence"):
        validate_recipe({**no_div, "diagnostics": {"every": 3}}, "r.yaml")
    with pytest.raises(RecipeError, match="diagnostics.tokens"):
        validate_recipe({**base, "diagnostics": {"tokens": 64}}, "r.yaml")
    soda = {**no_div, "trainer": {"name": "soda"}, "teacher": {"name": "blackbox_text", "params": {"source": "column"}},
            "diagnostics": {"topk": 4}}
    with pytest.raises(RecipeError, match="diagnostics: not used by trainer 'soda'"):
        validate_recipe(soda, "r.yaml")


def test_a_resumed_run_may_change_its_diagnostics(opd_tiny_model_dir, tmp_path):
    import yaml

    from opd_plugins.recipe.loader import validate_recipe
    from opd_plugins.runs.rundir import recipe_changes

    base = {"model": {"name_or_path": str(opd_tiny_model_dir)}, "data": {"task": {"name": "arithmetic"}},
            "trainer": {"args": {"per_device_train_batch_size": 4, "num_generations": 4}}, "output_dir": str(tmp_path)}
    old = validate_recipe(base, "r.yaml")[0].model_dump(mode="json")
    del old["diagnostics"]  # a run started before the section existed
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(old))
    assert recipe_changes(tmp_path, validate_recipe({**base, "diagnostics": {"topk": 4}}, "r.yaml")[0]) == []
    changed = validate_recipe({**base, "seed": 3}, "r.yaml")[0]
    assert recipe_changes(tmp_path, changed) == ["seed: 0 -> 3"]  # anything that trains is still a change
