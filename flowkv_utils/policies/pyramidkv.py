"""PyramidKV [lit] (Cai et al., 2024): SnapKV scores with per-layer budgets that shrink with depth
(a pyramid: lower layers attend broadly, upper layers focus). Schedule in `budgets.pyramid_layer_budgets`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budgets import Budget, fill_to_total, pyramid_layer_budgets
from ..capture import Prefill
from .base import check_param
from .snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    beta: int = 20
    name = "pyramidkv"
    layer_adaptive = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_param(self.name, "beta", self.beta, isinstance(self.beta, int) and self.beta >= 1,
                    "a positive int (min budget = ⌊B'/β⌋)")

    def allocate(self, pf: Prefill, b: Budget) -> tuple[torch.Tensor, dict]:
        """(L, G) head slots from the pyramid schedule; needs only n, so it streams during prefill."""
        L, G, w = b.layers, b.kv_heads, self.window
        n_prefix = pf.n - w
        S = self.selectable(b)  # model-wide selectable entries
        per_head = pyramid_layer_budgets(S // (L * G), L, n_prefix, self.beta, window=w)  # (L,) B'_ℓ
        # [proj] fractional budgets: the few entries S − L·G·⌊S/(L·G)⌋ go to the bottom slots
        slots = fill_to_total(per_head.repeat_interleave(G), S, cap=n_prefix).view(L, G)
        return slots, {"layer_budgets": (slots.sum(1) + G * w).tolist()}
