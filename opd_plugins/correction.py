"""Rollout-mismatch correction: one shared primitive for every off-policy rollout.

A rollout backend that samples from something other than the training policy π (an FP8 or otherwise quantised
engine, a stale asynchronous worker, a prompt edited by a hint sampler) returns the *behaviour* log-probs
log μ(y_t) of the tokens it sampled. The trainer scores the same tokens under π and calls
:func:`importance_weights`, which turns the per-token ratio ρ_t = π(y_t) / μ(y_t) into detached per-token
weights that multiply the policy-gradient loss. The weights are 1 wherever μ = π, so correction is free when
nothing is mismatched.

Modes (``CorrectionSpec.mode``), with ρ_t the token ratio and ρ(y) = ∏_t ρ_t = exp(Σ_t log ρ_t) the sequence
ratio (a product over the sequence's valid tokens):

=================  ===========================================================  ==================================
mode               weight of token t                                            source
=================  ===========================================================  ==================================
``none``           1 (metrics only)
``token_tis``      clamp(ρ_t, clip_min, clip_max)                               truncated IS, Yao et al. 2025
``token_mis``      ρ_t if clip_min ≤ ρ_t ≤ clip_max, else 0                     masked IS (TRL ``token_mask``)
``sequence_tis``   clamp(ρ(y), clip_min, clip_max), on every token of y         TRL ``sequence_truncate``
``sequence_mis``   ρ(y) if clip_min ≤ ρ(y) ≤ clip_max, else 0                   Seq-MIS, Liu & Li et al. 2025
``icepop``         ρ_t if clip_min ≤ ρ_t ≤ clip_max, else 0 (clip_min required)  IcePop, Ling Team 2025
=================  ===========================================================  ==================================

``clip_min`` is optional (``None`` = no lower bound) except for ``icepop``, whose band is two-sided by
definition. IcePop's masking function is M(k) = k inside [α, β] and 0 outside, so the weight inside the band
is the ratio itself, not 1: ``icepop`` is two-sided token MIS with the paper's band as its preset. The same
semantics as TRL's ``vllm_importance_sampling_mode`` (``token_truncate`` = ``token_tis``, ``token_mask`` =
``token_mis``, ``sequence_truncate`` = ``sequence_tis``, ``sequence_mask`` = ``sequence_mis``), so a recipe
moving from TRL keeps its numbers.

Sources:

* TIS: F. Yao, L. Liu, D. Zhang, C. Dong, J. Shang, J. Gao, "Your Efficient RL Framework Secretly Brings You
  Off-Policy RL Training" (2025), https://fengyao.notion.site/off-policy-rl. C = 2 is the value verl's FP8
  guide (docs/low_precision/fp8.md) and NeMo-RL (PR #1212) report as restoring BF16 accuracy under FP8 rollout.
* MIS: J. Liu, Y. Li, Y. Fu, J. Wang, Q. Liu, Y. Shen, "When Speed Kills Stability: Demystifying RL Collapse
  from the Training-Inference Mismatch" (2025), https://richardli.xyz/rl-collapse; TRL issue #4493 (sequence-level
  MIS as the better default). verl's ``RolloutCorrectionConfig`` presets default the threshold to 2.0.
* IcePop: Ling Team (inclusionAI), "Small Leak Can Sink a Great Ship — Boost RL Training on MoE with IcePop"
  (2025), https://ringtech.notion.site/icepop, used for Ring-1T; band [α, β] = [0.5, 5.0].

Every log-ratio is clamped to [-20, 20] before ``exp`` (as verl does), so a token the behaviour policy found
near-impossible cannot overflow the weights. Behaviour log-probs that are NaN (vLLM reports an unscorable token
as ``None``, which TRL turns into NaN) get ratio 1, as in TRL, and are counted in ``stats["nan_frac"]``.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

Mode = Literal["none", "token_tis", "token_mis", "sequence_tis", "sequence_mis", "icepop"]
MODES: tuple[str, ...] = ("none", "token_tis", "token_mis", "sequence_tis", "sequence_mis", "icepop")
LOG_RATIO_BOUND = 20.0
"""Log-ratios are clamped to ±this before ``exp`` (e^20 ≈ 4.9e8)."""


class CorrectionSpec(BaseModel):
    """Which importance-sampling correction to apply to off-policy rollouts, and its clip range.

    Build one directly (``CorrectionSpec(mode="token_tis", clip_max=2.0)``), from a preset
    (``CorrectionSpec.preset("icepop")``), or from what a recipe's ``correction:`` key holds, which
    :meth:`model_validate` accepts in every form:

    * a preset or mode name: ``tis`` / ``mis`` / ``icepop`` / ``none`` / ``token_mis`` ... (a name that is both,
      ``icepop`` or ``none``, means the preset); ``null`` means ``none``;
    * a preset with overrides: ``{preset: icepop, clip_max: 4.0}``;
    * explicit fields: ``{mode: sequence_tis, clip_max: 5.0, clip_min: 0.2}``.

    Invariant enforced here: a ratio of exactly 1 (behaviour = policy) always gets weight 1, so
    ``clip_min ≤ 1 ≤ clip_max``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = Field("none", description="Which correction; 'none' computes the mismatch metrics only.")
    clip_max: float = Field(2.0, gt=0, description="Upper truncation (TIS) or masking (MIS, IcePop) bound.")
    clip_min: float | None = Field(None, ge=0, description="Lower bound; None = none. Required for icepop.")
    divergence: Literal["auto", "none", "prefix", "policy_gradient"] = Field(
        "auto", description="Weight of the divergence term: auto = the policy gradient's weights for a sampled-token "
                            "divergence, none for a full-vocabulary one; prefix = the importance weight of the "
                            "prefix the term depends on, bounded by the mode (docs/correction.md).")

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, value: Any) -> Any:
        if value is None:  # `correction: null` in YAML = no correction
            return {}
        if isinstance(value, str):  # a preset first ("icepop" is both), else a mode with default bounds
            if value in MODES and value not in _PRESET_FIELDS:
                return {"mode": value}
            return dict(_preset_fields(value))
        if isinstance(value, dict) and "preset" in value:
            rest = {k: v for k, v in value.items() if k != "preset"}
            return {**_preset_fields(value["preset"]), **rest}
        return value

    @model_validator(mode="after")
    def _check_range(self) -> "CorrectionSpec":
        if self.mode == "icepop" and self.clip_min is None:
            raise ValueError("icepop masks on both sides, so it needs clip_min; the IcePop paper uses "
                             "clip_min=0.5, clip_max=5.0 (preset 'icepop')")
        if self.clip_max < 1.0:
            raise ValueError(f"clip_max ({self.clip_max}) is below 1, which would down-weight or drop on-policy "
                             "tokens (ratio 1); set clip_max >= 1")
        if self.clip_min is not None and self.clip_min > 1.0:
            raise ValueError(f"clip_min ({self.clip_min}) is above 1, which would drop on-policy tokens "
                             "(ratio 1); set clip_min <= 1")
        if self.clip_min is not None and self.clip_min >= self.clip_max:
            raise ValueError(f"clip_min ({self.clip_min}) must be below clip_max ({self.clip_max})")
        return self

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "CorrectionSpec":
        """A named preset (see :data:`PRESETS`), optionally with some fields overridden."""
        return cls.model_validate({"preset": name, **overrides})

    @property
    def level(self) -> Literal["token", "sequence"]:
        """Whether the weight is per token or per sequence (broadcast to its tokens)."""
        return "sequence" if self.mode.startswith("sequence_") else "token"

    @property
    def masks(self) -> bool:
        """True for the masking modes (MIS, IcePop), False for truncation and ``none``."""
        return self.mode in ("token_mis", "sequence_mis", "icepop")


