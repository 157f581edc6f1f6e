"""FlowKV's derived score as one fused Triton kernel (the readable PyTorch version is
`policies.flowkv.flowkv_scores`, which calls this one on CUDA):

    s_g[j]² = Σ_{a≤b∈g} c_ab (A_a[:, j]·A_b[:, j]) (v_j M_ab v_jᵀ),   c = 1 on the diagonal, 2 off it,

with M_ab = W_O^a W_O^bᵀ the Gram blocks of the layer's output projection. v_j M_ab is a tensor-core product that
is never written to memory. Launch settings are a `ScoreConfig` value passed in, never a module global. A leaf
module: it imports nothing else of the project.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._triton import built, pow2_pad, replace_fields

PRECISIONS = ("split", "tf32x3", "tf32", "ieee")


@dataclass(frozen=True)
class ScoreConfig:
    """Launch settings of the score kernel (benchmarks/NOTES.md). tokens: tokens per program; cols: columns of M
    per product. precision: 'split' (M = M_hi + M_lo, two TF32 products: float32 accuracy when v is bf16/fp16,
    which TF32 holds exactly; other v fall back to 'tf32x3'), or a tl.dot input precision: 'tf32x3' (three TF32
    products), 'tf32' (one: ≈ 1e-3 relative), 'ieee' (CUDA cores)."""

    tokens: int = 64
    cols: int = 32
    num_warps: int = 4
    num_stages: int = 2
    precision: str = "split"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"ScoreConfig: precision={self.precision!r}; allowed: {', '.join(PRECISIONS)}")

    def replace(self, **changes) -> ScoreConfig:
        """A copy with some settings changed; unknown names raise, naming the known ones."""
        return replace_fields(self, **changes)


DEFAULT_SCORE_CONFIG = ScoreConfig()


def _build() -> dict:
    import triton
    import triton.language as tl

    @triton.jit
    def flowkv_score_kernel(A, V, M, M_LO, OUT, m, s_ah, s_aw, s_vg, s_vj,
                            R: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr, D: tl.constexpr,
                            D_PAD: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, PREC: tl.constexpr,
                            TWO: tl.constexpr):
        # one program per (block of BT tokens, KV head g): s_g[j]² = Σ_{a≤b} c_ab (A_a·A_b)[j] (v_j M_ab v_jᵀ),
        # c = 1 on the diagonal, 2 off it; v_j M_ab is a (BT, d) @ (d, BE) tensor-core product, never stored.
        # TWO: M = M_hi + M_lo with M_hi exact in TF32 (v too: bf16/fp16), so two TF32 products give float32 accuracy
        tb = tl.program_id(0)
        g = tl.program_id(1)
        t = tb * BT + tl.arange(0, BT)
        tmask = t < m
        dd = tl.arange(0, D_PAD)
        dmask = dd < D
        ww = tl.arange(0, W_PAD)
        ee = tl.arange(0, BE)
        vbase = V + g.to(tl.int64) * s_vg + t.to(tl.int64)[:, None] * s_vj
        v = tl.load(vbase + dd[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        amask = (ww < W)[:, None] & tmask[None, :]
        s2 = tl.zeros([BT], tl.float32)
        for a in tl.static_range(R):
            Aa = tl.load(A + (g * R + a).to(tl.int64) * s_ah + ww[:, None] * s_aw + t[None, :], mask=amask, other=0.0)
            for b in tl.static_range(a, R):
                Ab = tl.load(A + (g * R + b).to(tl.int64) * s_ah + ww[:, None] * s_aw + t[None, :], mask=amask,
                             other=0.0)
                aa = tl.sum(Aa * Ab, 0)  # (BT,) attention inner products over the window
                mo = ((g * R + a) * R + b).to(tl.int64) * D * D
                q = tl.zeros([BT], tl.float32)
                for e0 in tl.static_range(0, D_PAD, BE):
                    e = e0 + ee
                    emask = e < D
                    moff = mo + dd[:, None] * D + e[None, :]
                    mk = dmask[:, None] & emask[None, :]
                    tv = tl.dot(v, tl.load(M + moff, mask=mk, other=0.0), input_precision=PREC)  # (BT, BE)
                    if TWO:
                        tv += tl.dot(v, tl.load(M_LO + moff, mask=mk, other=0.0), input_precision=PREC)
                    ve = tl.load(vbase + e[None, :], mask=tmask[:, None] & emask[None, :], other=0.0)
                    q += tl.sum(tv * ve.to(tl.float32), 1)  # v_j M_ab v_jᵀ, BE columns at a time
                s2 += (1.0 if a == b else 2.0) * aa * q
        tl.store(OUT + g.to(tl.int64) * m + t, tl.sqrt(tl.maximum(s2, 0.0)), mask=tmask)

    return {"flowkv_score": flowkv_score_kernel}


def tf32_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x = hi + lo exactly, with hi rounded to TF32 (10 mantissa bits), so hi converts to TF32 without error and
    lo's conversion error is ≈ 2⁻¹¹ of lo, i.e. ≈ 2⁻²² of x: float32 accuracy from two TF32 products."""
    x = x.float().contiguous()
    hi = ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)
    return hi, x - hi


def flowkv_scores_triton(A: torch.Tensor, v: torch.Tensor, gram: torch.Tensor, m: int,
                         config: ScoreConfig = DEFAULT_SCORE_CONFIG) -> torch.Tensor:
    """FlowKV's Gram-form score (`policies.flowkv.flowkv_scores`) as one Triton kernel: A (H, w, n) float32,
    v (G, n, d), gram (G, r, r, d, d) float32 → (G, m) float32. Nothing per (token, pair) is written to memory."""
    G, r = gram.shape[:2]
    d = gram.shape[-1]
    H, w, n = A.shape
    A = A.float()
    if A.stride(-1) != 1:
        A = A.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    out = torch.empty(G, m, dtype=torch.float32, device=A.device)
    if m == 0:
        return out
    prec = config.precision
    if prec == "split" and v.dtype not in (torch.bfloat16, torch.float16):
        prec = "tf32x3"
    two = prec == "split"
    if two:
        gram, lo = tf32_split(gram)
    else:
        gram = gram.float().contiguous()
        lo = gram
    d_pad = pow2_pad(d)
    kern = built("flowkv_score", _build)["flowkv_score"]
    kern[(math.ceil(m / config.tokens), G)](A, v, gram, lo, out, m, A.stride(0), A.stride(1), v.stride(0),
                                            v.stride(1), R=r, W=w, W_PAD=pow2_pad(w), D=d, D_PAD=d_pad,
                                            BT=config.tokens, BE=min(config.cols, d_pad),
                                            PREC="tf32" if two else prec, TWO=two, num_warps=config.num_warps,
                                            num_stages=config.num_stages)
    return out
