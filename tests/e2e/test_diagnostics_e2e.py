"""The diag/* metrics in tiny OPD runs: present with finite, in-range values where their data exists, absent where
it does not (a teacher with only sampled-token log-probs), and the gradient cosine every N steps without changing
what is trained."""

import math

import pytest
import torch
from helpers.tiny import even_token_reward, history, trainer

from opd_plugins.diagnostics import GRAD_METRICS, ORDER_METRIC, TOKEN_METRICS
from opd_plugins.errors import OPDError
from opd_plugins.teachers import SelfContextTeacher
from opd_plugins.teachers.base import TeacherScores
from opd_plugins.testing import build_tiny_model
from opd_plugins.trainers import Components

FULL_TEACHER = ("self_context", {"weights": "initial", "top_k": 4})  # full log-probs, entropy and top-4


class TokenLogpsOnly(SelfContextTeacher):
    """The same teacher, reporting only the sampled tokens' log-probs (as a served sampled-only teacher would)."""

    capabilities = frozenset({"sampled"})

    def score(self, batch, want="sampled"):
        scores = super().score(batch, "sampled")
        return TeacherScores(token_logps=scores.token_logps, mask=scores.mask)


def _run(tmp_path, tokenizer, *, teacher=FULL_TEACHER, divergence="forward_kl", max_steps=4, **slots):
    slots = {"pg_weight": 1.0, "div_weight": 1.0, **slots}
    comps = Components.build(teacher=teacher, divergence=divergence, **slots)
    model = build_tiny_model(tokenizer, seed=0)
    tr = trainer(tmp_path, tokenizer, model, components=comps, reward_funcs=[even_token_reward], max_steps=max_steps)
    tr.train()
    return tr, model


def _check_ranges(tr, names):
    for name in names:
        values = history(tr, name)
        assert values and all(math.isfinite(v) for v in values), name
        low, high = {"diag/teacher_entropy": (0.0, math.inf), "diag/grad_cosine": (-1.0, 1.0),
                     "diag/grad_cosine_s": (0.0, math.inf)}.get(name, (0.0, 1.0))
        assert all(low - 1e-6 <= v <= high + 1e-6 for v in values), (name, values)


@pytest.fixture(scope="module")
def plain_and_cosine(tmp_path_factory, opd_tokenizer):
    """The same 4-step hybrid run without and with the gradient cosine every 2 steps."""
    tmp = tmp_path_factory.mktemp("diag")
    return _run(tmp / "off", opd_tokenizer), _run(tmp / "on", opd_tokenizer, diagnostics={"every": 2})


def test_a_full_vocabulary_teacher_logs_every_metric_in_range(plain_and_cosine):
    (tr, _), _ = plain_and_cosine
    assert tr.teacher_at_loss  # scored per micro-batch in the loss: the statistics reuse those scores
    _check_ranges(tr, (*TOKEN_METRICS, ORDER_METRIC))
    assert len(history(tr, "diag/top1_agreement")) == 4
    assert not history(tr, "diag/grad_cosine")  # off by default


def test_grad_cosine_every_n_steps_leaves_loss_and_parameters_identical(plain_and_cosine):
    (off, off_model), (on, on_model) = plain_and_cosine
    _check_ranges(on, GRAD_METRICS)
    steps = [h["step"] for h in on.state.log_history if "diag/grad_cosine" in h]
    assert steps == [1, 3]  # taken at global steps 0 and 2, logged after those optimizer steps
    assert history(on, "loss") == history(off, "loss") and len(history(off, "loss")) == 4
    for p, q in zip(off_model.parameters(), on_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_teacher_with_only_token_logps_logs_no_distribution_metric(tmp_path, opd_tokenizer):
    tr, _ = _run(tmp_path, opd_tokenizer, teacher=TokenLogpsOnly(TokenLogpsOnly.Params(weights="initial")),
                 divergence="reverse_kl", max_steps=2)
    assert history(tr, "opd/divergence")
    for name in TOKEN_METRICS:
        assert not history(tr, name), name
    _check_ranges(tr, (ORDER_METRIC,))  # the order needs only the sampled tokens' log-probs


def test_without_a_divergence_term_the_teacher_statistics_still_log(tmp_path, opd_tokenizer):
    """OPD as an advantage (teacher_dense): the teacher scores feed the advantages only; its entropy and the order
    statistic (from the policy-gradient forward's log-probs) are logged, nothing needing student logits."""
    tr, _ = _run(tmp_path, opd_tokenizer, divergence="reverse_kl", advantage="teacher_dense", div_weight=0.0,
                 max_steps=2)
    assert not history(tr, "opd/divergence")
    _check_ranges(tr, ("diag/teacher_entropy", ORDER_METRIC))
    assert not history(tr, "diag/top1_agreement") and not history(tr, "diag/topk_overlap")


def test_fused_lm_head_skips_the_comparisons_with_student_logits(tmp_path, opd_tokenizer):
    """A fused_lm_head divergence never makes student logits: the teacher's statistics and the order are logged,
    agreement and overlap are not; the gradient cosine works through the fused kernel."""
    tr, _ = _run(tmp_path, opd_tokenizer, divergence=("forward_kl", {"fused_lm_head": True}), max_steps=2,
                 diagnostics={"every": 1})
    _check_ranges(tr, ("diag/teacher_entropy", "diag/teacher_topk_mass", ORDER_METRIC, *GRAD_METRICS))
    assert not history(tr, "diag/top1_agreement") and not history(tr, "diag/topk_overlap")


def test_a_gradient_cosine_without_a_hybrid_is_refused(tmp_path, opd_tokenizer):
    comps = Components.build(teacher=FULL_TEACHER, divergence="forward_kl", pg_weight=0.0, div_weight=1.0,
                             diagnostics={"every": 1})
    with pytest.raises(OPDError, match=r"diagnostics.every=1: .*never both non-zero"):
        trainer(tmp_path, opd_tokenizer, build_tiny_model(opd_tokenizer), components=comps, max_steps=1)
