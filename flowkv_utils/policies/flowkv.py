"""FlowKV — the project's *derived* reading of LaProx (arXiv 2605.07234; only the abstract is public).

Eviction as an output-aware, layer-wise approximate matrix multiplication (notebook 01): the window output of a
layer is O = X·Y with one inner index per (query head, token); evicting token j of KV head g removes the inner
indices (h, j) for all h in g. Its score is the Frobenius norm of everything that entry contributes to O:

    s_g[j] = ‖ Σ_{h∈g} A_h[:, j] P_h[j, :]ᵀ ‖_F,   P_h = V_g W_O^h,
    s_g[j]² = Σ_{h,h'∈g} (A_h[:, j]·A_{h'}[:, j]) (V_g[j] M_{hh'} V_g[j]ᵀ),   M_{hh'} = W_O^h W_O^{h'ᵀ} (d × d).

Cross terms capture reinforcement/cancellation between query heads sharing an entry; with G = H it is DKM's
column–row product ‖A_h[:, j]‖·‖V_h[j] W_O^h‖. The Gram blocks M are computed once per layer weight. On CUDA the
sum runs as one Triton kernel (`kernels.flowkv_score`, float32 accuracy); `flowkv_scores` below is the
readable PyTorch version, used on CPU and tested against the direct transcription.

Ablations of the score (`form`, `p`; the registered variants are in ablations.py): "no_cross" drops the cross
terms, s_g[j]² = Σ_{h∈g} ‖A_h[:, j]‖² ‖P_h[j]‖²; "per_head" sums the per-head DKM products,
s_g[j] = Σ_{h∈g} ‖A_h[:, j]‖ ‖P_h[j]‖ (an upper bound of the exact score); p = 1 takes the entrywise L1 norm of the
contribution instead of the Frobenius norm (`ablation_scores`, PyTorch on every device).

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
from ..kernels import DEFAULT_SCORE_CONFIG, ScoreConfig, flowkv_scores_triton, use_triton
from .base import Policy, check_choice, check_odd_kernel, check_param, pool1d

_GRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def gram_blocks(w_o: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """M[g, a, b] = W_O^{h_a} W_O^{h_b ᵀ} for the heads h_a, h_b of group g: (G, r, r, d, d), float32."""
    H, d, D = w_o.shape
    wg = w_o.float().view(kv_heads, H // kv_heads, d, D)
    return torch.einsum("gadD,gbeD->gabde", wg, wg)


def _weight_state(o_proj) -> list[tuple[weakref.ref, int]]:
    """What W_O is read from: the weight (and an FP8 weight's scale) tensors, by identity (a module may be given new
    ones: `quant.quantize_model_` quantises a tensor-parallel o_proj in place), and their in-place versions."""
    return [(weakref.ref(t), t._version) for t in (o_proj.weight, getattr(o_proj, "weight_scale", None))
            if t is not None]


def _same_state(a: list[tuple[weakref.ref, int]], b: list[tuple[weakref.ref, int]]) -> bool:
    return len(a) == len(b) and all(ra() is not None and ra() is rb() and va == vb
                                    for (ra, va), (rb, vb) in zip(a, b, strict=True))


def cached_gram(pf: Prefill, layer: int) -> torch.Tensor:
    """Gram blocks of a layer, computed once per weight tensor (and recomputed if it changes or is replaced)."""
    o_proj = pf.model.model.layers[layer].self_attn.o_proj
    state = _weight_state(o_proj)
    hit = _GRAMS.get(o_proj)
    if hit is None or not _same_state(hit[0], state):
        hit = (state, gram_blocks(pf.w_o(layer).detach(), pf.shape.kv_heads))
        _GRAMS[o_proj] = hit
    return hit[1]


def flowkv_scores(A: torch.Tensor, v: torch.Tensor, gram: torch.Tensor, m: int | None = None,
                  chunk: int = 8192, impl: str = "auto", config: ScoreConfig = DEFAULT_SCORE_CONFIG) -> torch.Tensor:
    """s_g[j] for j < m: exact group output-contribution norms via Gram blocks. A (H, w, n), v (G, n, d),
    gram (G, r, r, d, d) → (G, m) float32.

    Both factors are symmetric in (a, b), so only the P = r(r+1)/2 pairs a ≤ b are formed (off-diagonal ones
    counted twice), and the projected-value products v_j M_ab v_jᵀ of all pairs come from one batched GEMM
    (c, d) @ (d, P·d) per KV head: that GEMM is nearly all of the cost. Chunked over tokens so nothing of size
    n·P·d is held at once. impl: 'torch' (this code), 'triton' (`kernels.flowkv_scores_triton`, the same sum in one
    fused GPU kernel, launched with `config`) or 'auto' (triton on CUDA when it imports)."""
    m = A.shape[-1] if m is None else m
    if use_triton(impl, A):
        return flowkv_scores_triton(A, v, gram, m, config)
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


FORMS = ("exact", "no_cross", "per_head")
ORDERS = (2, 1)  # p: the norm of the contribution matrix, 2 Frobenius, 1 entrywise L1
MAX_FLOATS = 1 << 26  # float32 elements the chunked L1 forms hold at once


def head_value_norms(v: torch.Tensor, p: int, gram: torch.Tensor | None = None, w_o: torch.Tensor | None = None,
                     m: int | None = None, max_floats: int = MAX_FLOATS) -> torch.Tensor:
    """‖P_h[j]‖_p = ‖V_g[j] W_O^h‖_p for every query head h of every group g, j < m: (G, r, m) float32.
    p = 2 from the diagonal Gram blocks, ‖P_h[j]‖² = v_j M_hh v_jᵀ (gram (G, r, r, d, d); O(m·H·d²));
    p = 1 from the products themselves (w_o (H, d, D); O(m·H·d·D)), in token chunks of ≤ max_floats floats."""
    G, n, d = v.shape
    m = n if m is None else m
    if p == 2:
        diag = gram.diagonal(dim1=1, dim2=2).permute(0, 3, 1, 2)  # (G, r, d, d): M_hh
        r = diag.shape[1]
        out = torch.empty(G, r, m, dtype=torch.float32, device=v.device)
        chunk = max(1, max_floats // (G * r * d))
        for s in range(0, m, chunk):
            e = min(m, s + chunk)
            vv = v[:, s:e].float()  # (G, c, d)
            q = torch.einsum("gcd,gade->gace", vv, diag)  # (G, r, c, d): v_j M_hh
            out[..., s:e] = (q * vv.unsqueeze(1)).sum(-1).clamp_min(0).sqrt()
        return out
    H, _, D = w_o.shape
    r = H // G
    wo = w_o.detach().float().view(G, r, d, D)
    out = torch.empty(G, r, m, dtype=torch.float32, device=v.device)
    chunk = max(1, max_floats // (H * D))
    for s in range(0, m, chunk):
        e = min(m, s + chunk)
        P = torch.einsum("gcd,gadD->gacD", v[:, s:e].float(), wo)  # (G, r, c, D)
        out[..., s:e] = P.abs().sum(-1)
    return out


def exact_l1_scores(A: torch.Tensor, v: torch.Tensor, w_o: torch.Tensor, m: int | None = None,
                    max_floats: int = MAX_FLOATS) -> torch.Tensor:
    """Σ_{i,c} |Σ_{h∈g} A_h[i, j] P_h[j, c]| for j < m: the entrywise L1 norm of each entry's w×D contribution,
    built explicitly (no Gram form exists for L1). A (H, w, n), v (G, n, d), w_o (H, d, D) → (G, m) float32.
    Cost per layer O(m·H·d·D) MACs for the projected values plus O(m·H·w·D) for the head sums (Llama-3.1-8B at 128K:
    ≈2.2·10¹² + 0.6·10¹², the direct transcription's cost, ≈25× the exact L2 Gram form), in token chunks of c tokens,
    G·c·(w + r)·D ≤ max_floats floats at once."""
    H, w, n = A.shape
    G, _, d = v.shape
    m = n if m is None else m
    r, D = H // G, w_o.shape[-1]
    wo = w_o.detach().float().view(G, r, d, D)
    Ag = A.view(G, r, w, n)
    out = torch.empty(G, m, dtype=torch.float32, device=A.device)
    chunk = max(1, max_floats // (G * (w + r) * D))
    for s in range(0, m, chunk):
        e = min(m, s + chunk)
        P = torch.einsum("gcd,gadD->gacD", v[:, s:e].float(), wo)  # (G, r, c, D): P_h[j] of the chunk
        contrib = torch.einsum("gawc,gacD->gcwD", Ag[..., s:e].float(), P)  # (G, c, w, D): Σ_h A_h[:, j] P_h[j]ᵀ
        out[:, s:e] = contrib.abs().sum((-2, -1))
    return out


def ablation_scores(A: torch.Tensor, v: torch.Tensor, form: str, p: int, m: int | None = None,
                    gram: torch.Tensor | None = None, w_o: torch.Tensor | None = None,
                    max_floats: int = MAX_FLOATS) -> torch.Tensor:
    """The score ablations (`FORMS` × `ORDERS`, but not the default exact/L2 — `flowkv_scores`), (G, m) float32:
    no_cross (p = 2)  sqrt(Σ_{h∈g} ‖A_h[:, j]‖₂² ‖P_h[j]‖₂²)  — the diagonal pairs a = b of the Gram-block sum;
    per_head          Σ_{h∈g} ‖A_h[:, j]‖_p ‖P_h[j]‖_p        — the norm of each rank-1 head term, summed;
    exact (p = 1)     Σ_{i,c} |Σ_{h∈g} A_h[i, j] P_h[j, c]|   — `exact_l1_scores`.
    A (H, w, n), v (G, n, d); gram (G, r, r, d, d) for p = 2, w_o (H, d, D) for p = 1. PyTorch on A's device."""
    H, w, n = A.shape
    G = v.shape[0]
    m = n if m is None else m
    if form == "exact":
        if p != 1:
            raise ValueError("ablation_scores: form='exact' with p=2 is `flowkv_scores`")
        return exact_l1_scores(A, v, w_o, m, max_floats)
    if form == "no_cross" and p != 2:
        raise ValueError(f"form='no_cross' with p={p!r} is invalid: no_cross is an L2 identity; use p=2")
    if form not in FORMS:
        raise ValueError(f"form={form!r}: allowed are {', '.join(FORMS)}")
    a = A[..., :m].float().norm(p=p, dim=1).view(G, H // G, m)  # (G, r, m): ‖A_h[:, j]‖_p
    prod = a * head_value_norms(v, p, gram, w_o, m, max_floats)  # (G, r, m)
    return prod.square().sum(1).sqrt() if form == "no_cross" else prod.sum(1)


NORMALISATIONS = ("N0", "N1", "N2", "N3")


@dataclass
class FlowKV(Policy):
    """FlowKV layer-wise (derived): heads of a layer compete for its budget by their effect on the output.
    score_config: launch settings of the CUDA score kernel (does not change the scores beyond float32 rounding).
    form, p: score ablations (`FORMS`, `ORDERS`; see `ablation_scores`); "exact" with p = 2 is the derived score."""

    sinks: int = 0  # optional attention sinks kept in every head, counted inside the budget
    kernel: int = 1  # optional max-pooling of the scores (ablation; 1 = the pure derived score)
    score_config: ScoreConfig = DEFAULT_SCORE_CONFIG
    form: str = "exact"  # "exact" | "no_cross" (no cross terms between query heads) | "per_head" (Σ_h of products)
    p: int = 2  # 2: Frobenius norm of the contribution | 1: its entrywise L1 norm
    name = "flowkv"
    role = "derived"
    head_adaptive = True
    output_aware = True
    rule = "layer"  # the heads of a layer compete: one top-k over its flattened scores
    recorded_when_set = ("form", "p")  # added after results were stored

    def __post_init__(self) -> None:
        super().__post_init__()
        check_param(self.name, "sinks", self.sinks, isinstance(self.sinks, int) and self.sinks >= 0,
                    "an int ≥ 0 (first tokens always kept, counted in the budget)")
        check_odd_kernel(self.name, self.kernel)
        check_param(self.name, "score_config", self.score_config, isinstance(self.score_config, ScoreConfig),
                    "a kernels.ScoreConfig")
        check_choice(self.name, "form", self.form, FORMS,
                     "'exact' (the derived score), 'no_cross' (without the cross terms between query heads), "
                     "'per_head' (Σ_h of the per-head column–row products)")
        check_param(self.name, "p", self.p, isinstance(self.p, int) and not isinstance(self.p, bool)
                    and self.p in ORDERS, "2 (Frobenius norm) or 1 (entrywise L1 norm)")
        if self.form == "no_cross" and self.p != 2:
            raise ValueError(f"{self.name}: form='no_cross' with p={self.p!r} is invalid: no_cross drops the cross "
                             "terms of the squared Frobenius norm, an L2 identity; use p=2, or form='exact' or "
                             "'per_head' with p=1")

    def layer_scores(self, pf: Prefill, layer: int) -> torch.Tensor:
        """(G, n − w) derived scores; sinks (if any) get +inf so they are always kept."""
        m = pf.n - self.window
        A, v = self.attn(pf, layer), pf.layers[layer].v
        if self.form == "exact" and self.p == 2:
            s = flowkv_scores(A, v, cached_gram(pf, layer), m, config=self.score_config)
        else:
            gram, w_o = (cached_gram(pf, layer), None) if self.p == 2 else (None, pf.w_o(layer))
            s = ablation_scores(A, v, self.form, self.p, m, gram=gram, w_o=w_o)
        s = pool1d(s, self.kernel)
        if self.sinks:
            s[:, : self.sinks] = float("inf")
        return s


def layer_norm_factor(pf: Prefill, layer: int, norm: str, raw: torch.Tensor,
                      window: int | None = None) -> torch.Tensor:
    """Divisor that makes layer scores comparable, a 0-d float32 tensor on the scores' device (not read back, so
    the layer-wise compressor does not wait for the device here): N0 1, N1 ‖O_ℓ‖_F, N2 ‖h_ℓ‖_F, N3 Σ raw scores
    (the finite ones; selecting them reads the device). O_ℓ and h_ℓ are taken on the last `window` rows (the
    policy's window; None: every captured row)."""
    rows = slice(-window, None) if window else slice(None)
    if norm == "N0":
        return torch.ones((), dtype=torch.float32, device=raw.device)
    if norm == "N1":
        return pf.layers[layer].attn_out[rows].float().norm()
    if norm == "N2":
        return pf.layers[layer].resid[rows].float().norm()
    if norm == "N3":
        return raw[torch.isfinite(raw)].sum()
    raise ValueError(f"norm={norm!r}: allowed are {', '.join(NORMALISATIONS)}")


def divided(x: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """x / d for float32 x and a 0-d float32 tensor d on x's device: bit for bit `x / float(d)`, without reading d
    back to the host. PyTorch divides by a host scalar on the CPU, but on CUDA multiplies by its correctly rounded
    float32 reciprocal (`div_true_kernel_cuda`), which `reciprocal` computes on the device (tested on both)."""
    return x * divisor.reciprocal() if x.is_cuda else x / divisor


@dataclass
class FlowKVGlobal(FlowKV):
    """FlowKV with one model-wide budget (derived): normalised scores, one top-k over every (ℓ, g, j).
    head_floor: tokens every head keeps beyond its window (capped so the floors never exceed the budget); the one
    top-k — and the cascade while prefilling — keeps them first (`selection.floor_first`)."""

    norm: str = "N2"
    head_floor: int = 0
    name = "flowkv_global"
    scope = "model"
    layer_adaptive = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_param(self.name, "norm", self.norm, self.norm in NORMALISATIONS,
                    f"one of {', '.join(NORMALISATIONS)} (N0 raw, N1 ‖O_ℓ‖, N2 ‖h_ℓ‖, N3 per-layer sum 1)")
        check_param(self.name, "head_floor", self.head_floor,
                    isinstance(self.head_floor, int) and self.head_floor >= 0, "an int ≥ 0 (tokens per head)")

    def normalised_scores(self, pf: Prefill, layer: int) -> torch.Tensor:
        """(G, n − w) layer scores divided by the layer's norm factor (comparable across layers)."""
        def compute():
            raw = self.scores(pf, layer)
            return divided(raw, layer_norm_factor(pf, layer, self.norm, raw, self.window).clamp_min(1e-30))

        return pf.memo(layer, ("normalised_scores", repr(self)), compute)

    def model_floor(self, b: Budget) -> int:
        """Tokens per head guaranteed beyond the window (head_floor, capped at the selectable share)."""
        return min(self.head_floor, self.selectable(b) // (b.layers * b.kv_heads))

    def model_scores(self, pf: Prefill, layer: int, b: Budget) -> torch.Tensor:
        return self.normalised_scores(pf, layer)
