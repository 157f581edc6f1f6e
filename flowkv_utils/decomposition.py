"""Head-wise decomposition of multi-head attention and its layer-wise matrix-multiplication view (notebook 01).

For one layer and the w window queries (method.md §1):
    O = concat_h(A_h V_{g(h)}) W_O + b_O = Σ_h A_h V_{g(h)} W_O^h + b_O = Σ_h C_h + b_O,
    C_h = A_h P_h,  P_h = V_{g(h)} W_O^h ∈ R^{n×D}  (the projected values).
Matrix-multiplication view: O − b_O = X Y, X = [A_1 | … | A_H] ∈ R^{w×Hn}, Y = [P_1; …; P_H] ∈ R^{Hn×D}; inner
index i = h·n + j is the (head h, token j) pair. Under GQA, evicting token j of KV head g removes the inner
indices (h, j) of every query head h in g at once: that KV entry's contribution is Σ_{h∈g} A_h[:, j] ⊗ P_h[j].
"""

from __future__ import annotations

import torch

from .capture import Prefill
from .quant import dense_weight


@torch.no_grad()
def projected_values(pf: Prefill, layer: int) -> torch.Tensor:
    """P_h = V_{g(h)} W_O^h for every query head: (H, n, D), float32."""
    s = pf.shape
    v = pf.layers[layer].v.float().repeat_interleave(s.group, dim=0)  # (H, n, d): head h reads KV head h // r
    return torch.einsum("hnd,hdD->hnD", v, pf.w_o(layer).float())


@torch.no_grad()
def head_contributions(pf: Prefill, layer: int) -> torch.Tensor:
    """C_h = A_h P_h: (H, w, D). Their sum (+ b_O) is the attention block output on the window."""
    return torch.einsum("hwn,hnD->hwD", pf.attn(layer), projected_values(pf, layer))


@torch.no_grad()
def attention_output(pf: Prefill, layer: int) -> torch.Tensor:
    """O via the standard route concat_h(A_h V_h) W_O + b_O: (w, D), float32 — the left side of the identity."""
    s = pf.shape
    v = pf.layers[layer].v.float().repeat_interleave(s.group, dim=0)
    ctx = torch.einsum("hwn,hnd->whd", pf.attn(layer), v).reshape(pf.attn(layer).shape[1], -1)
    W = dense_weight(pf.model.model.layers[layer].self_attn.o_proj).float()  # as head_wo reads it (FP8: dequantised)
    b = pf.b_o(layer)
    return ctx @ W.T + (0 if b is None else b.float())


