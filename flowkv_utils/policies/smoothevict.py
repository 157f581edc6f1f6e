"""SmoothEvict — named by the literature this project starts from, defined nowhere. **Project interpretation**
(the cache-merging family, as in CaM and D2O): FlowKV (layer-wise) scores and keep-set, but an evicted entry is
not thrown away. Each evicted (g, j) is merged into the kept entry (g, k) of the same KV head whose key is most
similar (cosine); the kept key is unchanged and its value becomes the attention-mass-weighted average

    v_k ← (a_k v_k + Σ_{j→k} a_j v_j) / (a_k + Σ_{j→k} a_j),   a = window attention mass, group mean.

With nothing evicted it is FullKV exactly (no value changes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..budgets import Budget
from ..capture import Prefill
from .base import group_mean, window_mass
from .flowkv import FlowKV


def merge_values(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, mass: torch.Tensor,
                 chunk_bytes: int = 1 << 27) -> torch.Tensor:
    """Merged values (…, G, n, d): evicted entries folded into their most key-similar kept entry of the head
    (first kept token on ties). k, v (…, G, n, d), keep and mass (…, G, n): several layers at once. Only evicted
    rows against kept columns are compared (each head's kept and evicted tokens gathered in token order, padded to
    the largest count), in row chunks of at most `chunk_bytes`: never an n × n map. One read-back (the counts)."""
    *lead, n, d = v.shape
    kf, vf = k.reshape(-1, n, d), v.reshape(-1, n, d)
    kp = keep.to(v.device).reshape(-1, n)
    R = kf.shape[0]
    kept_n = kp.sum(-1)  # (R,)
    K, E = (int(x) for x in torch.stack([kept_n.max(), (n - kept_n).max()]).cpu())
    if K == 0 or E == 0:  # nothing kept or nothing evicted anywhere: no value changes
        return v
    kn = torch.nn.functional.normalize(kf.float(), dim=-1)  # (R, n, d)
    kept_idx = torch.sort((~kp).to(torch.uint8), dim=-1, stable=True).indices[:, :K]  # kept first, token order
    gone_idx = torch.sort(kp.to(torch.uint8), dim=-1, stable=True).indices[:, :E]  # evicted first, token order
    cols_ok = torch.arange(K, device=v.device) < kept_n.unsqueeze(-1)  # (R, K) real kept columns
    rows_ok = torch.arange(E, device=v.device) < (n - kept_n).unsqueeze(-1)  # (R, E) real evicted rows
    kk = kn.gather(1, kept_idx.unsqueeze(-1).expand(R, K, d))
    target = torch.arange(n, device=v.device).expand(R, n).clone()  # a kept entry absorbs itself
    rows = max(1, chunk_bytes // (4 * R * K))
    for s in range(0, E, rows):
        e = min(E, s + rows)
        ids = gone_idx[:, s:e]
        sim = kn.gather(1, ids.unsqueeze(-1).expand(R, e - s, d)) @ kk.transpose(1, 2)  # (R, c, K)
        best = kept_idx.gather(1, sim.masked_fill_(~cols_ok.unsqueeze(1), float("-inf")).argmax(-1))
        target.scatter_(1, ids, torch.where(rows_ok[:, s:e], best, ids))  # padding rows are kept: themselves
    a = mass.to(v.device).reshape(-1, n).double().clamp_min(0)  # (R, n)
    num = torch.zeros(R, n, d, dtype=torch.float64, device=v.device)
    num.scatter_add_(1, target.unsqueeze(-1).expand(R, n, d), a.unsqueeze(-1) * vf.double())
    den = torch.zeros(R, n, dtype=torch.float64, device=v.device).scatter_add_(1, target, a)
    merged = torch.where(den.unsqueeze(-1) > 0, num / den.clamp_min(1e-300).unsqueeze(-1), vf.double())
    # only kept entries of heads that evicted something change: a head that keeps everything is FullKV exactly
    change = kp & (~kp).any(-1, keepdim=True) & kp.any(-1, keepdim=True)
    return torch.where(change.unsqueeze(-1), merged.to(v.dtype), vf).view(v.shape)


@dataclass
class SmoothEvict(FlowKV):
    name = "smoothevict"
    streams = False  # the merge reads every layer's full K/V after selection
    merge_bytes: ClassVar[int] = 1 << 28  # layers merged together hold at most this much float64 (…, n, d)

    def select(self, pf: Prefill, b: Budget):
        keep, scores, info = super().select(pf, b)
        info["values"] = self.merged_values(pf, keep)
        return keep, scores, info

    def merged_values(self, pf: Prefill, keep: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer merged values (G, n, d) of the prefill's KV heads given their keep-set (L, G, n): each head
        merges within itself, so a tensor-parallel rank merges its own heads (`sharded_policies`)."""
        L, G = keep.shape[:2]
        mass = pf.memo_layers(range(L), ("group_window_mass", self.window),
                              lambda li: group_mean(window_mass(self.attn(pf, li)), G))  # (L, G, n)
        c0 = pf.layers[0]
        step = max(1, self.merge_bytes // (8 * G * pf.n * c0.v.shape[-1]))
        values = []
        for s in range(0, L, step):
            ls = range(s, min(L, s + step))
            k = torch.stack([pf.layers[li].k for li in ls])
            v = torch.stack([pf.layers[li].v for li in ls])
            values.extend(merge_values(k, v, keep[s:s + len(ls)], mass[s:s + len(ls)]).unbind(0))
        return values
