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


def merge_values(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, mass: torch.Tensor,
                 chunk_bytes: int = 1 << 27) -> torch.Tensor:
    """Merged values (G, n, d): evicted entries folded into their most key-similar kept entry of the head.
    All heads at once and nothing read back to the host; the cosine similarities are formed in row chunks of at
    most `chunk_bytes`, so a long prompt never holds an n × n map."""
    G, n, d = v.shape
    kn = torch.nn.functional.normalize(k.float(), dim=-1)  # (G, n, d)
    keep = keep.to(v.device)
    target = torch.arange(n, device=v.device).expand(G, n).clone()  # a kept entry absorbs itself
    rows = max(1, chunk_bytes // (4 * G * n))
    for s in range(0, n, rows):
        e = min(n, s + rows)
        sim = (kn[:, s:e] @ kn.transpose(1, 2)).masked_fill(~keep.unsqueeze(1), float("-inf"))  # (G, c, n)
        target[:, s:e] = torch.where(keep[:, s:e], target[:, s:e], sim.argmax(-1))  # first best kept entry
    a = mass.double().clamp_min(0)  # (G, n)
    num = torch.zeros(G, n, d, dtype=torch.float64, device=v.device)
    num.scatter_add_(1, target.unsqueeze(-1).expand(G, n, d), a.unsqueeze(-1) * v.double())
    den = torch.zeros(G, n, dtype=torch.float64, device=v.device).scatter_add_(1, target, a)
    merged = torch.where(den.unsqueeze(-1) > 0, num / den.clamp_min(1e-300).unsqueeze(-1), v.double())
    # only kept entries of heads that evicted something change: a head that keeps everything is FullKV exactly
    change = keep & (~keep).any(-1, keepdim=True) & keep.any(-1, keepdim=True)
    return torch.where(change.unsqueeze(-1), merged.to(v.dtype), v)


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
            values.append(merge_values(c.k, c.v, keep[li], mass))
        info["values"] = values
        return keep, scores, info