_PRESET_FIELDS: dict[str, dict[str, Any]] = {
    # Truncated IS at the token level with C = 2 (Yao et al. 2025; verl and NeMo-RL FP8 guides).
    "tis": {"mode": "token_tis", "clip_max": 2.0, "clip_min": None},
    # Sequence-level masked IS, one-sided, threshold 2 (Liu & Li et al. 2025; verl preset default; TRL #4493).
    "mis": {"mode": "sequence_mis", "clip_max": 2.0, "clip_min": None},
    # IcePop: two-sided token masking with the band [0.5, 5.0] (Ling Team 2025, Ring-1T).
    "icepop": {"mode": "icepop", "clip_max": 5.0, "clip_min": 0.5},
    # Metrics only.
    "none": {"mode": "none", "clip_max": 2.0, "clip_min": None},
}


def _preset_fields(name: Any) -> dict[str, Any]:
    if not isinstance(name, str) or name not in _PRESET_FIELDS:
        choices = sorted(set(_PRESET_FIELDS) | set(MODES))
        close = difflib.get_close_matches(str(name), choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown correction preset {name!r}.{hint} Presets: {', '.join(sorted(_PRESET_FIELDS))}; "
                         f"modes: {', '.join(MODES)}")
    return _PRESET_FIELDS[name]


