"""SnapKV [lit] (Li et al., 2024), LongBench setting: the last w = 32 prompt queries vote for prefix tokens.

Per KV head g: s_g[j] = maxpool_7( mean_{h∈g} mean_i A_h[i, j] )[j] for j < n − w (the query heads of a GQA
group are averaged *before* pooling; as in the official code the pooling runs over the prefix columns only,
'same' padding); keep the top B − w prefix tokens plus the whole window."""

from __future__ import annotations

from dataclasses import dataclass

from ..budgets import Budget
from ..capture import Prefill
from .base import Policy, check_param, pad_scores, snap_scores, stack_layers, topk_per_row, with_window


@dataclass
class SnapKV(Policy):
    kernel: int = 7
    name = "snapkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_param(self.name, "kernel", self.kernel, isinstance(self.kernel, int) and self.kernel >= 1
                    and self.kernel % 2 == 1, "an odd positive int (max-pooling width; 1 = no pooling)")

    def layer_scores(self, pf: Prefill, layer: int):
        """(G, n − w) SnapKV scores of one layer (also the base score of PyramidKV, AdaKV, CriticalKV)."""
        return snap_scores(self.attn(pf, layer), pf.shape.kv_heads, self.window, self.kernel)

    def select(self, pf: Prefill, b: Budget):
        slots = b.per_slot() - self.window  # (L, G) selectable tokens per head
        keeps, scores = [], []
        for li in range(b.layers):
            s = self.layer_scores(pf, li)
            keeps.append(with_window(topk_per_row(s, slots[li]), self.window))
            scores.append(pad_scores(s, self.window))
        keep, sc = stack_layers(keeps, scores)
        return keep, sc, {}
