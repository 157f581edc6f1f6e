"""PyramidKV [lit] (Cai et al., 2024): SnapKV scores with per-layer budgets that shrink with depth
(a pyramid: lower layers attend broadly, upper layers focus). Schedule in `budgets.pyramid_layer_budgets`."""

from __future__ import annotations

from dataclasses import dataclass

from ..budgets import Budget, fill_to_total, pyramid_layer_budgets
from ..capture import Prefill
from .base import check_param, pad_scores, stack_layers, topk_per_row, with_window
from .snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    beta: int = 20
    name = "pyramidkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_param(self.name, "beta", self.beta, isinstance(self.beta, int) and self.beta >= 1,
                    "a positive int (min budget = ⌊B'/β⌋)")

    def select(self, pf: Prefill, b: Budget):
        L, G, w = b.layers, b.kv_heads, self.window
        n_prefix = pf.n - w
        S = self.selectable(b)  # model-wide selectable entries
        per_head = pyramid_layer_budgets(S // (L * G), L, n_prefix, self.beta, window=w)  # (L,) B'_ℓ
        # [proj] fractional budgets: the few entries S − L·G·⌊S/(L·G)⌋ go to the bottom slots
        slots = fill_to_total(per_head.repeat_interleave(G), S, cap=n_prefix).view(L, G)
        keeps, scores = [], []
        for li in range(L):
            s = self.layer_scores(pf, li)
            keeps.append(with_window(topk_per_row(s, slots[li]), w))
            scores.append(pad_scores(s, w))
        keep, sc = stack_layers(keeps, scores)
        return keep, sc, {"layer_budgets": (slots.sum(1) + G * w).tolist()}
