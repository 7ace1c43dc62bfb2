"""``uni_opd_margin``: Uni-OPD's outcome-guided margin calibration of the teacher's token advantages."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from opd_plugins.advantages import _common
from opd_plugins.advantages.base import AdvantageEstimator, AdvantageInputs, grouped
from opd_plugins.components import ComponentParams


class UniOPDMarginAdvantage(AdvantageEstimator):
    """Uni-OPD: teacher token advantages, shifted so that correct completions out-rank incorrect ones.

    Reading of the paper and its code (``margin_calibration/margin_shift.py``, ``online_balance/``): teacher
    token supervision is reliable when its *trajectory-level aggregate* is order-consistent with the outcome
    reward. The token advantage is the divergence's per-token reward ``d_{i,t}`` (``log π_T − log π_θ`` at the
    sampled token for ``reverse_kl``); its aggregate is the mean over the completion's tokens,
    ``s_i = mean_t d_{i,t}``. Completion ``i`` is correct when ``r_i ≥ correct_threshold``. Within each unit
    (``scope: group`` — a prompt's completions — or ``batch``), with correct set C and incorrect set I, both
    non-empty:

    * ``mode: mean``: ``gap = mean_{C} s − mean_{I} s``; ``mode: minmax``: ``gap = min_{C} s − max_{I} s``
      (every correct completion above every incorrect one).
    * If ``gap < delta``: ``shift = delta − gap`` is added to every token of C (``direction: correct_up``),
      subtracted from every token of I (``incorrect_down``), or split half/half (``both``); afterwards the gap
      is exactly ``delta``. ``A_{i,t} = d_{i,t} + shift_i`` on the completion's tokens.

    Online correctness-aware balancing (``balance``, before the margin): within each group (or the batch) keep
    ``correct : incorrect = balance_ratio : 1`` by dropping randomly chosen completions of the larger side —
    Uni-OPD removes them from the batch; ours keeps them with advantage 0 — and leave them out of the margin
    statistics. The choice is seeded by ``seed`` and the step, so every rank drops the same rows.
    Defaults are the released Uni-OPD scripts (group scope, mean mode, delta 0.4, direction both, per-group
    balancing at 1:1). Unscored completions (NaN reward) are neither correct nor incorrect: never shifted or
    dropped, they keep their teacher advantage. The aggregates of rows on other ranks are all-gathered.
    Paper: Hou et al., "Uni-OPD: Unifying On-Policy Distillation with a Dual-Perspective Recipe",
    https://arxiv.org/abs/2605.03677 (code: https://github.com/WenjinHou/Uni-OPD)
    """

    name: ClassVar[str] = "uni_opd_margin"
    needs_token_reward: ClassVar[bool] = True

    class Params(ComponentParams):
        scope: Literal["group", "batch"] = Field(
            "group", description="Compare correct and incorrect completions within each prompt's group, or the batch.")
        mode: Literal["mean", "minmax"] = Field(
            "mean", description="Compare the means, or the worst correct with the best incorrect.")
        delta: float = Field(0.4, description="Margin the correct side's aggregated guidance must keep over the other's.")
        direction: Literal["correct_up", "incorrect_down", "both"] = Field(
            "both", description="Which side the shift moves (both: half each).")
        correct_threshold: float = Field(0.5, description="A completion is correct when its reward is at least this.")
        balance: Literal["none", "group", "batch"] = Field(
            "group", description="Balance correct and incorrect completions per group, per batch, or not at all.")
        balance_ratio: float = Field(1.0, gt=0, description="Target correct : incorrect ratio when balancing.")
        seed: int = Field(0, description="Seed of the balancing choice (combined with the step).")

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        if "group" in (self.params.scope, self.params.balance):
            self.min_generations = 2

    def compute(self, inputs: AdvantageInputs) -> torch.Tensor:
        token_reward = _common.require(inputs.token_reward, "token_reward", self).float()
        mask = torch.ones_like(token_reward) if inputs.mask is None else inputs.mask.to(token_reward)
        rewards = inputs.rewards.float().cpu()
        correct = rewards >= self.params.correct_threshold
        incorrect = rewards < self.params.correct_threshold  # NaN is neither
        kept = self.balanced(correct, incorrect, inputs)
        s = _common.gather_rows(_common.row_mean(token_reward, mask), inputs).cpu()
        known = kept & ~torch.isnan(s)
        shift = self.shifts(s, correct & known, incorrect & known, inputs.num_generations)
        local = inputs.local_slice
        adv = (token_reward + shift[local].to(token_reward).unsqueeze(1)) * mask
        return adv * kept[local].to(adv).unsqueeze(1)

    def units(self, n: int, num_generations: int) -> torch.Tensor:
        """``(units, size)`` row indices: the groups, or the whole batch as one unit."""
        idx = torch.arange(n)
        return grouped(idx, num_generations) if self.params.scope == "group" else idx.view(1, -1)

    def shifts(self, s: torch.Tensor, c: torch.Tensor, i: torch.Tensor, num_generations: int) -> torch.Tensor:
        """Per-row shift ``(N,)`` restoring ``gap ≥ delta`` in every unit."""
        p = self.params
        out = torch.zeros_like(s)
        for rows in self.units(s.shape[0], num_generations):
            cs, is_ = s[rows][c[rows]], s[rows][i[rows]]
            if cs.numel() == 0 or is_.numel() == 0:
                continue
            c_stat, i_stat = (cs.mean(), is_.mean()) if p.mode == "mean" else (cs.min(), is_.max())
            gap = float(c_stat - i_stat)
            if gap >= p.delta:
                continue
            shift = p.delta - gap
            up = {"correct_up": shift, "incorrect_down": 0.0, "both": shift / 2}[p.direction]
            out[rows[c[rows]]] += up
            out[rows[i[rows]]] -= shift - up
        return out

    def balanced(self, correct: torch.Tensor, incorrect: torch.Tensor, inputs: AdvantageInputs) -> torch.Tensor:
        """``(N,)`` rows kept by correctness-aware balancing (all when ``balance: none``)."""
        kept = torch.ones_like(correct)
        if self.params.balance == "none":
            return kept
        gen = torch.Generator().manual_seed(self.params.seed * 1_000_003 + int(inputs.step))
        n = correct.shape[0]
        idx = torch.arange(n)
        units = grouped(idx, inputs.num_generations) if self.params.balance == "group" else idx.view(1, -1)
        ratio = self.params.balance_ratio
        for rows in units:
            cr, ir = rows[correct[rows]], rows[incorrect[rows]]
            if cr.numel() == 0 or ir.numel() == 0:
                continue
            want_c, want_i = int(ir.numel() * ratio), int(cr.numel() / ratio)
            if cr.numel() > want_c >= 1:
                drop = cr[torch.randperm(cr.numel(), generator=gen)[: cr.numel() - want_c]]
            elif ir.numel() > want_i >= 1:
                drop = ir[torch.randperm(ir.numel(), generator=gen)[: ir.numel() - want_i]]
            else:
                continue
            kept[drop] = False
        return kept
