"""A compressed KV cache whose bytes really shrink: per layer, the kept tokens of every KV head are packed
back to back (ragged), with an offsets vector; newly generated tokens go to a small dense tail.

    layer ℓ:  k_packed (N_ℓ, d) = [kept keys of head 0 | kept keys of head 1 | ... ]   offsets (G + 1,)
              tail_k   (G, capacity, d) for decoded tokens (every head keeps all of them)

Allocated bytes = kept bytes + the offsets (8·(G+1) bytes a layer) + the tail; no padding to the longest head.
Keys keep the RoPE phases of their original positions; new tokens continue at positions n, n + 1, ...
`attend` is the clear PyTorch reference for decode attention over it (CPU and GPU); the fast GPU kernel lives
in `kernels.py` and is checked against this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .capture import Prefill


@dataclass
class RaggedLayer:
    k: torch.Tensor  # (N, d) packed kept keys, head-major
    v: torch.Tensor  # (N, d) packed kept values
    offsets: torch.Tensor  # (G + 1,) int64: head g owns rows offsets[g]:offsets[g+1]
    tail_k: torch.Tensor  # (G, capacity, d)
    tail_v: torch.Tensor  # (G, capacity, d)

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


class RaggedCache:
    def __init__(self, layers: list[RaggedLayer], next_pos: int):
        self.layers = layers
        self.used = 0  # tokens in the tail
        self.next_pos = next_pos  # RoPE position of the next token

    @classmethod
    def from_prefill(cls, pf: Prefill, keep: torch.Tensor | None = None, values: list[torch.Tensor] | None = None,
                     capacity: int = 64) -> RaggedCache:
        """Pack the kept entries (keep: (L, G, n) bool; None keeps everything) of a prefill.
        values: optional per-layer replacement values (G, n, d) from merging policies."""
        layers = []
        for li, c in enumerate(pf.layers):
            G, n, d = c.k.shape
            mask = torch.ones(G, n, dtype=torch.bool) if keep is None else keep[li]
            mask = mask.to(c.k.device)
            v = c.v if values is None else values[li]
            counts = mask.sum(-1).cpu()
            offsets = torch.zeros(G + 1, dtype=torch.long)
            offsets[1:] = torch.cumsum(counts, 0)
            layers.append(RaggedLayer(c.k[mask].contiguous(), v[mask].contiguous(), offsets,
                                      c.k.new_empty(G, capacity, d), c.v.new_empty(G, capacity, d)))
        return cls(layers, next_pos=pf.n)

    @property
    def capacity(self) -> int:
        return self.layers[0].tail_k.shape[1]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write T new tokens' keys/values (G, T, d) into the tail (growing it if needed)."""
        lay = self.layers[layer]
        T = k.shape[1]
        if self.used + T > lay.tail_k.shape[1]:
            grow = max(self.used + T, 2 * lay.tail_k.shape[1])
            for name in ("tail_k", "tail_v"):
                old = getattr(lay, name)
                new = old.new_empty(old.shape[0], grow, old.shape[2])
                new[:, : self.used] = old[:, : self.used]
                setattr(lay, name, new)
        lay.tail_k[:, self.used:self.used + T] = k
        lay.tail_v[:, self.used:self.used + T] = v

    def attend(self, layer: int, q: torch.Tensor, T: int, scaling: float) -> torch.Tensor:
        """Reference decode attention: q (H, T, d) of the T tokens just appended → (H, T, d).
        Each query head attends to its KV head's kept prefix plus the tail up to itself (causal)."""
        lay = self.layers[layer]
        H, _, d = q.shape
        G = lay.offsets.numel() - 1
        r = H // G
        end = self.used + T
        out = torch.empty_like(q)
        causal = torch.arange(end, device=q.device).unsqueeze(0) > (self.used + torch.arange(T, device=q.device)).unsqueeze(1)
        for g in range(G):
            a, b = int(lay.offsets[g]), int(lay.offsets[g + 1])
            keys = torch.cat([lay.k[a:b], lay.tail_k[g, :end]]).float()  # (N_g + end, d)
            vals = torch.cat([lay.v[a:b], lay.tail_v[g, :end]]).float()
            qg = q[g * r:(g + 1) * r].float()  # (r, T, d)
            logits = qg @ keys.T * scaling  # (r, T, N_g + end)
            logits[..., b - a:] = logits[..., b - a:].masked_fill(causal, float("-inf"))
            out[g * r:(g + 1) * r] = (torch.softmax(logits, -1) @ vals).to(q.dtype)
        return out

    def advance(self, T: int) -> None:
        self.used += T
        self.next_pos += T

    # memory accounting ------------------------------------------------------------------------------------
    def kept_entries(self) -> int:
        return sum(int(lay.offsets[-1]) for lay in self.layers)

    def kept_bytes(self) -> int:
        """Bytes of the kept prefix K and V (what the policy decided to keep)."""
        return sum(lay.k.numel() * lay.k.element_size() + lay.v.numel() * lay.v.element_size() for lay in self.layers)

    def allocated_bytes(self, include_tail: bool = False) -> int:
        """Bytes the prefix really occupies (storage of the packed tensors + offsets); optionally the tail."""
        total = 0
        for lay in self.layers:
            total += lay.k.untyped_storage().nbytes() + lay.v.untyped_storage().nbytes()
            total += lay.offsets.numel() * lay.offsets.element_size()
            if include_tail:
                total += lay.tail_k.untyped_storage().nbytes() + lay.tail_v.untyped_storage().nbytes()
        return total
