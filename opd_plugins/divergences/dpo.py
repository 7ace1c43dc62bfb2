"""``dpo``: a sequence-level preference objective (DPO) for text-only teachers (SODA)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from opd_plugins.components import ComponentParams
from opd_plugins.divergences.base import Divergence, DivergenceTerms, StudentOutputs
from opd_plugins.errors import OPDError
from opd_plugins.teachers.base import Capability, TeacherScores

# The pairwise loss types of TRL 1.16's DPOTrainer (each is a branch of DPOTrainer._compute_loss; a unit test checks
# they still are). Left out: 'sft' (no preference term on its own).
LossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm"]


class DPO(Divergence):
    """Direct Preference Optimization on (chosen, rejected) pairs, through TRL's ``DPOTrainer``.

    A preference objective, not a token-level divergence: it compares whole responses. With a text-only teacher
    (``blackbox_text``) it is SODA: for each prompt the teacher's response is *chosen* and a one-time snapshot of the
    initial student's own response is *rejected*; the reference policy is the initial student (the LoRA adapter
    disabled, or a frozen copy). ``loss = −log σ(β·[(log π/π_ref)(chosen) − (log π/π_ref)(rejected)])`` for the
    default ``sigmoid`` loss; the other ``loss_type`` values are TRL's variants (IPO, robust, EXO, NCA, BCO, SPPO,
    AOT, APO, DiscoPOP). Recipes that choose it are trained by ``opd_plugins.soda`` instead of the OPD trainer.
    Papers: Rafailov et al., "Direct Preference Optimization", https://arxiv.org/abs/2305.18290; SODA,
    "Semi On-Policy Black-Box Distillation" (docs/soda.md).
    """

    name: ClassVar[str] = "dpo"
    preference: ClassVar[bool] = True
    """Trains on response pairs, not per-token teacher scores: the recipe is run by ``opd_plugins.soda``."""

    class Params(ComponentParams):
        beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference (initial) policy.")
        loss_type: LossType = Field("sigmoid", description="TRL DPOConfig loss type ('sigmoid' is the DPO paper's).")
        label_smoothing: float = Field(0.0, ge=0, lt=1, description="Robust DPO's flip probability (< 0.5) or EXO's "
                                       "epsilon (> 0); 0 for plain DPO.")

        @model_validator(mode="after")
        def _check(self) -> "DPO.Params":
            if self.loss_type == "robust" and self.label_smoothing >= 0.5:
                raise ValueError("loss_type: robust needs label_smoothing in [0, 0.5) (the probability a pair's "
                                 "preference is flipped)")
            if self.loss_type == "exo_pair" and self.label_smoothing == 0:
                raise ValueError("loss_type: exo_pair needs label_smoothing > 0 (the EXO paper recommends 1e-3)")
            return self

    def requires(self) -> Capability:
        return "text"

    def config_kwargs(self) -> dict[str, Any]:
        """The TRL ``DPOConfig`` arguments this objective sets."""
        p = self.params
        return {"beta": p.beta, "loss_type": [p.loss_type], "label_smoothing": p.label_smoothing}

    def per_token(self, student: StudentOutputs, teacher: TeacherScores) -> DivergenceTerms:
        raise OPDError(
            "divergence dpo is a preference objective over whole responses (chosen vs rejected), not a token-level "
            "divergence: it has no per-token loss or reward. Recipes with it are trained by opd_plugins.soda "
            "(opd-plugins train dispatches there); for per-token distillation choose e.g. reverse_kl."
        )

    def reward(self, student: StudentOutputs, teacher: TeacherScores):
        return self.per_token(student, teacher)
