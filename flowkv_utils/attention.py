"""The one place that computes queries/keys/values and attention weights.

Shapes use H query heads, G KV heads (group size r = H // G), head dim d, model dim D, n cached tokens,
w window queries. Softmax is always taken in float32, whatever the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the Hugging Face (half-split) layout; x (..., T, d), cos/sin broadcast to it."""
    return x * cos + rotate_half(x) * sin


def project_qkv(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (B,H,T,d), k (B,G,T,d), v (B,G,T,d) of a HF attention module (Llama/Mistral/Qwen2/Qwen3 layout),
    after the optional per-head q/k norms (Qwen3) and RoPE. x: (B, T, D) normed hidden states; cos/sin (B,T,d)."""
    B, T, _ = x.shape
    d = attn.head_dim
    q = attn.q_proj(x).view(B, T, -1, d)
    k = attn.k_proj(x).view(B, T, -1, d)
    v = attn.v_proj(x).view(B, T, -1, d).transpose(1, 2)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, d)
    return apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin), v


def scaling_of(attn) -> float:
    return float(getattr(attn, "scaling", attn.head_dim ** -0.5))


HALF = (torch.bfloat16, torch.float16)  # input dtypes whose products float32 holds exactly


def window_attention(q: torch.Tensor, k: torch.Tensor, scaling: float, n_past: int | None = None) -> torch.Tensor:
    """Attention weights A (H, w, n) of w window queries over n keys, float32, causal.

    q: (H, w, d), the queries at positions n_past .. n_past + w - 1 (default: the last w of the n keys);
    k: (G, n, d). Query head h reads KV head h // (H // G)."""
    H, w, d = q.shape
    G, n, _ = k.shape
    n_past = n - w if n_past is None else n_past
    if q.is_cuda and q.dtype in HALF and k.dtype == q.dtype:
        # bf16/fp16 products are exact in float32 and cuBLAS accumulates them in float32: the tensor-core GEMM with a
        # float32 output gives the float32 logits (up to summation order) without casting K to float32
        logits = torch.bmm(q.reshape(G, H // G * w, d), k.transpose(1, 2), out_dtype=torch.float32)
        logits = logits.view(H, w, n).mul_(scaling)
    else:
        qf = q.float().view(G, H // G, w, -1)
        logits = torch.einsum("grwd,gnd->grwn", qf, k.float()).reshape(H, w, n) * scaling
    # causal: only keys after n_past can lie after a window query, so the mask touches those columns alone
    pos_q = torch.arange(n_past, n_past + w, device=q.device).unsqueeze(1)
    pos_k = torch.arange(n_past, n, device=q.device).unsqueeze(0)
    logits[..., n_past:].masked_fill_(pos_k > pos_q, float("-inf"))
    return torch.softmax(logits, dim=-1)


COLUMN_SUM_ELEMENTS = 2**26  # attention weights held at once by `attention_column_sums` (256 MiB of float32)


def attention_column_sums(q: torch.Tensor, k: torch.Tensor, scaling: float,
                          max_elements: int = COLUMN_SUM_ELEMENTS) -> torch.Tensor:
    """Accumulated causal attention of every prompt query: c_h[j] = Σ_i A_h[i, j] (H2O's score), (H, n) float32.

    q: (H, n, d) every prompt query (after RoPE), k: (G, n, d). One block of query rows at a time (at most
    ~max_elements weights per block), so no n × n map is ever held: per block one batched GEMM of every query head
    of a KV group against the keys it sees (scaled in the GEMM), the causal mask on the block's own diagonal part
    only, a softmax, and the sum over its rows. The same weights as `window_attention` (float32 rounding aside); the
    block size changes only the summation order, never which weights are summed."""
    H, n, d = q.shape
    G = k.shape[0]
    r = H // G
    rows = max(1, max_elements // (H * n))  # query rows per block
    out = torch.zeros(H, n, dtype=torch.float32, device=q.device)
    kt = k.float().transpose(1, 2)  # (G, d, n)
    qg = q.float().view(G, r, n, d)
    for s in range(0, n, rows):
        e = min(n, s + rows)  # rows s..e-1 see keys 0..e-1
        c = e - s
        qb = qg[:, :, s:e].reshape(G, r * c, d)
        logits = torch.baddbmm(qb.new_empty(()), qb, kt[:, :, :e], beta=0, alpha=scaling).view(G, r, c, e)
        future = torch.ones(c, c, dtype=torch.bool, device=q.device).triu_(1)  # key s+j' after query s+i
        logits[..., s:e].masked_fill_(future, float("-inf"))
        out[:, :e] += torch.softmax(logits, dim=-1).sum(dim=2).view(H, e)
    return out


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                     chunk: int | None = None) -> torch.Tensor:
    """Causal self-attention output (B, H, T, d) for a full prompt, GQA-aware, via SDPA.

    `chunk` splits the queries so that no T×T matrix is ever materialised (long prompts on GPU)."""
    B, H, T, d = q.shape
    G = k.shape[1]
    if G != H:
        k = k.repeat_interleave(H // G, dim=1) if chunk is None else k
        v = v.repeat_interleave(H // G, dim=1) if chunk is None else v
    if chunk is None or chunk >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=k.shape[1] != H)
    out = torch.empty_like(q)
    pos_k = torch.arange(T, device=q.device)
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        if q.is_cuda:  # bottom-right causal bias: SDPA runs flash attention, no (e-s) × e mask or logits in memory
            from torch.nn.attention.bias import causal_lower_right
            mask = causal_lower_right(e - s, e)
        else:
            mask = pos_k[:e].unsqueeze(0) <= torch.arange(s, e, device=q.device).unsqueeze(1)  # (e-s, e)
        out[:, :, s:e] = F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], attn_mask=mask,
                                                        scale=scaling, enable_gqa=G != H)
    return out