PRESETS: dict[str, CorrectionSpec] = {name: CorrectionSpec(**f) for name, f in _PRESET_FIELDS.items()}
"""Named corrections with paper-default values: ``tis``, ``mis``, ``icepop``, ``none``."""


@dataclass(frozen=True)
class CorrectionResult:
    """What :func:`importance_weights` returns.

    ``weights``: (B, T), detached, 0 at masked positions; multiply it into the per-token policy-gradient loss.
    ``stats``: plain floats for logging (this rank only), keys as in :func:`importance_weights`.
    """

    weights: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


def importance_weights(train_logps: torch.Tensor, behaviour_logps: torch.Tensor, mask: torch.Tensor,
                       spec: CorrectionSpec | None = None) -> CorrectionResult:
    """Per-token importance weights correcting samples drawn from μ (behaviour) for training π (policy).

    :param train_logps: (B, T) log π(y_t) of the sampled tokens under the training policy (any grad is dropped).
    :param behaviour_logps: (B, T) log μ(y_t) the rollout backend reported for the same tokens.
    :param mask: (B, T) 1 for tokens in the loss, 0 for padding, tool output and injected hint tokens.
    :param spec: the correction; default ``CorrectionSpec()`` (mode ``none``: weights are the mask).
    :returns: :class:`CorrectionResult` whose stats are, over the valid tokens of this batch:

        * ``mismatch_kl``: mean per-token k3 estimate r − 1 − log r of KL(μ ‖ π), with r = ρ_t. The samples
          come from μ, so E_μ[r] = 1 and k3 is unbiased for KL(μ‖π); it is never negative and has lower
          variance than ``mismatch_kl_k1`` = mean of −log r (also unbiased, can be negative). Both are 0 when
          μ = π.
        * ``logp_diff_abs_mean``, ``logp_diff_abs_max``: |log π − log μ| (TRL's ``sampling_logp_difference``);
          ``logp_diff_abs_p50``, ``logp_diff_abs_p90``, ``logp_diff_abs_p99``: its quantiles (the gap's tail: a
          low-precision engine shifts most tokens a little and a few a lot).
        * ``ratio_min``, ``ratio_p50``, ``ratio_p90``, ``ratio_max``: quantiles of the token ratio ρ_t;
          ``seq_ratio_min`` ... ``seq_ratio_max``: the same for the sequence ratio ρ(y) (sequences with at
          least one valid token). Both are reported in every mode; the mode decides which one is used.
        * ``weight_mean``: mean weight over valid tokens.
        * ``masked_frac``: fraction of valid tokens whose weight was set to 0 by masking (MIS, IcePop; for
          sequence modes, the tokens of masked sequences).
        * ``truncated_frac``: fraction of valid tokens whose weight was clamped (TIS).
        * ``ess``: normalised effective sample size (Σw)² / (n·Σw²) of the token weights, in (0, 1]; 1 when all
          weights are equal.
        * ``nan_frac``: fraction of valid tokens whose behaviour log-prob was NaN (treated as ratio 1).
    """
    spec = spec if spec is not None else CorrectionSpec()
    if train_logps.shape != behaviour_logps.shape or train_logps.shape != mask.shape:
        raise ValueError(f"train_logps {tuple(train_logps.shape)}, behaviour_logps {tuple(behaviour_logps.shape)} "
                         f"and mask {tuple(mask.shape)} must have the same (B, T) shape")
    with torch.no_grad():
        dtype = torch.float64 if train_logps.dtype == torch.float64 else torch.float32
        valid = mask.bool()
        raw = train_logps.detach().to(dtype) - behaviour_logps.detach().to(dtype)
        nan = torch.isnan(raw) & valid
        log_ratio = torch.where(valid & ~nan, raw, torch.zeros_like(raw)).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        token_ratio = torch.exp(log_ratio)
        has_tokens = valid.any(dim=1)
        seq_ratio = torch.exp(log_ratio.sum(dim=1).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))  # (B,) = ∏_t ρ_t

        ratio = seq_ratio.unsqueeze(1).expand_as(token_ratio) if spec.level == "sequence" else token_ratio
        lo = spec.clip_min if spec.clip_min is not None else -math.inf
        hi = spec.clip_max
        if spec.mode == "none":
            weights = torch.ones_like(ratio)
            masked = truncated = torch.zeros_like(valid)
        elif spec.masks:
            masked = (ratio < lo) | (ratio > hi)
            truncated = torch.zeros_like(valid)
            weights = torch.where(masked, torch.zeros_like(ratio), ratio)
        else:
            truncated = (ratio < lo) | (ratio > hi)
            masked = torch.zeros_like(valid)
            weights = ratio.clamp(min=spec.clip_min, max=hi)
        weights = torch.where(valid, weights, torch.zeros_like(weights))
        stats = _stats(log_ratio, token_ratio, seq_ratio[has_tokens], weights, valid, masked, truncated, nan)
    return CorrectionResult(weights=weights.to(train_logps.dtype), stats=stats)


