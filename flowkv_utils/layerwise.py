"""Compress while prefilling: evict layer by layer through `capture.prefill`'s `on_layer` hook, so the full KV
cache of a long prompt never exists at once (200K+ tokens on one GPU).

As soon as layer ℓ has run, the hook scores its entries with the policy's own `layer_scores` (window attention is
(H, w, n): never an n × n matrix), selects, and packs the kept K/V into the ragged layout of `cache.RaggedCache`;
the layer's dense K/V are then dropped. Layer-local policies (SnapKV, FlowKV layer-wise) decide each layer alone.
FlowKV (global) ranks every (ℓ, g, j) together: `policies.flowkv.GlobalCascade` keeps the running global top-k and evicts from earlier layers as later ones
arrive, which gives exactly the one-shot selection while holding ≈ budget + one layer.

    comp = LayerwiseCompressor(model, ids, "flowkv_global", 0.05, also=("snapkv", "flowkv"))
    pf = prefill(model, ids, window=32, chunk=8192, on_layer=comp, keep_kv=False)
    cache = comp.cache(capacity=64)          # RaggedCache of the kept entries
    comp.seconds                             # scoring + selection time per policy (synchronised)
"""

from __future__ import annotations

import time

import torch

from .budgets import check_window, resolve_budget
from .cache import RaggedCache, RaggedLayer
from .capture import LayerCapture, Prefill
from .models import shape_of
from .policies import get_policy
from .policies.base import topk_flat, topk_per_row, with_window
from .policies.flowkv import GlobalCascade, layer_norm_factor

