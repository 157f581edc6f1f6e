"""CriticalKV [lit] (Feng et al., 2025, "Identify critical KV cache"): attention alone misses how much a token
changes the *output*; weight it by the norm of its value projected through W_O.

Base score s_g = SnapKV; projected-value norm pn_g[j] = mean_{h∈g} ‖V_g[j] W_O^h‖₁ (L1 over D). Two stages per
head: top ⌊0.5·(B − w)⌋ by s_g alone, then fill to B − w by (s_g[j] + 1e-4)·pn_g[j] among the rest; plus the
window. CriticalAdaKV: AdaKV's head budgets (on attention), then the two stages inside each head's budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture import Prefill
from ..selection import masked, rank_desc
from .adakv import AdaKV, adaptive_head_mask
from .base import check_param
from .snapkv import SnapKV


def projected_value_l1(pf: Prefill, layer: int, m: int) -> torch.Tensor:
    """pn_g[j] = mean_{h∈g} ‖V_g[j] W_O^h‖₁ for the first m tokens: (G, m), once per prompt (`Prefill.memo`)."""
    return pf.memo(layer, ("projected_value_l1", m), lambda: _projected_value_l1(pf, layer, m))


def _projected_value_l1(pf: Prefill, layer: int, m: int) -> torch.Tensor:
    s = pf.shape
    v = pf.layers[layer].v[:, :m].float()  # (G, m, d)
    wo = pf.w_o(layer).float().view(s.kv_heads, s.group, s.head_dim, s.hidden)  # (G, r, d, D)
    return torch.einsum("gmd,grdD->grmD", v, wo).abs().sum(-1).mean(1)


def critical_scores(pf: Prefill, layer: int, s: torch.Tensor) -> torch.Tensor:
    """Stage-2 score (s_g[j] + 1e-4)·pn_g[j]: attention × projected-value norm."""
    return (s + 1e-4) * projected_value_l1(pf, layer, s.shape[-1])


def two_stage(base: torch.Tensor, critical: torch.Tensor, k: torch.Tensor, first: float = 0.5) -> torch.Tensor:
    """(G, m) mask: per head top ⌊first·k⌋ by base, then the rest of k by critical among the others."""
    k = torch.as_tensor(k, device=base.device).reshape(-1, 1)
    k1 = torch.floor(k * first).long()
    stage1 = rank_desc(base) < k1
    stage2 = rank_desc(masked(critical, stage1)) < (k - k1)
    return stage1 | stage2


def _check_first_stage(p) -> None:
    check_param(p.name, "first_stage", p.first_stage,
                isinstance(p.first_stage, (int, float)) and 0 <= p.first_stage <= 1,
                "a number in [0, 1] (share of the budget chosen by attention alone)")


@dataclass
class CriticalKV(SnapKV):
    first_stage: float = 0.5
    name = "criticalkv"
    output_aware = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_first_stage(self)

    def keep_layer(self, pf: Prefill | None, layer: int, scores: torch.Tensor, slots: torch.Tensor):
        c = critical_scores(pf, layer, scores)
        return two_stage(scores, c, slots, self.first_stage), c


@dataclass
class CriticalAdaKV(AdaKV):
    first_stage: float = 0.5
    name = "criticaladakv"
    output_aware = True
    in_study = False  # a variant: CriticalKV's head-adaptive form

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_first_stage(self)

    def keep_layer(self, pf: Prefill | None, layer: int, scores: torch.Tensor, slots: torch.Tensor):
        heads = adaptive_head_mask(scores, int(slots.sum()), self.alpha).sum(-1)  # AdaKV's head budgets
        c = critical_scores(pf, layer, scores)
        return two_stage(scores, c, heads, self.first_stage), c

    def head_counts(self, scores: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return adaptive_head_mask(scores, int(slots.sum()), self.alpha).sum(-1)
