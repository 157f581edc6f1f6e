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


def projected_values(pf: Prefill, layer: int) -> torch.Tensor:
    """P_h = V_{g(h)} W_O^h for every query head: (H, n, D), float32."""
    s = pf.shape
    v = pf.layers[layer].v.float().repeat_interleave(s.group, dim=0)  # (H, n, d): head h reads KV head h // r
    return torch.einsum("hnd,hdD->hnD", v, pf.w_o(layer).float())


def head_contributions(pf: Prefill, layer: int) -> torch.Tensor:
    """C_h = A_h P_h: (H, w, D). Their sum (+ b_O) is the attention block output on the window."""
    return torch.einsum("hwn,hnD->hwD", pf.attn(layer), projected_values(pf, layer))


def attention_output(pf: Prefill, layer: int) -> torch.Tensor:
    """O via the standard route concat_h(A_h V_h) W_O + b_O: (w, D), float32 — the left side of the identity."""
    s = pf.shape
    v = pf.layers[layer].v.float().repeat_interleave(s.group, dim=0)
    ctx = torch.einsum("hwn,hnd->whd", pf.attn(layer), v).reshape(pf.attn(layer).shape[1], -1)
    W = pf.model.model.layers[layer].self_attn.o_proj.weight.float()
    b = pf.b_o(layer)
    return ctx @ W.T + (0 if b is None else b.float())


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


def renormalised_output(pf: Prefill, layer: int, keep_inner: torch.Tensor) -> torch.Tensor:
    """What eviction really computes: softmax renormalised over the kept (head, token) pairs, then Σ_h A'_h P_h.

    keep_inner: bool (H, n) — which tokens each *query* head still sees. Returns (w, D) (+ b_O)."""
    A = pf.attn(layer) * keep_inner.unsqueeze(1)
    A = A / A.sum(-1, keepdim=True).clamp_min(1e-30)
    out = torch.einsum("hwn,hnD->wD", A, projected_values(pf, layer))
    b = pf.b_o(layer)
    return out + (0 if b is None else b.float())


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
