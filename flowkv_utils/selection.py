"""Keep-sets: the result type every policy returns, and the selection helpers policies, the layer-wise
compressor and the benchmarks share (the one top-k, the one window rule, the one cascading global top-k).

A keep-set is a bool mask (L, G, n) over (layer, KV head, token). Ties are always broken towards the earlier
token (stable sorts, or `best_in_order`'s earliest ties), so every selection is deterministic, on the CPU and on
CUDA alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .budgets import Budget


@dataclass
class PolicyResult:
    """keep[ℓ, g, j] is True when token j stays in KV head g of layer ℓ.

    scores: what the policy ranked by, (L, G, n) float32, NaN where a token is kept by rule (window, sinks) or
    not scored. values: per-layer replacement values (G, n, d) for merging policies (SmoothEvict), else None."""

    policy: str
    budget: Budget
    keep: torch.Tensor
    scores: torch.Tensor | None = None
    values: list[torch.Tensor] | None = None
    info: dict = field(default_factory=dict)

    @property
    def kept_per_head(self) -> torch.Tensor:  # (L, G)
        return self.keep.sum(-1)

    @property
    def kept_per_layer(self) -> torch.Tensor:  # (L,)
        return self.keep.sum((-1, -2))

    @property
    def total_kept(self) -> int:
        return int(self.keep.sum())


def rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last axis, 0 = best; ties go to the earlier index."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks)


def topk_per_row(scores: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Bool mask of the top-k[r] entries of each row r of scores (R, m); k may differ per row."""
    # a host k goes up without waiting for the GPU (pageable memory is staged at once, so this is safe)
    k = torch.as_tensor(k).to(scores.device, non_blocking=True).reshape(-1, *([1] * (scores.dim() - 1)))
    return rank_desc(scores) < k


