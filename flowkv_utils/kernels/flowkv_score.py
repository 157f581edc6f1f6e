"""FlowKV's derived score as one fused Triton kernel (the readable PyTorch version is
`policies.flowkv.flowkv_scores`, which calls this one on CUDA):

    s_g[j]² = Σ_{a≤b∈g} c_ab (A_a[:, j]·A_b[:, j]) (v_j M_ab v_jᵀ),   c = 1 on the diagonal, 2 off it,

with M_ab = W_O^a W_O^bᵀ the Gram blocks of the layer's output projection. The P = r(r+1)/2 blocks a ≤ b lie side
by side as one (d, P·d) operand, built once per Gram tensor and kept while that tensor lives; each program takes a
block of tokens and walks the operand's column blocks in one pipelined loop (the loads of the next blocks overlap
the current tensor-core product), so v_j M_ab is never written to memory. Float32 accuracy from exact pieces: with
bf16 values M is split into three bf16 pieces (bf16 products are exact in float32 and three pieces hold M to
≈ 2⁻²⁴), with fp16 values into two TF32 halves (fp16 values convert to TF32 exactly). On the H200 at 32K this
runs 0.78 ms a layer, against 1.6 ms for the earlier kernel that unrolled its loops over the pairs and did each
block as two TF32 products (benchmarks/NOTES.md, stop 30).

Launch settings are a `ScoreConfig` value passed in, never a module global. A leaf module: it imports nothing else
of the project.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from ._triton import built, pow2_pad, replace_fields

PRECISIONS = ("split", "tf32x3", "tf32", "ieee")


@dataclass(frozen=True)
class ScoreConfig:
    """Launch settings of the score kernel (benchmarks/NOTES.md). tokens: tokens per program; cols: operand columns
    per product; num_warps; num_stages: depth of the pipelined loop. precision: 'split' (float32 accuracy from
    exact pieces: three bf16 pieces of M for bf16 values, two TF32 halves for fp16; float32 values fall back to
    'tf32x3'), or a tl.dot input precision on float32 operands: 'tf32x3' (three TF32 products), 'tf32' (one:
    ≈ 1e-3 relative), 'ieee' (CUDA cores)."""

    tokens: int = 128
    cols: int = 128
    num_warps: int = 8
    num_stages: int = 2
    precision: str = "split"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"ScoreConfig: precision={self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        for name in ("tokens", "cols"):
            x = getattr(self, name)
            if not (isinstance(x, int) and x >= 16 and x & (x - 1) == 0):
                raise ValueError(f"ScoreConfig: {name}={x!r}; allowed: a power of two ≥ 16 (a tl.dot tile side)")

    def replace(self, **changes) -> ScoreConfig:
        """A copy with some settings changed; unknown names raise, naming the known ones."""
        return replace_fields(self, **changes)


DEFAULT_SCORE_CONFIG = ScoreConfig()


def _build() -> dict:
    import triton
    import triton.language as tl

    @triton.jit
    def flowkv_score_kernel(A, V, MC, OUT, m, s_ah, s_aw, s_vg, s_vj, s_mg, s_mk,
                            R: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr, D: tl.constexpr,
                            D_PAD: tl.constexpr, P: tl.constexpr, P_PAD: tl.constexpr, S: tl.constexpr,
                            BT: tl.constexpr, BE: tl.constexpr, PREC: tl.constexpr, LOW: tl.constexpr,
                            STAGES: tl.constexpr):
        # one program per (block of BT tokens, KV head g). MC[g] is (S·D_PAD, P·D_PAD): the P blocks M_p side by
        # side, each split into S pieces stacked along the rows (zero padded); Σ_s v @ piece_s[:, cols] =
        # v M_p[:, cols]. One column block of one pair per step of the pipelined loop.
        tb = tl.program_id(0)
        g = tl.program_id(1)
        t = tb * BT + tl.arange(0, BT)
        tmask = t < m
        ww = tl.arange(0, W_PAD)
        pp = tl.arange(0, P_PAD)
        amask = (ww < W)[:, None] & tmask[None, :]
        aa = tl.zeros([BT, P_PAD], tl.float32)  # column p: c_ab (A_a·A_b)[j] of pair p = (a, b), a ≤ b
        for a in tl.static_range(R):
            Aa = tl.load(A + (g * R + a).to(tl.int64) * s_ah + ww[:, None] * s_aw + t[None, :], mask=amask, other=0.0)
            for b in tl.static_range(a, R):
                Ab = tl.load(A + (g * R + b).to(tl.int64) * s_ah + ww[:, None] * s_aw + t[None, :], mask=amask,
                             other=0.0)
                x = tl.sum(Aa * Ab, 0) * (1.0 if a == b else 2.0)
                aa = tl.where(pp[None, :] == a * R - (a * (a - 1)) // 2 + (b - a), x[:, None], aa)
        dd = tl.arange(0, D_PAD)
        vbase = V + g.to(tl.int64) * s_vg + t.to(tl.int64)[:, None] * s_vj
        vk = tl.load(vbase + dd[None, :], mask=tmask[:, None] & (dd < D)[None, :], other=0.0)
        vk = vk.to(MC.dtype.element_ty)  # exact: bf16 values into bf16 pieces, bf16/fp16 into TF32
        ee = tl.arange(0, BE)
        mbase = MC + g.to(tl.int64) * s_mg + dd.to(tl.int64)[:, None] * s_mk
        s2 = tl.zeros([BT], tl.float32)
        CPP: tl.constexpr = D_PAD // BE  # column blocks per pair
        for c in tl.range(0, P * CPP, num_stages=STAGES):
            tv = tl.zeros([BT, BE], tl.float32)
            for sp in tl.static_range(S):
                mt = tl.load(mbase + sp * D_PAD * s_mk + (c * BE + ee)[None, :])  # (D_PAD, BE), padded: no mask
                if LOW:
                    tv = tl.dot(vk, mt, tv)  # bf16 × bf16, float32 sums
                else:
                    tv = tl.dot(vk, mt, tv, input_precision=PREC)
            e = (c % CPP) * BE + ee
            ve = tl.load(vbase + e[None, :], mask=tmask[:, None] & (e < D)[None, :], other=0.0).to(tl.float32)
            wp = tl.sum(tl.where(pp[None, :] == c // CPP, aa, 0.0), 1)
            s2 += wp * tl.sum(tv * ve, 1)
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
    v (G, n, d), gram (G, r, r, d, d) float32 → (G, m) float32. Nothing per (token, pair) is written to memory;
    the operand of Gram blocks is built on the first call for this gram tensor (`gram_operand`)."""
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
    kind = "fp32" if prec != "split" else "bf16x3" if v.dtype == torch.bfloat16 else "tf32x2"
    op = gram_operand(gram, kind)
    dp = pow2_pad(d)
    kern = built("flowkv_score", _build)["flowkv_score"]
    kern[(math.ceil(m / config.tokens), G)](A, v, op, out, m, A.stride(0), A.stride(1), v.stride(0), v.stride(1),
                                            op.stride(0), op.stride(1), R=r, W=w, W_PAD=pow2_pad(w), D=d, D_PAD=dp,
                                            P=r * (r + 1) // 2, P_PAD=pow2_pad(r * (r + 1) // 2), S=op.shape[1] // dp,
                                            BT=config.tokens, BE=min(config.cols, dp),
                                            PREC="tf32" if prec == "split" else prec, LOW=kind == "bf16x3",
                                            STAGES=config.num_stages, num_warps=config.num_warps)
    return out


