"""SnapKV [lit] (Li et al., 2024), LongBench setting: the last w = 32 prompt queries vote for prefix tokens.

Per KV head g: s_g[j] = maxpool_7( mean_{h∈g} mean_i A_h[i, j] )[j] for j < n − w (the query heads of a GQA
group are averaged *before* pooling; as in the official code the pooling runs over the prefix columns only,
'same' padding); keep the top B − w prefix tokens plus the whole window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture import Prefill
from .base import Policy, check_odd_kernel, snap_scores


@dataclass
class SnapKV(Policy):
    kernel: int = 7
    name = "snapkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_odd_kernel(self.name, self.kernel)

    def layer_scores(self, pf: Prefill, layer: int) -> torch.Tensor:
        """(G, n − w) SnapKV scores of one layer (also the base score of PyramidKV, AdaKV, CriticalKV)."""
        return snap_scores(self.attn(pf, layer), pf.shape.kv_heads, self.window, self.kernel)