def topk_flat(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (same shape) of the k best entries of the whole tensor (flattened, ties to earlier index)."""
    return topk_per_row(scores.reshape(1, -1), int(k)).view_as(scores)


def masked(scores: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """Scores with excluded entries pushed below everything (so they are never chosen by a top-k)."""
    return scores.masked_fill(exclude, float("-inf"))


def with_window(prefix_keep: torch.Tensor, window: int) -> torch.Tensor:
    """Append the always-kept window: (…, G, n − w) → (…, G, n)."""
    ones = torch.ones(*prefix_keep.shape[:-1], window, dtype=torch.bool, device=prefix_keep.device)
    return torch.cat([prefix_keep, ones], dim=-1)


def pad_scores(prefix_scores: torch.Tensor, window: int) -> torch.Tensor:
    """Append NaN for the window positions (kept by rule, not scored): (…, G, n − w) → (…, G, n)."""
    nan = torch.full((*prefix_scores.shape[:-1], window), float("nan"), dtype=torch.float32,
                     device=prefix_scores.device)
    return torch.cat([prefix_scores.float(), nan], dim=-1)


def shown(scores: torch.Tensor) -> torch.Tensor:
    """Scores for display: ±inf (kept by rule, e.g. sinks) become NaN."""
    return scores.float().masked_fill(scores.isinf(), float("nan"))


def floor_first(scores: torch.Tensor, floor: int) -> torch.Tensor:
    """Scores (…, G, m) with each head's top `floor` entries raised to +inf, so that one top-k over everything —
    or `GlobalCascade` layer by layer — keeps every head's floor first, then the best of the rest."""
    return scores.masked_fill(topk_per_row(scores, floor), float("inf")) if floor > 0 else scores


def stack_layers(keeps: list[torch.Tensor], scores: list[torch.Tensor] | None = None):
    """Stack per-layer (G, n) results into (L, G, n) tensors, on their device (the prefill's: nothing waits)."""
    keep = torch.stack(keeps)
    sc = torch.stack([s.float() for s in scores]) if scores else None
    return keep, sc


def kth_largest(vals: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of a 1-D tensor (1 ≤ k ≤ numel), a 0-d tensor on its device. On the CPU
    `torch.kthvalue` (a selection, no sort); on CUDA a radix sort, because CUDA's `kthvalue` of one long row runs as
    one thread block: 3.4 ms against 0.08 ms for 673K entries on the H200 (benchmarks/NOTES.md)."""
    n = vals.numel()
    if vals.is_cuda:
        return torch.sort(vals).values[n - k]
    return torch.kthvalue(vals, n - k + 1).values


def true_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Positions, increasing, of the True entries of a 1-D bool mask that has exactly `count` of them: what
    `mask.nonzero()` gives, without its host read (nonzero, and boolean-mask indexing, wait for the device to learn
    how many there are; here the caller knows). A wrong count gives wrong positions: pass one known exactly."""
    dev = mask.device
    slots = mask.cumsum(0).mul_(mask)  # the i-th True entry (from 1) goes to slot i, the rest to slot 0
    out = torch.empty(count + 1, dtype=torch.long, device=dev)
    return out.scatter_(0, slots, torch.arange(mask.numel(), device=dev))[1:]


def best_in_order(vals: torch.Tensor, k: int) -> torch.Tensor:
    """Positions, increasing, of the k largest of a 1-D tensor, ties to the earlier position: the same set as
    `topk_per_row(vals.view(1, -1), k)` (tested), found from the k-th largest value
    (`kth_largest`), then comparisons and prefix sums over the entries, and nothing waits for the device."""
    n = vals.numel()
    kk = min(int(k), n)
    dev = vals.device
    if kk <= 0:
        return torch.empty(0, dtype=torch.long, device=dev)
    if kk == n:
        return torch.arange(n, device=dev)
    t = kth_largest(vals, kk)
    above, tie = vals > t, vals == t
    keep = torch.where(tie, tie.cumsum(0) <= kk - above.sum(), above)  # then the earliest ties, up to kk in all
    return true_positions(keep, kk)


class GlobalCascade:
    """Cascading model-wide top-k: as each layer finishes prefill, merge its scores into the running selection and
    evict everything below the running k-th largest. Global top-k over a growing set is monotone, so the final
    selection equals the one-shot `topk_flat` over all layers exactly (tested), while only ≈ k + one layer is held.

    Use: c = GlobalCascade(k); per layer `c.add(layer, scores (G, m))`; then `c.keep_mask(layer)` → (G, m) bool,
    what is still kept of that layer (entries only ever leave), `c.kept_per_head()` / `c.kept_counts()` → kept
    entries per head / per layer, `c.kept_table()` → the per-head counts of every layer in one tensor, and
    `c.kept_at(ids)` → whether given entries (flat ids) are still kept. Everything stays on the scores' device and
    `add` never waits for it (every size it needs follows from the shapes), so a caller decides itself when to read
    counts back and re-pack its cache."""

    def __init__(self, k: int):
        self.k = int(k)
        self.vals: torch.Tensor | None = None  # (≤ k,) kept scores, in increasing flat-id order
        self.ids: torch.Tensor | None = None  # (≤ k,) their flat ids
        self.alive: torch.Tensor | None = None  # (entries seen,) bool: still selected
        self.shapes: dict[int, tuple[int, int]] = {}
        self.offset: dict[int, int] = {}  # layer → flat id of its entry (0, 0): layers lie back to back, in add order
        self._next = 0

    def add(self, layer: int, scores: torch.Tensor) -> None:
        """Merge one layer's scores (G, m); ties go to the earlier flat id (earlier layer, head, token)."""
        G, m = scores.shape
        dev = scores.device
        self.shapes[layer], self.offset[layer] = (G, m), self._next
        ids = torch.arange(self._next, self._next + G * m, device=dev)
        self._next += G * m
        vals = scores.detach().float().reshape(-1)
        if self.vals is not None:  # kept ids are increasing and below the new ones: flat order is kept
            vals, ids = torch.cat([self.vals, vals]), torch.cat([self.ids, ids])
        top = self._best(vals, ids)
        self.vals, self.ids = vals.index_select(0, top), ids.index_select(0, top)
        # an entry not held now is never selected again: alive is exactly the held ids (no update of the old one)
        self.alive = torch.zeros(self._next, dtype=torch.bool, device=dev).index_fill_(0, self.ids, True)

    def _best(self, vals: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Positions, in flat order, of the k best of the held entries (vals, ids increasing), ties to the earlier
        id. A tensor-parallel rank's cascade (`sharded_policies.ShardedCascade`) replaces it by the distributed
        top-k over every rank's heads."""
        return best_in_order(vals, self.k)

    def keep_mask(self, layer: int) -> torch.Tensor:
        """(G, m) bool: the entries of `layer` still selected (a copy)."""
        G, m = self.shapes[layer]
        o = self.offset[layer]
        return self.alive[o: o + G * m].view(G, m).clone()

    def keep_masks(self) -> dict[int, torch.Tensor]:
        return {layer: self.keep_mask(layer) for layer in self.shapes}

    def kept_at(self, ids: torch.Tensor) -> torch.Tensor:
        """Whether the entries of flat ids (1-D int64, on the cascade's device) are still selected; a negative id
        (an entry the cascade does not rank, e.g. a layer-wise compressor's window row) reads True. One gather over
        the ids given, whatever the entries seen: a caller re-packing what it holds asks about those rows only."""
        return self.alive.index_select(0, ids.clamp(min=0)) | (ids < 0)

    def kept_table(self) -> torch.Tensor:
        """(layers, G) entries still selected per head of every layer, rows in add order, on the device (reading it
        synchronises): one reduction, for layers of one shape (G, m) (every model's: the layer-wise compressor's,
        `ShardedCascade`'s); layers of different shapes are an error (use `kept_per_head`)."""
        shapes = set(self.shapes.values())
        if len(shapes) != 1:
            raise ValueError(f"kept_table: the layers have shapes {sorted(shapes)}; one table needs one (G, m) "
                             "(kept_per_head counts layers of any shape)")
        G, m = shapes.pop()
        return self.alive.view(len(self.offset), G, m).sum(-1)

    def kept_per_head(self) -> dict[int, torch.Tensor]:
        """Entries still selected per head of every layer, (G,) tensors on the device (reading them synchronises).
        Layers of one shape (every model here) are counted in one reduction (`kept_table`), not one per layer."""
        if len(set(self.shapes.values())) == 1:
            return dict(zip(self.offset, self.kept_table().unbind(0), strict=True))
        return {layer: self.alive[o: o + self.shapes[layer][0] * self.shapes[layer][1]].view(self.shapes[layer]).sum(-1)
                for layer, o in self.offset.items()}

    def kept_counts(self) -> dict[int, torch.Tensor]:
        """Entries still selected per layer, as 0-d tensors on the device (reading them synchronises)."""
        return {layer: c.sum() for layer, c in self.kept_per_head().items()}
