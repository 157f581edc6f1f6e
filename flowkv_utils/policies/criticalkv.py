"""CriticalKV [lit] (Feng et al., 2025, "Identify critical KV cache"): attention alone misses how much a token
changes the *output*; weight it by the norm of its value projected through W_O.

Base score s_g = SnapKV; projected-value norm pn_g[j] = mean_{h∈g} ‖V_g[j] W_O^h‖₁ (L1 over D). Two stages per
head: top ⌊0.5·(B − w)⌋ by s_g alone, then fill to B − w by (s_g[j] + 1e-4)·pn_g[j] among the rest; plus the
window. CriticalAdaKV: AdaKV's head budgets (on attention), then the two stages inside each head's budget.

`shares="kept"` counts the window inside the kept count, as kvpress's CriticalKVPress / CriticalAdaKVPress:
stage 1 takes max(0, ⌊0.5·B⌋ − w) prefix tokens (the window fills the first w of its ⌊0.5·B⌋), and in
CriticalAdaKV stage 1 also holds the whole safeguard (kvpress raises the safeguard to the top score before stage
1 ranks). `policies.KVPRESS` has the kvpress settings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture import Prefill
from ..selection import masked, rank_desc
from .adakv import SHARES_HELP, AdaKV
from .base import SHARES, check_choice, check_param
from .snapkv import SnapKV


def projected_value_l1(pf: Prefill, layer: int, m: int) -> torch.Tensor:
    """pn_g[j] = mean_{h∈g} ‖V_g[j] W_O^h‖₁ for the first m tokens: (G, m), once per prompt (`Prefill.memo`)."""
    return pf.memo(layer, ("projected_value_l1", m), lambda: _projected_value_l1(pf, layer, m))


def _projected_value_l1(pf: Prefill, layer: int, m: int) -> torch.Tensor:
    s = pf.shape
    v = pf.layers[layer].v[:, :m].float()  # (G, m, d)
    wo = pf.w_o(layer).float().view(s.kv_heads, s.group, s.head_dim, s.hidden)  # (G, r, d, D)
    return torch.einsum("gmd,grdD->grmD", v, wo).abs().sum(-1).mean(1)


def critical_scores(pf: Prefill, layers, S: torch.Tensor) -> torch.Tensor:
    """Stage-2 score (s_g[j] + 1e-4)·pn_g[j] of `layers`: attention × projected-value norm, S (L', G, m)."""
    m = S.shape[-1]
    return (S + 1e-4) * pf.memo_layers(layers, ("projected_value_l1", m), lambda li: _projected_value_l1(pf, li, m))


def first_stage_counts(k: torch.Tensor, first: float, window: int, shares: str) -> torch.Tensor:
    """(G,) prefix tokens stage 1 takes by attention alone from per-head prefix budgets k (G,):
    ⌊first·k⌋ ("selectable") or max(0, ⌊first·(k + w)⌋ − w) ("kept", kvpress)."""
    k = torch.as_tensor(k).long()
    if shares == "selectable":
        return torch.floor(k.double() * first).long()
    return (torch.floor((k + window).double() * first).long() - window).clamp_min(0)


def two_stage(base: torch.Tensor, critical: torch.Tensor, k: torch.Tensor, k1: torch.Tensor,
              base_ranks: torch.Tensor | None = None) -> torch.Tensor:
    """(…, G, m) mask: per head the top k1[…, g] by base, then the rest of k[…, g] by critical among the others.
    base_ranks: `rank_desc(base)` when already known (memoised by the caller)."""
    k = torch.as_tensor(k).to(base.device, non_blocking=True).unsqueeze(-1)
    k1 = torch.as_tensor(k1).to(base.device, non_blocking=True).unsqueeze(-1)
    stage1 = (rank_desc(base) if base_ranks is None else base_ranks) < k1
    stage2 = rank_desc(masked(critical, stage1)) < (k - k1)
    return stage1 | stage2


def _check(p) -> None:
    check_param(p.name, "first_stage", p.first_stage,
                isinstance(p.first_stage, (int, float)) and 0 <= p.first_stage <= 1,
                "a number in [0, 1] (share of the budget chosen by attention alone)")
    check_choice(p.name, "shares", p.shares, SHARES, SHARES_HELP)


@dataclass
class CriticalKV(SnapKV):
    first_stage: float = 0.5
    shares: str = "selectable"
    name = "criticalkv"
    recorded_when_set = ("pool", "shares")
    output_aware = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self)

    def keep_layers(self, pf: Prefill | None, layers, S: torch.Tensor, slots: torch.Tensor):
        c = critical_scores(pf, layers, S)
        k1 = first_stage_counts(slots, self.first_stage, self.window, self.shares)
        return two_stage(S, c, slots, k1, self.score_ranks(pf, layers, S)), c


@dataclass
class CriticalAdaKV(AdaKV):
    first_stage: float = 0.5
    name = "criticaladakv"
    output_aware = True
    in_study = False  # a variant: CriticalKV's head-adaptive form

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self)

    def keep_layers(self, pf: Prefill | None, layers, S: torch.Tensor, slots: torch.Tensor):
        heads = self.adaptive_counts(pf, layers, S, slots)  # AdaKV's head budgets (L', G)
        k1 = first_stage_counts(heads, self.first_stage, self.window, self.shares)
        if self.shares == "kept":  # kvpress: the safeguard is in stage 1 whatever the head's budget
            floors = self.floors(torch.as_tensor(slots).sum(-1).cpu(), S.shape[-2])
            k1 = torch.maximum(k1, floors.to(k1.device).unsqueeze(-1))
        c = critical_scores(pf, layers, S)
        return two_stage(S, c, heads, k1, self.score_ranks(pf, layers, S)), c

    def adaptive_counts(self, pf: Prefill | None, layers, S: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """(L', G) AdaKV's head budgets, on attention alone."""
        return AdaKV.keep_layers(self, pf, layers, S, slots)[0].sum(-1)

    def head_counts(self, scores: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return self.adaptive_counts(None, [-1], scores.unsqueeze(0), torch.as_tensor(slots).unsqueeze(0))[0]
