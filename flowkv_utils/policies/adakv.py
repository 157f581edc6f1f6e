"""AdaKV [lit] (Feng et al., 2024), kvpress-style safeguard with exact totals: head-adaptive budgets.

SnapKV scores; per layer every KV head is guaranteed its own top ⌊α·B'⌋ (α = 0.2, B' = B − w), then one top-k
over the flattened G·(n − w) scores of the layer fills the layer total G·B'. Each head keeps its window too.
Head budgets vary; the layer total does not."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture import Prefill
from ..selection import masked, topk_flat, topk_per_row
from .base import check_param
from .snapkv import SnapKV


def adaptive_head_mask(scores: torch.Tensor, layer_total: int, alpha: float) -> torch.Tensor:
    """(G, m) bool: each head's top ⌊α·total/G⌋, then the flattened top-k fills the layer total exactly."""
    G = scores.shape[0]
    floor = int(alpha * (layer_total // G))
    floor = min(floor, scores.shape[-1])
    keep = topk_per_row(scores, floor)  # exactly G·floor entries (known without reading the mask back)
    keep |= topk_flat(masked(scores, keep), layer_total - G * floor)
    return keep


@dataclass
class AdaKV(SnapKV):
    alpha: float = 0.2
    name = "adakv"
    head_adaptive = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_param(self.name, "alpha", self.alpha, isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1,
                    "a number in [0, 1] (share of each head's budget guaranteed to it)")

    def keep_layer(self, pf: Prefill | None, layer: int, scores: torch.Tensor, slots: torch.Tensor):
        return adaptive_head_mask(scores, int(slots.sum()), self.alpha), scores
