"""SnapKV [lit] (Li et al., 2024), LongBench setting: the last w = 32 prompt queries vote for prefix tokens.

Per KV head g: s_g[j] = maxpool_7( mean_{h∈g} mean_i A_h[i, j] )[j] for j < n − w (the query heads of a GQA
group are averaged *before* pooling; as in the official code the pooling runs over the prefix columns only,
'same' padding); keep the top B − w prefix tokens plus the whole window.

`pool="avg", kernel=5` is kvpress's SnapKVPress (`policies.KVPRESS["snapkv"]`); with average pooling the order
of group mean and pooling does not matter."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture import Prefill
from .base import POOLS, Policy, check_choice, check_odd_kernel, snap_scores


@dataclass
class SnapKV(Policy):
    kernel: int = 7
    pool: str = "max"
    name = "snapkv"
    recorded_when_set = ("pool",)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.name, "pool", self.pool, POOLS,
                     "'max' (max-pooling, SnapKV's LongBench setting) or 'avg' (average pooling, as kvpress)")
        check_odd_kernel(self.name, self.kernel, f"{self.pool}-pooling")

    def layer_scores(self, pf: Prefill, layer: int) -> torch.Tensor:
        """(G, n − w) SnapKV scores of one layer (also the base score of PyramidKV, AdaKV, CriticalKV)."""
        return snap_scores(self.attn(pf, layer), pf.shape.kv_heads, self.window, self.kernel, self.pool)