LAYERWISE = ("fullkv", "snapkv", "flowkv", "flowkv_global")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LayerwiseCompressor:
    """`on_layer` hook that compresses each layer as prefill produces it (see the module docstring).

    policy: the policy whose selection is applied ('fullkv', 'snapkv', 'flowkv', 'flowkv_global');
    budget: tokens per KV head or a fraction of the prompt (as everywhere); also: policies whose scoring and
    selection are computed and timed on the same layers but not applied (overhead measurements);
    keep_scores: keep every layer's (G, n − w) FlowKV scores on the device, so `kept_counts` can give the
    per-head lengths of other budgets without another prefill; slack (FlowKV global applied): an earlier layer is
    re-packed only once the cascade has evicted more than this fraction of the prefix entries it holds (so it
    holds at most 1/(1 − slack) of what it keeps: default 0.25, ≤ 1.33×, for far fewer copies than re-packing
    at every eviction, slack 0). The last layer re-packs everything, so the final cache is the same for every
    slack."""

    def __init__(self, model, input_ids: torch.Tensor, policy: str, budget: int | float, window: int = 32,
                 also: tuple[str, ...] = (), keep_scores: bool = False, slack: float = 0.25):
        for name in (policy, *also):
            if name not in LAYERWISE:
                raise ValueError(f"policy {name!r} cannot compress layer by layer here: allowed are "
                                 f"{', '.join(LAYERWISE)}")
        ids = input_ids.view(1, -1)
        self.shape = shape_of(model)
        L, G = self.shape.layers, self.shape.kv_heads
        self.n = ids.shape[-1]
        self.window = window
        self.pf = Prefill(model=model, input_ids=ids, window=window, layers=[None] * L, logits=None)
        self.budget = resolve_budget(budget, self.n, L, G)
        if not self.budget.full and any(name != "fullkv" for name in (policy, *also)):
            check_window(self.n, window, int(self.budget.per_slot().min()), policy)  # same errors as the policies
        if not 0.0 <= slack < 1.0:
            raise ValueError(f"slack={slack!r}: allowed is 0 ≤ slack < 1 (fraction of a layer's entries evicted "
                             f"before it is re-packed)")
        self.names = (policy, *[a for a in also if a != policy])
        self.main = policy
        self.policies = {name: get_policy(name, **({} if name == "fullkv" else {"window": window}))
                         for name in self.names}
        for name, p in self.policies.items():
            if getattr(p, "head_floor", 0):
                raise ValueError(f"{name}: head_floor={p.head_floor} is not supported layer by layer (use 0)")
        self.cascades = {name: GlobalCascade(self.policies[name].selectable(self.budget))
                         for name in self.names if name == "flowkv_global" and not self.budget.full}
        self.seconds = {name: 0.0 for name in self.names}  # scoring + selection, summed over layers
        self.layers: list[RaggedLayer | None] = [None] * L
        self.prefix_keep: dict[int, torch.Tensor] = {}  # main policy: current (G, n) keep of each packed layer
        self.packed_prefix: dict[int, int] = {}  # main policy: prefix entries (window excluded) each layer holds
        self.slack = slack
        self.counts: dict[str, torch.Tensor] = {name: torch.zeros(L, G, dtype=torch.long) for name in self.names}
        self.keep_scores = keep_scores
        self.scores: dict[str, list[torch.Tensor]] = {"flowkv": [], "flowkv_global": []}

    # -- the hook ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, li: int, cap: LayerCapture) -> LayerCapture:
        self.pf.layers[li] = cap
        dev = cap.k.device
        keep_main = None
        for name in self.names:
            _sync(dev)
            t0 = time.perf_counter()
            keep = self._select(name, li)  # (G, n) bool, or None for FullKV
            _sync(dev)
            self.seconds[name] += time.perf_counter() - t0
            self.pf._attn.pop(li, None)  # each policy pays its own window attention
            if keep is not None:
                self.counts[name][li] = keep.sum(-1).cpu()
            else:
                self.counts[name][li] = self.n
            if name == self.main:
                keep_main = keep
        self._pack(li, cap, keep_main)
        self.pf.layers[li] = None
        G, _, d = cap.k.shape
        empty = cap.k.new_empty(G, 0, d)  # fresh: a [:, :0] view would keep the layer's whole K alive
        return LayerCapture(q=cap.q, k=empty, v=cap.v.new_empty(G, 0, d), attn_out=cap.attn_out, resid=cap.resid,
                            scaling=cap.scaling)

    def _select(self, name: str, li: int) -> torch.Tensor | None:
        p, b, w, pf = self.policies[name], self.budget, self.window, self.pf
        if name == "fullkv" or b.full:
            return None
        if name == "snapkv":
            s = p.layer_scores(pf, li)  # (G, m)
            slots = (b.per_slot()[li] - w).to(s.device)
            return with_window(topk_per_row(s, slots), w)
        raw = p.layer_scores(pf, li)  # (G, m) FlowKV scores
        if name == "flowkv":
            if self.keep_scores:
                self.scores[name].append(raw)
            return with_window(topk_flat(raw, int(p.layer_selectable(b)[li])), w)
        s = raw / max(layer_norm_factor(pf, li, p.norm, raw, p.window), 1e-30)  # flowkv_global
        if self.keep_scores:
            self.scores[name].append(s)
        casc = self.cascades[name]
        casc.add(li, s)
        if name == self.main:  # evict from the layers already packed
            self._compact(casc, final=li == self.shape.layers - 1)
        return with_window(casc.keep_mask(li), w)

    def _compact(self, casc: GlobalCascade, final: bool) -> None:
        """Re-pack the already packed layers that lost entries to the cascade: every one on the last layer, else
        only those whose dead entries exceed `slack` × their packed prefix (one host read-back per layer)."""
        packed = list(self.prefix_keep)
        if not packed:
            return
        counts = casc.kept_counts()
        alive = torch.stack([counts[lj] for lj in packed]).tolist()
        for lj, a in zip(packed, alive, strict=True):
            dead = self.packed_prefix[lj] - a
            if dead > 0 and (final or dead > self.slack * self.packed_prefix[lj]):
                self._evict(lj, casc.keep_mask(lj))

    def _pack(self, li: int, cap: LayerCapture, keep: torch.Tensor | None) -> None:
        G, n, d = cap.k.shape
        if keep is None:  # everything: a (G·n, d) view of the packed layout (copies only if not contiguous)
            k, v = cap.k.reshape(G * n, d), cap.v.reshape(G * n, d)
            lengths = torch.full((G,), n, dtype=torch.long)
        else:
            keep = keep.to(cap.k.device)
            k, v = cap.k[keep], cap.v[keep]  # (N, d) head-major
            lengths = keep.sum(-1).cpu()
            self.prefix_keep[li] = keep
            self.packed_prefix[li] = int(lengths.sum()) - self.window * G
        off = torch.zeros(G + 1, dtype=torch.long)
        off[1:] = torch.cumsum(lengths, 0)
        self.layers[li] = RaggedLayer(k.contiguous(), v.contiguous(), off, k.new_empty(G, 0, d), v.new_empty(G, 0, d))

    def _evict(self, lj: int, keep_prefix: torch.Tensor) -> None:
        """Re-pack an already packed layer to the prefix entries (G, m) still kept (a subset of those packed)."""
        old = self.prefix_keep[lj]  # (G, n) window included
        new = old.clone()
        new[:, : keep_prefix.shape[1]] &= keep_prefix.to(old.device)
        rows = new[old]  # (N_old,) which packed rows survive
        lay = self.layers[lj]
        lay.k, lay.v = lay.k[rows].contiguous(), lay.v[rows].contiguous()
        lengths = new.sum(-1).cpu()
        lay.offsets = torch.zeros_like(lay.offsets)
        lay.offsets[1:] = torch.cumsum(lengths, 0)
        self.prefix_keep[lj] = new
        self.packed_prefix[lj] = int(lengths.sum()) - self.window * len(lengths)
        self.counts[self.main][lj] = lengths

    # -- results -------------------------------------------------------------------------------------------
    def finish_counts(self) -> None:
        """Final per-head counts of global policies not applied (their cascades evict after the layer passed)."""
        for name, casc in self.cascades.items():
            if name == self.main:
                continue
            for li, mask in casc.keep_masks().items():
                self.counts[name][li] = mask.sum(-1).cpu() + self.window

    def keep_mask(self) -> torch.Tensor:
        """(L, G, n) bool: what the applied policy kept (FullKV: everything)."""
        L, G = self.shape.layers, self.shape.kv_heads
        out = torch.ones(L, G, self.n, dtype=torch.bool)
        for li, k in self.prefix_keep.items():
            out[li] = k.cpu()
        return out

    def cache(self, capacity: int = 64) -> RaggedCache:
        """The RaggedCache of the kept entries (tails of `capacity` tokens allocated now)."""
        for lay in self.layers:
            if lay is None:
                raise RuntimeError("prefill has not run through every layer yet")
            G, _, d = lay.tail_k.shape
            lay.tail_k = lay.k.new_empty(G, capacity, d)
            lay.tail_v = lay.v.new_empty(G, capacity, d)
        return RaggedCache(list(self.layers), next_pos=self.n)

    def kept_counts(self, name: str, budget: int | float) -> torch.Tensor:
        """(L, G) kept tokens per head (window included) of policy `name` at another budget, from the kept scores
        (FlowKV variants; needs keep_scores=True) or from the budget alone (FullKV, SnapKV: uniform)."""
        L, G, w = self.shape.layers, self.shape.kv_heads, self.window
        b = resolve_budget(budget, self.n, L, G)
        if name == "fullkv" or b.full:
            return torch.full((L, G), self.n, dtype=torch.long)
        if name == "snapkv":
            return b.per_slot().clone()
        p = self.policies.get(name) or get_policy(name, window=w)
        sc = self.scores.get(name) or []
        if len(sc) != L:
            raise ValueError(f"kept_counts({name!r}): scores were not kept (LayerwiseCompressor(keep_scores=True, "
                             f"also=({name!r},)))")
        if name == "flowkv":
            sel = p.layer_selectable(b)
            return torch.stack([topk_flat(s, int(k)).sum(-1).cpu() for s, k in zip(sc, sel.tolist(), strict=True)]) + w
        return topk_flat(torch.stack(sc), p.selectable(b)).sum(-1).cpu() + w
