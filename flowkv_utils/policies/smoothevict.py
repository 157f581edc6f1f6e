"""SmoothEvict — named by the literature this project starts from, defined nowhere. **Project interpretation**
(the cache-merging family, as in CaM and D2O): FlowKV (layer-wise) scores and keep-set, but an evicted entry is
not thrown away. Each evicted (g, j) is merged into the kept entry (g, k) of the same KV head whose key is most
similar (cosine); the kept key is unchanged and its value becomes the attention-mass-weighted average

    v_k ← (a_k v_k + Σ_{j→k} a_j v_j) / (a_k + Σ_{j→k} a_j),   a = window attention mass, group mean.

With nothing evicted it is FullKV exactly (no value changes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budgets import Budget
from ..capture import Prefill
from .base import group_mean, window_mass
from .flowkv import FlowKV


def merge_values(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Merged values (G, n, d): evicted entries folded into their most key-similar kept entry of the head."""
    out = v.clone()
    for g in range(k.shape[0]):
        kept, gone = keep[g].nonzero().squeeze(1), (~keep[g]).nonzero().squeeze(1)
        if gone.numel() == 0 or kept.numel() == 0:
            continue
        kn = torch.nn.functional.normalize(k[g].float(), dim=-1)
        target = kept[(kn[gone] @ kn[kept].T).argmax(dim=1)]  # (#gone,) index of the kept entry absorbing each
        a = mass[g].double().clamp_min(0)
        num = (a[kept, None] * v[g, kept].double()).index_add(0, torch.searchsorted(kept, target),
                                                              a[gone, None] * v[g, gone].double())
        den = a[kept].index_add(0, torch.searchsorted(kept, target), a[gone])
        merged = torch.where(den[:, None] > 0, num / den.clamp_min(1e-300)[:, None], v[g, kept].double())
        out[g, kept] = merged.to(v.dtype)
    return out


@dataclass
class SmoothEvict(FlowKV):
    name = "smoothevict"
    streams = False  # the merge reads every layer's full K/V after selection

    def select(self, pf: Prefill, b: Budget):
        keep, scores, info = super().select(pf, b)
        values = []
        for li in range(b.layers):
            mass = group_mean(window_mass(self.attn(pf, li)), b.kv_heads)  # (G, n)
            c = pf.layers[li]
            values.append(merge_values(c.k, c.v, keep[li].to(c.k.device), mass))
        info["values"] = values
        return keep, scores, info
