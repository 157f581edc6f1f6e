"""The one ragged KV layout: a compressed cache whose bytes really shrink.

Per layer, the kept tokens of every KV head (a *segment*) are packed back to back, with an offsets vector; newly
generated tokens go to a small dense tail:

    layer ℓ:  k (N_ℓ, d) = [kept keys of segment 0 | kept keys of segment 1 | ... ]   offsets (S + 1,)
              tail_k (S, capacity, d) for decoded tokens (every segment keeps all of them)

A segment is one KV head of one sequence (S = G for one sequence, B·G for a batch: `fastdecode.StaticRaggedCache`
uses this same layout). This module owns the layout: the one lengths → offsets (`offsets_of`), the one gather of kept
rows (`take_rows`: packing a layer from a keep mask or its kept positions, `pack_layer` / `pack_positions`, and
re-packing a packed one, `RaggedLayer.keep_positions`), the one byte accounting (`kept_bytes`, `allocated_bytes`) and
the one constructor from a policy result (`RaggedCache.from_prefill`). Allocated bytes = kept bytes + the offsets
(8·(S+1) bytes a layer) + the tail; no padding to the longest head. Keys keep the RoPE phases of their original
positions; new tokens continue at positions n, n + 1, ... `RaggedCache.attend` is the clear PyTorch reference for
decode attention over it; the fast kernels (`kernels.split_kv`, `fastdecode`) are checked against it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch

from .capture import Prefill
from .selection import PolicyResult, true_positions


def host_lengths(lengths: torch.Tensor | Sequence[int]) -> list[int]:
    """Segment lengths as Python ints: from ints, or from a tensor of any shape (flattened; one on a device is read
    back, which waits for it: callers that must not wait pass lengths they already hold on the host)."""
    return lengths.flatten().tolist() if torch.is_tensor(lengths) else [int(x) for x in lengths]


def offsets_of(lengths: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Segment lengths (S,) → offsets (S + 1,) int64 on the CPU: segment s owns packed rows offsets[s]:offsets[s+1].
    Summed in Python and made in one op: a layer's offsets are host bookkeeping (`host_lengths` for the forms)."""
    return torch.tensor(list(accumulate(host_lengths(lengths), initial=0)), dtype=torch.long)


