"""``skew_kl``: skewed KL (DistiLLM), a KL against a student–teacher mixture that stays finite and smooth."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from opd_plugins.divergences.chunked import FullVocabDivergence, FullVocabParams


class SkewKL(FullVocabDivergence):
    """Skewed KL per completion token over the full vocabulary (DistiLLM's SKL / SRKL):

    * ``direction: forward`` (SKL): ``KL(π_t ‖ α·π_t + (1 − α)·π_s)``
    * ``direction: reverse`` (SRKL): ``KL(π_s ‖ α·π_s + (1 − α)·π_t)``

    α = 0 is the plain forward/reverse KL. Mixing α of the first distribution into the second bounds the log-ratio
    by −log α, which keeps the loss and its gradient finite where the student (SKL) or the teacher (SRKL) puts
    almost no mass. Computed in chunks of ``chunk_size`` tokens with a recomputing autograd function.

    Temperature: the student logits arrive already divided by the sampling temperature and the teacher's log-probs
    are scored at the teacher's temperature; nothing is rescaled here.

    Reward at the sampled token (r = π_t(x)/π_s(x)): ``score`` gives the reward whose policy gradient is −∇D in
    expectation (SKL: ``(1 − α)(r/u − 1)``, u = α·r + 1 − α; SRKL: ``log w − (1 − α)(r/w − 1)``, w = α + (1 − α)·r);
    ``estimate`` an unbiased non-negative estimate of −D.

    Paper: Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models",
    https://arxiv.org/abs/2402.03898 (α = 0.1 there).
    """

    name: ClassVar[str] = "skew_kl"

    class Params(FullVocabParams):
        alpha: float = Field(0.1, ge=0.0, lt=1.0, description="Skew α in [0, 1): the share of the first "
                                                              "distribution mixed into the second (0 = plain KL).")
        direction: Literal["forward", "reverse"] = Field(
            "forward", description="forward: KL(teacher ‖ α·teacher + (1 − α)·student) (SKL); "
                                   "reverse: KL(student ‖ α·student + (1 − α)·teacher) (SRKL).")

    def kind_and_coef(self) -> tuple[str, float]:
        return f"skew_{self.params.direction}_kl", self.params.alpha
