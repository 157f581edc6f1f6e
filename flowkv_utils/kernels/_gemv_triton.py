"""The Triton kernels of `gemv` (imported only when they are first built: CPU machines have no triton).

jit helpers called from kernels must be module globals for Triton to resolve them, hence a module of its own."""

import triton
import triton.language as tl


@triton.jit
def _rstd(X, eps, K: tl.constexpr, BK: tl.constexpr):
    # LlamaRMSNorm's statistic of the whole input vector, in float32
    ks = tl.arange(0, BK)
    ss = tl.zeros([BK], tl.float32)
    for k0 in range(0, K, BK):
        xf = tl.load(X + k0 + ks).to(tl.float32)
        ss += xf * xf
    return tl.rsqrt(tl.sum(ss, 0) / K + eps)

@triton.jit
def _pair_products(X, LNW, W, rstd, r1, K: tl.constexpr, HALF: tl.constexpr, BP: tl.constexpr,
                   BK: tl.constexpr, NORM: tl.constexpr):
    # y1 = W[r1] · x̂, y2 = W[r1 + HALF] · x̂ for BP row pairs; x̂ = bf16(γ · bf16(x · rstd)) as LlamaRMSNorm
    ks = tl.arange(0, BK)
    acc1 = tl.zeros([BP, BK], tl.float32)
    acc2 = tl.zeros([BP, BK], tl.float32)
    w1 = W + r1.to(tl.int64)[:, None] * K + ks[None, :]
    w2 = w1 + HALF * K
    for k0 in range(0, K, BK):
        x = tl.load(X + k0 + ks)
        if NORM:
            xn = (x.to(tl.float32) * rstd).to(x.dtype)
            x = (tl.load(LNW + k0 + ks).to(tl.float32) * xn.to(tl.float32)).to(x.dtype)
        xf = x.to(tl.float32)[None, :]
        acc1 += tl.load(w1 + k0).to(tl.float32) * xf
        acc2 += tl.load(w2 + k0).to(tl.float32) * xf
    return tl.sum(acc1, 1), tl.sum(acc2, 1)

@triton.jit
def qkv_rope_kernel(X, LNW, W, COS, SIN, Q, TK, TV, USED, eps, t_stride,
                    K: tl.constexpr, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                    BP: tl.constexpr, BK: tl.constexpr):
    # program: BP row pairs (j, j + D/2) of one head; heads 0..H-1 are q, H..H+G-1 k, then v
    HALF: tl.constexpr = D // 2
    p = tl.program_id(0) * BP + tl.arange(0, BP)  # pair indices (BP divides HALF: one head per program)
    head = (tl.program_id(0) * BP) // HALF
    j = p % HALF
    r1 = head * D + j
    rstd = _rstd(X, eps, K, BK)
    y1, y2 = _pair_products(X, LNW, W, rstd, r1, K, HALF, BP, BK, True)
    dt = X.dtype.element_ty
    y1 = y1.to(dt)
    y2 = y2.to(dt)
    if head < H + G:  # q or k: HF RoPE, x·cos + rotate_half(x)·sin, each operation rounded to bf16
        c1 = tl.load(COS + j).to(tl.float32)
        s1 = tl.load(SIN + j).to(tl.float32)
        c2 = tl.load(COS + j + HALF).to(tl.float32)
        s2 = tl.load(SIN + j + HALF).to(tl.float32)
        a1 = (y1.to(tl.float32) * c1).to(dt).to(tl.float32)
        b1 = (-y2.to(tl.float32) * s1).to(dt).to(tl.float32)
        a2 = (y2.to(tl.float32) * c2).to(dt).to(tl.float32)
        b2 = (y1.to(tl.float32) * s2).to(dt).to(tl.float32)
        o1 = (a1 + b1).to(dt)
        o2 = (a2 + b2).to(dt)
        if head < H:
            tl.store(Q + head * D + j, o1)
            tl.store(Q + head * D + j + HALF, o2)
        else:
            base = TK + (head - H).to(tl.int64) * t_stride + tl.load(USED) * D
            tl.store(base + j, o1)
            tl.store(base + j + HALF, o2)
    else:
        base = TV + (head - H - G).to(tl.int64) * t_stride + tl.load(USED) * D
        tl.store(base + j, y1)
        tl.store(base + j + HALF, y2)

@triton.jit
def gate_up_silu_kernel(X, LNW, W, OUT, eps, K: tl.constexpr, INTER: tl.constexpr, BP: tl.constexpr,
                        BK: tl.constexpr):
    # program: BP rows n of the gate and the same rows n + INTER of up; a = bf16(bf16(SiLU(g)) · u)
    r1 = tl.program_id(0) * BP + tl.arange(0, BP)
    rstd = _rstd(X, eps, K, BK)
    y1, y2 = _pair_products(X, LNW, W, rstd, r1, K, INTER, BP, BK, True)
    dt = X.dtype.element_ty
    g = y1.to(dt).to(tl.float32)
    u = y2.to(dt).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(OUT + r1, (s * u).to(dt))

@triton.jit
def residual_kernel(X, W, H_IN, OUT, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # program: BN output rows; out = bf16(h + bf16(W x))
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    acc = tl.zeros([BN, BK], tl.float32)
    w = W + rows.to(tl.int64)[:, None] * K + ks[None, :]
    for k0 in range(0, K, BK):
        acc += tl.load(w + k0).to(tl.float32) * tl.load(X + k0 + ks).to(tl.float32)[None, :]
    dt = H_IN.dtype.element_ty
    y = tl.sum(acc, 1).to(dt).to(tl.float32)
    tl.store(OUT + rows, (tl.load(H_IN + rows).to(tl.float32) + y).to(dt))
