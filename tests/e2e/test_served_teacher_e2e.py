"""End to end: a 2-step OPDTrainer run scored by the ``openai_server`` teacher over loopback HTTP.

The teacher spawns ``opd-plugins serve-teacher`` for the student's own checkpoint (``spawn_local_server``), so
teacher == student: the first step's divergence must be ~0 (the served log-probs equal the student's).
"""

from helpers.tiny import history, trainer

from opd_plugins.trainers import Components


def test_two_step_opd_with_a_served_teacher(tmp_path, opd_tokenizer, opd_tiny_model_dir):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(opd_tiny_model_dir)
    comps = Components.build(
        teacher=("openai_server", {"model": str(opd_tiny_model_dir), "spawn_local_server": True, "timeout_s": 60,
                                   "max_retries": 1, "backoff_s": 0.1, "spawn_timeout_s": 300}),
        divergence=("reverse_kl", {"estimator": "sampled"}), pg_weight=0.0, div_weight=1.0,
    )
    tr = trainer(tmp_path / "run", opd_tokenizer, student, components=comps, max_steps=2)
    try:
        tr.train()
    finally:
        comps.teacher.close()
    kl = history(tr, "opd/divergence")
    assert len(kl) == 2 and all(abs(k) < 10 for k in kl)
    assert abs(kl[0]) < 1e-4, kl  # teacher == student before the first update
    assert history(tr, "grad_norm")[0] < 1e-4
    assert history(tr, "opd/weight/policy_gradient")[0] == 0.0