def take_rows(pos: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows (N, d) of each x at positions pos (N,): the one gather of packing and re-packing. x is a packed
    (N', d) (pos: its rows) or a layer's (G, n, d) (pos: flat g·n + j). A layer whose (g, j) lie flat in memory (a
    chunked prefill's K/V) is gathered through its (G·n, d) view; another (an unchunked prefill's K/V, a transposed
    projection, which flattening would copy whole) by (g, j) = divmod(pos, n), computed once for every such x."""
    gj = None
    out = []
    for x in xs:
        if x.dim() == 2 or x.stride(0) == x.shape[1] * x.stride(1):
            out.append(x.flatten(0, -2).index_select(0, pos))
            continue
        if gj is None:
            gj = pos // x.shape[1], pos % x.shape[1]
        out.append(x[gj])
    return tuple(out)


def check_keep_mask(keep: torch.Tensor, shape: tuple[int, ...], what: str = "keep") -> None:
    """A keep mask must be a bool tensor of the given shape (an integer mask would be read as indices)."""
    if not torch.is_tensor(keep) or keep.dtype != torch.bool:
        got = keep.dtype if torch.is_tensor(keep) else type(keep).__name__
        raise TypeError(f"{what}: dtype {got}; a keep mask must be a torch.bool tensor of shape {tuple(shape)} "
                        "(True = kept), not indices or 0/1 integers")
    if tuple(keep.shape) != tuple(shape):
        raise ValueError(f"{what}: shape {tuple(keep.shape)}; expected {tuple(shape)}")


@dataclass
class RaggedLayer:
    k: torch.Tensor  # (N, d) packed kept keys, segment-major
    v: torch.Tensor  # (N, d) packed kept values
    offsets: torch.Tensor  # (S + 1,) int64 (CPU): segment s owns rows offsets[s]:offsets[s+1]
    tail_k: torch.Tensor  # (S, capacity, d)
    tail_v: torch.Tensor  # (S, capacity, d)

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def keep_positions(self, pos: torch.Tensor, lengths: torch.Tensor | Sequence[int]) -> None:
        """Keep only the packed rows at positions pos (increasing, on the rows' device; `selection.true_positions`
        of a row mask gives them without a host read); lengths (S,) are the segments' new lengths, on the host."""
        self.k, self.v = take_rows(pos, self.k, self.v)
        self.offsets = offsets_of(lengths)

    def with_tail(self, capacity: int) -> RaggedLayer:
        """A fresh (uninitialised) tail of `capacity` tokens per segment, same prefix."""
        S, d = self.offsets.numel() - 1, self.k.shape[-1]
        self.tail_k = self.k.new_empty(S, capacity, d)
        self.tail_v = self.v.new_empty(S, capacity, d)
        return self


def pack_layer(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None, capacity: int = 0,
               lengths: torch.Tensor | Sequence[int] | None = None) -> RaggedLayer:
    """Pack one layer's kept entries: k, v (G, n, d), keep (G, n) bool (None keeps everything, as a view when
    k/v are contiguous) → RaggedLayer with a tail of `capacity` tokens. lengths: keep's (G,) counts per head on the
    host when the caller has them (then nothing waits for the device); else they are read back once."""
    G, n, d = k.shape
    if keep is None:
        return RaggedLayer(k.reshape(G * n, d).contiguous(), v.reshape(G * n, d).contiguous(), offsets_of([n] * G),
                           k.new_empty(G, capacity, d), v.new_empty(G, capacity, d))
    check_keep_mask(keep, (G, n))
    keep = keep.to(k.device)
    lengths = host_lengths(keep.sum(-1) if lengths is None else lengths)
    pos = true_positions(keep.reshape(-1), sum(lengths))  # flat g·n + j of the kept entries, head-major
    return pack_positions(k, v, pos, lengths, capacity)


def pack_positions(k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, lengths: torch.Tensor | Sequence[int],
                   capacity: int = 0) -> RaggedLayer:
    """Pack the entries of one layer k, v (G, n, d) at flat positions pos (N,) = g·n + j, increasing (head-major:
    `true_positions` of its (G, n) keep mask), with lengths (G,) per head on the host: `pack_layer` for a caller
    that has the positions already (the layer-wise compressor keeps them to re-pack later)."""
    G, _, d = k.shape
    kp, vp = take_rows(pos, k, v)
    return RaggedLayer(kp, vp, offsets_of(lengths), k.new_empty(G, capacity, d), v.new_empty(G, capacity, d))


def kept_bytes(layers: Iterable) -> int:
    """Bytes of the kept prefix K and V of layers in the ragged layout (what the policy decided to keep)."""
    return sum(x.k.numel() * x.k.element_size() + x.v.numel() * x.v.element_size() for x in layers)


def allocated_bytes(layers: Iterable, include_tail: bool = False) -> int:
    """Bytes the prefix really occupies (storage of the packed tensors + offsets); optionally the tails."""
    total = 0
    for x in layers:
        total += x.k.untyped_storage().nbytes() + x.v.untyped_storage().nbytes()
        total += x.offsets.numel() * x.offsets.element_size()
        if include_tail:
            total += x.tail_k.untyped_storage().nbytes() + x.tail_v.untyped_storage().nbytes()
    return total


class RaggedCache:
    """One sequence's compressed cache: a RaggedLayer per layer, the tail fill `used` and the next RoPE position."""

    def __init__(self, layers: list[RaggedLayer], next_pos: int):
        self.layers = layers
        self.used = 0  # tokens in the tail
        self.next_pos = next_pos  # RoPE position of the next token

    @classmethod
    def from_prefill(cls, pf: Prefill, result: PolicyResult | None = None, capacity: int = 64) -> RaggedCache:
        """The compressed cache of a policy result (None: the full cache), with tails of `capacity` tokens.
        A merging policy's replacement values (result.values) are packed instead of the prefill's."""
        if result is not None and not isinstance(result, PolicyResult):
            raise TypeError(f"result: {type(result).__name__}; expected a PolicyResult (what a policy returns) "
                            "or None (the full cache)")
        layers = []
        for li, c in enumerate(pf.layers):
            keep = None if result is None else result.keep[li]
            v = c.v if result is None or result.values is None else result.values[li]
            layers.append(pack_layer(c.k, v, keep, capacity))
        return cls(layers, next_pos=pf.n)

    @classmethod
    def concat(cls, caches: list[RaggedCache], capacity: int = 64) -> RaggedCache:
        """One cache over the segments of several (sequence-major: every KV head of the first, then of the second,
        ...), their prefixes only, with fresh tails of `capacity` tokens: a batch of B sequences whose segments are
        (sequence, KV head), the layout `fastdecode.StaticRaggedCache` uses. next_pos is the largest of theirs (for
        sequences of different lengths the caller keeps each one's positions, as `hf.PressCache` does)."""
        if not caches or any(c.used for c in caches):
            raise ValueError("concat: needs at least one cache, each with an empty tail (used == 0)")
        layers = []
        for lays in zip(*(c.layers for c in caches), strict=True):
            k = torch.cat([x.k for x in lays])
            v = torch.cat([x.v for x in lays])
            layers.append(RaggedLayer(k, v, offsets_of(torch.cat([x.lengths for x in lays])), k, v).with_tail(capacity))
        return cls(layers, next_pos=max(c.next_pos for c in caches))

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
        return kept_bytes(self.layers)

    def allocated_bytes(self, include_tail: bool = False) -> int:
        return allocated_bytes(self.layers, include_tail)