def divergence_weights(train_logps: torch.Tensor, behaviour_logps: torch.Tensor, mask: torch.Tensor,
                       spec: CorrectionSpec, *, per_state: bool,
                       policy_gradient: torch.Tensor | None = None) -> torch.Tensor | None:
    """Per-token weights ``(B, T)`` of the divergence term for samples drawn from μ, or None for weight 1.

    What position t's term depends on decides the weight. A full-vocabulary divergence D_t (``per_state``) is a
    function of the prefix y_<t only, so E_π[Σ_t D_t] = E_μ[Σ_t W_<t · D_t] with the prefix ratio
    W_<t = ∏_{i<t} ρ_i: the token's own ratio ρ_t has E_μ[ρ_t | y_<t] = 1 and only adds variance (truncated, it
    biases the term down). A sampled-token estimator depends on y_t too, so its weight is W_≤t = ∏_{i≤t} ρ_i.
    ``spec.divergence`` chooses:

    * ``auto`` (default): a sampled-token divergence gets the policy gradient's weights (``policy_gradient``,
      the mode's token or sequence weights, the usual truncated-IS approximation); a full-vocabulary divergence
      gets none (weight 1: the states are visited under μ, which biases the gradient by the prefix mismatch, small
      when μ ≈ π as with FP8 rollout).
    * ``none``: weight 1 for every divergence. ``policy_gradient``: the policy gradient's weights for every one.
    * ``prefix``: W_<t (per-state) or W_≤t (sampled-token), clamped to [clip_min, clip_max] under the truncating
      modes and zeroed outside that band under the masking modes; unbiased when the band holds every ratio.

    Mode ``none`` weights nothing (metrics only).
    """
    if spec.mode == "none" or spec.divergence == "none" or (spec.divergence == "auto" and per_state):
        return None
    if spec.divergence in ("auto", "policy_gradient"):
        if policy_gradient is None:
            raise ValueError("divergence weights 'policy_gradient' need the policy gradient's correction weights")
        return policy_gradient
    with torch.no_grad():
        dtype = torch.float64 if train_logps.dtype == torch.float64 else torch.float32
        valid = mask.bool()
        raw = train_logps.detach().to(dtype) - behaviour_logps.detach().to(dtype)
        log_ratio = torch.where(valid & ~torch.isnan(raw), raw, torch.zeros_like(raw))
        log_ratio = log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        cumulative = log_ratio.cumsum(dim=1)  # Σ_{i≤t} log ρ_i
        if per_state:
            cumulative = cumulative - log_ratio  # Σ_{i<t}
        ratio = torch.exp(cumulative.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
        lo = spec.clip_min if spec.clip_min is not None else -math.inf
        if spec.masks:
            weights = torch.where((ratio < lo) | (ratio > spec.clip_max), torch.zeros_like(ratio), ratio)
        else:
            weights = ratio.clamp(min=spec.clip_min, max=spec.clip_max)
        return torch.where(valid, weights, torch.zeros_like(weights)).to(train_logps.dtype)


def weight_advantages(advantages: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Fold correction weights into (B,) or (B, T) advantages, giving (B, T).

    For every TRL loss that is linear in the advantage (``grpo``, ``dapo``, ``bnpo``, ``dr_grpo``, ``luspo``,
    ``cispo``, ``sapo``) this equals multiplying the per-token loss by the weights, because w ≥ 0 commutes with
    the PPO ``min``: w·min(r·A, clip(r)·A) = min(r·wA, clip(r)·wA). The KL-to-reference and entropy terms are not
    weighted, exactly as in TRL's own vLLM correction.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    return advantages * weights.to(advantages.dtype)


def combine_stats(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Merge the ``stats`` of several ranks: min of ``*_min``, max of ``*_max``, mean of the rest.

    Quantiles (``*_p50``, ``*_p90``) are averaged, an approximation; the others are exact for equal-sized ranks.
    """
    if not per_rank:
        return {}
    out = {}
    for key in per_rank[0]:
        values = [s[key] for s in per_rank]
        if key.endswith("_min"):
            out[key] = min(values)
        elif key.endswith("_max"):
            out[key] = max(values)
        else:
            out[key] = sum(values) / len(values)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------


def _quantiles(x: torch.Tensor, prefix: str, points: tuple[int, ...] = (50, 90), ends: bool = True,
               empty: float = 1.0) -> dict[str, float]:
    """``{prefix}_p<k>`` for each percentile in ``points`` (and ``_min``/``_max`` with ``ends``); ``empty`` when
    ``x`` has no element."""
    keys = [f"p{k}" for k in points] + (["min", "max"] if ends else [])
    if x.numel() == 0:
        return {f"{prefix}_{k}": empty for k in keys}
    s, _ = torch.sort(x.flatten().double())
    n = s.numel()

    def q(p: float) -> float:  # linear interpolation, as torch.quantile (which refuses > 2^24 elements)
        pos = p * (n - 1)
        i = int(math.floor(pos))
        j = min(i + 1, n - 1)
        return float(s[i] + (s[j] - s[i]) * (pos - i))

    out = {f"{prefix}_min": float(s[0])} if ends else {}
    out.update({f"{prefix}_p{k}": q(k / 100) for k in points})
    if ends:
        out[f"{prefix}_max"] = float(s[-1])
    return out


def _stats(log_ratio, token_ratio, seq_ratio, weights, valid, masked, truncated, nan) -> dict[str, float]:
    n = int(valid.sum())
    stats: dict[str, float] = {}
    if n == 0:
        stats.update(mismatch_kl=0.0, mismatch_kl_k1=0.0, logp_diff_abs_mean=0.0, logp_diff_abs_max=0.0,
                     weight_mean=1.0, masked_frac=0.0, truncated_frac=0.0, ess=1.0, nan_frac=0.0)
    else:
        lr = log_ratio[valid]
        r = token_ratio[valid]
        w = weights[valid].double()
        w2 = float((w * w).sum())
        stats.update(
            mismatch_kl=float((r - 1 - lr).mean()),
            mismatch_kl_k1=float((-lr).mean()),
            logp_diff_abs_mean=float(lr.abs().mean()),
            logp_diff_abs_max=float(lr.abs().max()),
            weight_mean=float(w.mean()),
            masked_frac=float((masked & valid).sum()) / n,
            truncated_frac=float((truncated & valid).sum()) / n,
            ess=float(w.sum() ** 2 / (n * w2)) if w2 > 0 else 0.0,
            nan_frac=float(nan.sum()) / n,
        )
    stats.update(_quantiles(log_ratio[valid].abs(), "logp_diff_abs", (50, 90, 99), ends=False, empty=0.0))
    stats.update(_quantiles(token_ratio[valid], "ratio"))
    stats.update(_quantiles(seq_ratio, "seq_ratio"))
    return stats


__all__ = ["CorrectionResult", "CorrectionSpec", "LOG_RATIO_BOUND", "MODES", "PRESETS", "combine_stats",
           "divergence_weights", "importance_weights", "weight_advantages"]
