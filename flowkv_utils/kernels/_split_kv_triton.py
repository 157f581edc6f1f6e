"""The Triton kernels of `split_kv` (imported only when they are first built: CPU machines have no triton).

jit helpers called from kernels must be module globals for Triton to resolve them, hence a module of its own."""

import triton
import triton.language as tl


@triton.jit
def _merge_row(M_IN, L_IN, ACC_IN, a, c, row, cols, R: tl.constexpr, D: tl.constexpr, DC: tl.constexpr,
               BLOCK_I: tl.constexpr, CACHE: tl.constexpr):
    # merge columns `cols` (DC of them) of query row `row` of a segment's c ≥ 1 items (a: its first, int64),
    # BLOCK_I items at a time (online rescaling)
    cmask = cols < D
    m = tl.full([1], float("-inf"), tl.float32)
    l_ = tl.zeros([1], tl.float32)
    acc = tl.zeros([DC], tl.float32)
    for i0 in range(0, c, BLOCK_I):
        it = i0 + tl.arange(0, BLOCK_I)
        imask = it < c
        o = (a + it) * R + row
        mi = tl.load(M_IN + o, mask=imask, other=float("-inf"), cache_modifier=CACHE)  # (BLOCK_I,)
        li = tl.load(L_IN + o, mask=imask, other=0.0, cache_modifier=CACHE)
        ai = tl.load(ACC_IN + o[:, None] * D + cols[None, :], mask=imask[:, None] & cmask[None, :], other=0.0,
                     cache_modifier=CACHE)  # (BLOCK_I, D_PAD)
        mn = tl.maximum(m, tl.max(mi, 0))  # (1,)
        s0 = tl.exp2(m - mn)
        w = tl.exp2(mi - mn)  # (BLOCK_I,), 0 for masked items
        l_ = l_ * s0 + tl.sum(w * li, 0)
        acc = acc * s0 + tl.sum(w[:, None] * ai, 0)
        m = mn
    return acc / l_


@triton.jit
def split_kernel(Q, K, V, NTAIL, TAB, M_OUT, L_OUT, ACC_OUT, n_all, qk_scale, CNT, SEG_FIRST, SEG_COUNT, OUT,
                 R: tl.constexpr, R_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                 BLOCK: tl.constexpr, ALIGN: tl.constexpr, FUSE: tl.constexpr, BLOCK_I: tl.constexpr,
                 PDL: tl.constexpr):
    # TAB rows (each n_all long): segment, K element offset, V element offset, prefix length, is-tail flag.
    # Every offset is a multiple of ALIGN elements (TritonTables.align): telling the compiler so lets it issue
    # vector loads; a pointer offset read from memory otherwise has unknown alignment (scalar loads).
    if PDL:  # launched while the previous kernel runs: wait for its writes (q, the tail, the workspace, and the
        # tables, which block-sparse decoding rewrites every step), then let the combine kernel be scheduled
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    seg = tl.load(TAB + pid)
    kb = K + tl.multiple_of(tl.load(TAB + n_all + pid), ALIGN)  # first key of the item (prefix or tail)
    vb = V + tl.multiple_of(tl.load(TAB + 2 * n_all + pid), ALIGN)
    n = tl.load(TAB + 3 * n_all + pid) + tl.load(TAB + 4 * n_all + pid) * tl.load(NTAIL)  # keys in the item
    rows = tl.arange(0, R_PAD)
    cols = tl.arange(0, D_PAD)
    rmask = rows < R
    cmask = cols < D
    q = tl.load(Q + seg * (R * D) + rows[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                other=0.0)  # (R_PAD, D_PAD): the r query heads of the group share every K/V load below
    m_i = tl.full([R_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([R_PAD], tl.float32)
    acc = tl.zeros([R_PAD, D_PAD], tl.float32)
    for s in range(0, n, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        kmask = offs < n
        kv_off = offs[:, None] * D + cols[None, :]
        kk = tl.load(kb + kv_off, mask=kmask[:, None] & cmask[None, :], other=0.0)  # (BLOCK, D_PAD)
        vv = tl.load(vb + kv_off, mask=kmask[:, None] & cmask[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(kk)) * qk_scale  # (R_PAD, BLOCK) logits in log2 units
        qk = tl.where(kmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
        m_i = m_new
    o = pid.to(tl.int64) * R
    tl.store(M_OUT + o + rows, m_i, mask=rmask)
    tl.store(L_OUT + o + rows, l_i, mask=rmask)
    tl.store(ACC_OUT + (o + rows[:, None]) * D + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])
    if FUSE:  # the segment's last item to finish merges all of them (no second kernel)
        tl.debug_barrier()  # every thread's partial stores precede the count
        done = tl.atomic_add(CNT + seg, 1)  # acq_rel: the other items' stores are visible to the one that sees c - 1
        c = tl.load(SEG_COUNT + seg)
        if done == c - 1:
            a = tl.load(SEG_FIRST + seg)
            for row in tl.static_range(R):
                out = _merge_row(M_OUT, L_OUT, ACC_OUT, a, c, row, cols, R, D, D_PAD, BLOCK_I, ".cg")  # .cg: not L1
                tl.store(OUT + (seg.to(tl.int64) * R + row) * D + cols, out.to(OUT.dtype.element_ty), mask=cmask)
            tl.atomic_xchg(CNT + seg, 0)  # ready for the next call (CUDA graph replays)

@triton.jit
def combine_kernel(M_IN, L_IN, ACC_IN, SEG_FIRST, SEG_COUNT, OUT,
                   R: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, BLOCK_I: tl.constexpr, PDL: tl.constexpr):
    # one program per (segment, query row, DC output columns)
    seg = tl.program_id(0)
    row = tl.program_id(1)
    cols = tl.program_id(2) * DC + tl.arange(0, DC)
    if PDL:  # launched while the split kernel runs: wait for its partial results
        tl.extra.cuda.gdc_wait()
    out = _merge_row(M_IN, L_IN, ACC_IN, tl.load(SEG_FIRST + seg), tl.load(SEG_COUNT + seg), row, cols, R, D, DC,
                     BLOCK_I, "")
    tl.store(OUT + (seg.to(tl.int64) * R + row) * D + cols, out.to(OUT.dtype.element_ty), mask=cols < D)