@torch.no_grad()
def mm_factors(pf: Prefill, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """X = [A_1 | … | A_H] (w, H·n) and Y = [P_1; …; P_H] (H·n, D); inner index i = h·n + j."""
    A = pf.attn(layer)  # (H, w, n)
    H, w, n = A.shape
    X = A.permute(1, 0, 2).reshape(w, H * n)
    Y = projected_values(pf, layer).reshape(H * n, -1)
    return X, Y


def inner_products(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """DKM importance of each inner index: ‖X[:, i]‖₂ ‖Y[i, :]‖₂, (H·n,). Bounds the error of dropping i."""
    return X.norm(dim=0) * Y.norm(dim=1)


def subset_output(X: torch.Tensor, Y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """O_S = Σ_{i∈S} X[:, i] Y[i, :] for a bool mask over inner indices (no renormalisation)."""
    return X[:, keep] @ Y[keep]


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm().clamp_min(1e-30))


@torch.no_grad()
def renormalised_output(pf: Prefill, layer: int, keep: torch.Tensor | None = None, P: torch.Tensor | None = None,
                        values: torch.Tensor | None = None, attn: torch.Tensor | None = None) -> torch.Tensor:
    """What eviction really computes: softmax renormalised over the kept tokens, then Σ_h A'_h V_{g(h)} W_O^h + b_O.

    keep: bool (H, n) — which tokens each *query* head still sees — or (G, n) per KV head, applied to every query
    head of its group; None keeps all. A leading batch dimension (B, G|H, n) gives B outputs at once. P: projected
    values (H, n, D) if already computed (else the cheaper route through V then W_O, which never holds an H·n·D
    tensor). values (G, n, d), or (B, G, n, d) with a batch: replacement values (SmoothEvict's merged values)
    instead of the captured V. attn (H, r, n): the attention of other query rows over the prompt (e.g. the held-out
    rows of `metrics.heldout_attention`) instead of the window's. Returns (w, D) float32 (r rows with attn), or
    (B, w, D)."""
    A = pf.attn(layer) if attn is None else attn  # (H, w, n)
    H, G = A.shape[0], pf.layers[layer].v.shape[0]
    if keep is not None:
        m = keep.to(A.device)
        m = m.repeat_interleave(H // G, dim=-2) if m.shape[-2] != H else m  # (..., H, n)
        A = A * m.unsqueeze(-2)  # (..., H, w, n)
        A = A / A.sum(-1, keepdim=True).clamp_min(1e-30)
    if P is not None:
        out = torch.einsum("...hwn,hnD->...wD", A, P)
    else:
        v = (pf.layers[layer].v if values is None else values).float().repeat_interleave(H // G, dim=-3)
        out = torch.einsum("...hwd,hdD->...wD", torch.matmul(A, v), pf.w_o(layer).float())  # v (..., H, n, d)
    b = pf.b_o(layer)
    return out if b is None else out + b.float()


@torch.no_grad()
def kv_entry_contribution_norms(pf: Prefill, layer: int, m: int | None = None) -> torch.Tensor:
    """Direct transcription of FlowKV's derived score: ‖Σ_{h∈g} A_h[:, j] ⊗ P_h[j]‖_F for j < m, (G, m).
    O(w·D) memory per token — the reference the Gram-block implementation in policies/flowkv.py is tested on."""
    s = pf.shape
    A = pf.attn(layer)
    m = A.shape[-1] if m is None else m
    P = projected_values(pf, layer)  # (H, n, D)
    out = torch.empty(s.kv_heads, m)
    for g in range(s.kv_heads):
        hs = slice(g * s.group, (g + 1) * s.group)
        contrib = torch.einsum("hwj,hjD->jwD", A[hs, :, :m], P[hs, :m])  # (m, w, D)
        out[g] = contrib.flatten(1).norm(dim=1)
    return out


# ---- analyses drawn in notebook 01 -------------------------------------------------------------------------


@torch.no_grad()
def head_contribution_norms(pf: Prefill, layers: list[int] | None = None) -> torch.Tensor:
    """‖C_h‖_F for every analysed layer and query head: (len(layers), H), float32 (figure 01a)."""
    layers = list(range(pf.shape.layers)) if layers is None else layers
    return torch.stack([head_contributions(pf, li).flatten(1).norm(dim=1) for li in layers])


@torch.no_grad()
def token_attention_and_contribution(pf: Prefill, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt token j, its share of the window attention and its share of the output contribution: (n,), (n,).

    attention share a[j] = Σ_{h,i} A_h[i, j] / (H·w)  (sums to 1);
    contribution c[j] = ‖Σ_h A_h[:, j] P_h[j, :]ᵀ‖_F (everything token j adds to O over all heads), divided by Σ_j c[j].
    The norm is taken through inner products, ‖Σ_h a_h p_hᵀ‖² = Σ_{h,h'} (a_h·a_h')(p_h·p_h'), so nothing of size
    n·w·D is built."""
    A = pf.attn(layer)  # (H, w, n)
    P = projected_values(pf, layer)  # (H, n, D)
    att = A.sum((0, 1)) / (A.shape[0] * A.shape[1])
    aa = torch.einsum("awj,bwj->abj", A, A)  # (H, H, n)
    pp = torch.einsum("ajD,bjD->abj", P, P)  # (H, H, n)
    contrib = (aa * pp).sum((0, 1)).clamp_min(0).sqrt()
    return att, contrib / contrib.sum().clamp_min(1e-30)


@torch.no_grad()
def per_head_product_scores(pf: Prefill, layer: int, m: int | None = None) -> torch.Tensor:
    """Σ_{h∈g} ‖A_h[:, j]‖₂ ‖P_h[j]‖₂ for j < m: (G, m) — the group sum of DKM column–row products, an upper
    bound (triangle inequality) on FlowKV's exact group score ‖Σ_{h∈g} A_h[:, j] P_h[j]ᵀ‖_F; equal when r = 1."""
    s = pf.shape
    A = pf.attn(layer)
    m = A.shape[-1] if m is None else m
    prod = A[..., :m].norm(dim=1) * projected_values(pf, layer)[:, :m].norm(dim=-1)  # (H, m)
    return prod.view(s.kv_heads, s.group, m).sum(1)


def kv_entry_inner_mask(heads: int, kv_heads: int, n: int, g: int, j: int) -> torch.Tensor:
    """Bool (H·n,) over inner indices i = h·n + j': True at (h, j) for every query head h of KV group g —
    the inner indices that evicting KV entry (g, j) removes from O = X Y."""
    mask = torch.zeros(heads, n, dtype=torch.bool)
    r = heads // kv_heads
    mask[g * r:(g + 1) * r, j] = True
    return mask.flatten()


def topk_mask(scores: torch.Tensor, frac: float) -> torch.Tensor:
    """Bool mask of the top max(1, round(frac·N)) entries of a flat score vector (N,); frac in (0, 1]."""
    if not 0 < frac <= 1:
        raise ValueError(f"frac={frac}: the kept fraction must be in (0, 1]")
    k = max(1, round(frac * scores.numel()))
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[torch.topk(scores.flatten(), k).indices] = True
    return mask.view_as(scores)


SELECTORS = ("attention", "product")


@torch.no_grad()
def inner_selection_errors(pf: Prefill, layer: int, fracs: list[float]) -> list[dict]:
    """Keep the top fraction of inner indices i = (h, j) chosen by attention alone (‖X[:, i]‖) or output-aware
    (‖X[:, i]‖·‖Y[i, :]‖), and measure the error relative to the exact output, for each fraction.

    Rows: layer, selector, frac, kept (number of inner indices), drop_error = ‖E_S‖_F/‖XY‖_F (terms dropped, no
    renormalisation), bound = Σ_{i∉S}‖X[:, i]‖‖Y[i, :]‖ / ‖XY‖_F (DKM), renorm_error = ‖O_S' − O‖_F/‖O‖_F with the
    softmax renormalised over the kept pairs of each query head (what eviction really computes), kept_mass = the
    attention mass a window row keeps (mean over heads and rows; renormalisation divides by it), sink_kept = the
    fraction of query heads whose pair (h, 0) — the first token, usually the attention sink — is kept."""
    X, Y = mm_factors(pf, layer)  # (w, H·n), (H·n, D)
    H, n = pf.shape.heads, pf.n
    XY = X @ Y
    b = pf.b_o(layer)
    out = XY + (0 if b is None else b.float())  # O, the block output
    xn, yn = X.norm(dim=0), Y.norm(dim=1)
    norm_xy, norm_o = XY.norm().clamp_min(1e-30), out.norm().clamp_min(1e-30)
    rows = []
    for selector, scores in zip(SELECTORS, (xn, xn * yn), strict=True):
        for frac in fracs:
            keep = topk_mask(scores, frac)  # (H·n,)
            drop = ~keep
            err = X[:, drop] @ Y[drop]  # E_S = XY − X_S Y_S, (w, D)
            renorm = renormalised_output(pf, layer, keep.view(H, n), P=Y.view(H, n, -1))
            mass = (pf.attn(layer) * keep.view(H, 1, n)).sum(-1).mean()  # kept attention mass, mean over (h, i)
            rows.append(dict(layer=layer, selector=selector, frac=float(frac), kept=int(keep.sum()),
                             drop_error=float(err.norm() / norm_xy),
                             bound=float((xn[drop] * yn[drop]).sum() / norm_xy),
                             renorm_error=float((renorm - out).norm() / norm_o),
                             kept_mass=float(mass), sink_kept=float(keep.view(H, n)[:, 0].float().mean())))
    return rows