def bf16_split3(x: torch.Tensor) -> torch.Tensor:
    """x = p₀ + p₁ + p₂ + ε, three bf16 pieces stacked on a new first dimension, each the bf16 rounding of what the
    earlier ones left (every difference is exact in float32), so |ε| ≈ 2⁻²⁴ |x|: float32 accuracy from bf16."""
    r = x.float()
    pieces = []
    for _ in range(3):
        p = r.bfloat16()
        pieces.append(p)
        r = r - p.float()
    return torch.stack(pieces)


_OPERANDS: dict[int, tuple] = {}  # id(gram) → (weak ref to gram, its version, kind, operand); dropped with gram


def gram_operand(gram: torch.Tensor, kind: str) -> torch.Tensor:
    """The kernel's operand of Gram blocks (G, r, r, d, d): (G, S·d_pad, P·d_pad), the P blocks a ≤ b side by
    side, each as S stacked pieces, zero padded to d_pad; kind 'bf16x3' (S = 3 bf16 pieces), 'tf32x2' (S = 2 TF32
    halves, float32) or 'fp32' (S = 1). Built once per Gram tensor (and kind), rebuilt if it changes in place."""
    hit = _OPERANDS.get(id(gram))  # by identity: a tensor cannot key a WeakKeyDictionary (== is elementwise)
    if hit is not None and hit[0]() is gram and hit[1:3] == (gram._version, kind):
        return hit[3]
    G, r = gram.shape[:2]
    d = gram.shape[-1]
    dp = pow2_pad(d)
    ia, ib = torch.triu_indices(r, r, device=gram.device)
    blocks = gram[:, ia, ib].float()  # (G, P, d, d)
    if kind == "bf16x3":
        pieces = bf16_split3(blocks)
    elif kind == "tf32x2":
        pieces = torch.stack(tf32_split(blocks))
    elif kind == "fp32":
        pieces = blocks.unsqueeze(0)
    else:
        raise ValueError(f"gram_operand: kind={kind!r}; allowed: bf16x3, tf32x2, fp32")
    pieces = torch.nn.functional.pad(pieces, (0, dp - d, 0, dp - d))  # (S, G, P, dp, dp)
    S, P = pieces.shape[0], ia.numel()
    op = pieces.permute(1, 0, 3, 2, 4).reshape(G, S * dp, P * dp).contiguous()  # [g, s·dp + k, p·dp + e]
    if id(gram) not in _OPERANDS:
        weakref.finalize(gram, _OPERANDS.pop, id(gram), None)
    _OPERANDS[id(gram)] = (weakref.ref(gram), gram._version, kind, op)
    return op
