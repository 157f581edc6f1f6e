"""FlowKV — the project's *derived* reading of LaProx (arXiv 2605.07234; only the abstract is public).

Eviction as an output-aware, layer-wise approximate matrix multiplication (notebook 01): the window output of a
layer is O = X·Y with one inner index per (query head, token); evicting token j of KV head g removes the inner
indices (h, j) for all h in g. Its score is the Frobenius norm of everything that entry contributes to O:

    s_g[j] = ‖ Σ_{h∈g} A_h[:, j] P_h[j, :]ᵀ ‖_F,   P_h = V_g W_O^h,
    s_g[j]² = Σ_{h,h'∈g} (A_h[:, j]·A_{h'}[:, j]) (V_g[j] M_{hh'} V_g[j]ᵀ),   M_{hh'} = W_O^h W_O^{h'ᵀ} (d × d).

Cross terms capture reinforcement/cancellation between query heads sharing an entry; with G = H it is DKM's
column–row product ‖A_h[:, j]‖·‖V_h[j] W_O^h‖. The Gram blocks M are computed once per layer weight. On CUDA the
sum runs as one Triton kernel (`kernels.flowkv_scores_triton`, float32 accuracy); `flowkv_scores` below is the
readable PyTorch version, used on CPU and tested against the direct transcription.

FlowKV (layer-wise): one top-k over all (g, j) of a layer fills its total. FlowKV (global): scores divided by a
per-layer norm so layers compare (N2 default: ‖h_ℓ‖_F of the residual stream entering layer ℓ at the window rows;
N1: ‖O_ℓ‖_F; N0: raw; N3: per-layer sum = 1), then one top-k over every (ℓ, g, j) fills the model total.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..budgets import Budget
from ..capture import Prefill
from ..kernels import flowkv_scores_triton, triton_available
from .base import (
    Policy,
    check_param,
    masked,
    pad_scores,
    pool1d,
    stack_layers,
    topk_flat,
    topk_per_row,
    with_window,
)

_GRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def gram_blocks(w_o: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """M[g, a, b] = W_O^{h_a} W_O^{h_b ᵀ} for the heads h_a, h_b of group g: (G, r, r, d, d), float32."""
    H, d, D = w_o.shape
    wg = w_o.float().view(kv_heads, H // kv_heads, d, D)
    return torch.einsum("gadD,gbeD->gabde", wg, wg)


def cached_gram(pf: Prefill, layer: int) -> torch.Tensor:
    """Gram blocks of a layer, computed once per weight tensor (and recomputed if it changes)."""
    o_proj = pf.model.model.layers[layer].self_attn.o_proj
    hit = _GRAMS.get(o_proj)
    if hit is None or hit[0] != o_proj.weight._version:
        hit = (o_proj.weight._version, gram_blocks(pf.w_o(layer).detach(), pf.shape.kv_heads))
        _GRAMS[o_proj] = hit
    return hit[1]


def flowkv_scores(A: torch.Tensor, v: torch.Tensor, gram: torch.Tensor, m: int | None = None,
                  chunk: int = 8192, impl: str = "auto") -> torch.Tensor:
    """s_g[j] for j < m: exact group output-contribution norms via Gram blocks. A (H, w, n), v (G, n, d),
    gram (G, r, r, d, d) → (G, m) float32.

    Both factors are symmetric in (a, b), so only the P = r(r+1)/2 pairs a ≤ b are formed (off-diagonal ones
    counted twice), and the projected-value products v_j M_ab v_jᵀ of all pairs come from one batched GEMM
    (c, d) @ (d, P·d) per KV head: that GEMM is nearly all of the cost. Chunked over tokens so nothing of size
    n·P·d is held at once. impl: 'torch' (this code), 'triton' (`kernels.flowkv_scores_triton`, the same sum in one
    fused GPU kernel) or 'auto' (triton on CUDA when it imports)."""
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl={impl!r}: allowed are 'auto', 'torch', 'triton'")
    m = A.shape[-1] if m is None else m
    if impl == "triton" or (impl == "auto" and A.is_cuda and triton_available()):
        return flowkv_scores_triton(A, v, gram, m)
    G, r = gram.shape[:2]
    d = gram.shape[-1]
    n, w = A.shape[-1], A.shape[1]
    ia, ib = torch.triu_indices(r, r, device=A.device)  # the pairs a ≤ b
    P = ia.numel()
    twice = torch.where(ia == ib, 1.0, 2.0).to(A.device)  # (P,) off-diagonal pairs appear twice in Σ_{a,b}
    mcat = gram[:, ia, ib].permute(0, 2, 1, 3).reshape(G, d, P * d)  # [g, d, p·d + e] = M_p[d, e]
    Ag = A.view(G, r, w, n)
    out = torch.empty(G, m, dtype=torch.float32, device=A.device)
    for s in range(0, m, chunk):
        e = min(m, s + chunk)
        a = Ag[..., s:e].float()  # (G, r, w, c)
        aa = (a[:, ia] * a[:, ib]).sum(2)  # (G, P, c): attention inner products A_a[:, j]·A_b[:, j]
        vv = v[:, s:e].float()  # (G, c, d)
        pp = (torch.bmm(vv, mcat).view(G, e - s, P, d) * vv.unsqueeze(2)).sum(-1)  # (G, c, P): v_j M_p v_jᵀ
        out[:, s:e] = (aa.transpose(1, 2) * pp).matmul(twice).clamp_min(0).sqrt()
    return out


NORMALISATIONS = ("N0", "N1", "N2", "N3")


@dataclass
class FlowKV(Policy):
    """FlowKV layer-wise (derived): heads of a layer compete for its budget by their effect on the output."""

    sinks: int = 0  # optional attention sinks kept in every head, counted inside the budget
    kernel: int = 1  # optional max-pooling of the scores (ablation; 1 = the pure derived score)
    name = "flowkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_param(self.name, "sinks", self.sinks, isinstance(self.sinks, int) and self.sinks >= 0,
                    "an int ≥ 0 (first tokens always kept, counted in the budget)")
        check_param(self.name, "kernel", self.kernel, isinstance(self.kernel, int) and self.kernel >= 1
                    and self.kernel % 2 == 1, "an odd positive int (max-pooling width; 1 = no pooling)")

    def layer_scores(self, pf: Prefill, layer: int) -> torch.Tensor:
        """(G, n − w) derived scores; sinks (if any) get +inf so they are always kept."""
        m = pf.n - self.window
        s = flowkv_scores(self.attn(pf, layer), pf.layers[layer].v, cached_gram(pf, layer), m)
        s = pool1d(s, self.kernel)
        if self.sinks:
            s[:, : self.sinks] = float("inf")
        return s

    def select(self, pf: Prefill, b: Budget):
        keeps, scores = [], []
        for li, total in enumerate(self.layer_selectable(b).tolist()):
            s = self.layer_scores(pf, li)
            keeps.append(with_window(topk_flat(s, total), self.window))
            scores.append(pad_scores(s.masked_fill(s.isinf(), float("nan")), self.window))
        keep, sc = stack_layers(keeps, scores)
        return keep, sc, {}


def layer_norm_factor(pf: Prefill, layer: int, norm: str, raw: torch.Tensor, window: int | None = None) -> float:
    """Divisor that makes layer scores comparable: N0 1, N1 ‖O_ℓ‖_F, N2 ‖h_ℓ‖_F, N3 Σ raw scores.
    O_ℓ and h_ℓ are taken on the last `window` rows (the policy's window; None: every captured row)."""
    rows = slice(-window, None) if window else slice(None)
    if norm == "N0":
        return 1.0
    if norm == "N1":
        return float(pf.layers[layer].attn_out[rows].float().norm())
    if norm == "N2":
        return float(pf.layers[layer].resid[rows].float().norm())
    if norm == "N3":
        return float(raw[torch.isfinite(raw)].sum())
    raise ValueError(f"norm={norm!r}: allowed are {', '.join(NORMALISATIONS)}")


@dataclass
class FlowKVGlobal(FlowKV):
    """FlowKV with one model-wide budget (derived): normalised scores, one top-k over every (ℓ, g, j)."""

    norm: str = "N2"
    head_floor: int = 0  # optional: tokens every head keeps beyond its window (capped at B − w), so no head is emptied
    name = "flowkv_global"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_param(self.name, "norm", self.norm, self.norm in NORMALISATIONS,
                    f"one of {', '.join(NORMALISATIONS)} (N0 raw, N1 ‖O_ℓ‖, N2 ‖h_ℓ‖, N3 per-layer sum 1)")
        check_param(self.name, "head_floor", self.head_floor,
                    isinstance(self.head_floor, int) and self.head_floor >= 0, "an int ≥ 0 (tokens per head)")

    def normalised_scores(self, pf: Prefill, layers: int) -> list[torch.Tensor]:
        out = []
        for li in range(layers):
            raw = self.layer_scores(pf, li)
            out.append(raw / max(layer_norm_factor(pf, li, self.norm, raw, self.window), 1e-30))
        return out

    def select(self, pf: Prefill, b: Budget):
        s = torch.stack(self.normalised_scores(pf, b.layers))  # (L, G, m)
        floor = min(self.head_floor, self.selectable(b) // (b.layers * b.kv_heads))  # never over the budget
        keep = topk_per_row(s.flatten(0, 1), floor).view_as(s) if floor else torch.zeros_like(s, dtype=torch.bool)
        keep |= topk_flat(masked(s, keep), self.selectable(b) - int(keep.sum()))
        keeps = [with_window(k, self.window) for k in keep]
        keep_all, sc = stack_layers(keeps, [pad_scores(x.masked_fill(x.isinf(), float("nan")), self.window) for x in s])
        return keep_all, sc, {"layer_budgets": keep_all.sum((1, 2)).tolist(), "norm": self.norm}


class GlobalCascade:
    """Cascading FlowKV (global): as each layer finishes prefill, merge its scores into the running selection and
    evict everything below the running k-th largest. Global top-k over a growing set is monotone, so the final
    selection equals the one-shot one exactly (tested), while only ≈ budget + one layer is ever held.

    Use: c = GlobalCascade(k); per layer `c.add(layer, scores (G, m))`; then `c.keep_mask(layer)` → (G, m) bool,
    what is still kept of that layer (entries only ever leave), and `c.kept_counts()` → kept entries per layer.
    Everything stays on the scores' device and nothing waits for it (no host synchronisation), so a caller decides
    itself when to read counts back and re-pack its cache."""

    def __init__(self, k: int):
        self.k = int(k)
        self.vals: torch.Tensor | None = None  # (≤ k,) kept scores, in increasing flat-id order
        self.ids: torch.Tensor | None = None  # (≤ k,) their flat ids
        self.alive: torch.Tensor | None = None  # (entries seen,) bool: still selected
        self.shapes: dict[int, tuple[int, int]] = {}
        self.offset: dict[int, int] = {}
        self._next = 0

    def add(self, layer: int, scores: torch.Tensor) -> None:
        """Merge one layer's scores (G, m); ties go to the earlier flat id (earlier layer, head, token)."""
        G, m = scores.shape
        dev = scores.device
        self.shapes[layer], self.offset[layer] = (G, m), self._next
        ids = torch.arange(self._next, self._next + G * m, device=dev)
        self._next += G * m
        vals = scores.detach().float().reshape(-1)
        alive = torch.ones(G * m, dtype=torch.bool, device=dev)
        if self.vals is not None:  # kept ids are increasing and below the new ones: flat order is kept
            vals, ids = torch.cat([self.vals, vals]), torch.cat([self.ids, ids])
            alive = torch.cat([self.alive, alive])
        kk = min(self.k, vals.numel())
        top = torch.sort(vals, descending=True, stable=True).indices[:kk].sort().values  # the k best, flat order
        alive[ids] = False
        self.vals, self.ids = vals[top], ids[top]
        alive[self.ids] = True
        self.alive = alive

    def keep_mask(self, layer: int) -> torch.Tensor:
        """(G, m) bool: the entries of `layer` still selected (a copy)."""
        G, m = self.shapes[layer]
        o = self.offset[layer]
        return self.alive[o: o + G * m].view(G, m).clone()

    def keep_masks(self) -> dict[int, torch.Tensor]:
        return {layer: self.keep_mask(layer) for layer in self.shapes}

    def kept_counts(self) -> dict[int, torch.Tensor]:
        """Entries still selected per layer, as 0-d tensors on the device (reading them synchronises)."""
        return {layer: self.alive[o: o + self.shapes[layer][0] * self.shapes[layer][1]].sum()
                for layer, o in self.offset.items()}
