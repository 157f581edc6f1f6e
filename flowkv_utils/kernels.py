"""Fast decode over the ragged compressed cache: split-KV ("flash-decoding") attention and a static decode step.

Decode attention over `cache.RaggedCache` reads every kept KV byte once. Per layer the kept keys of all
(sequence, KV head) *segments* are packed back to back; the packed rows are cut into equal **work items** of at
most `split` keys (a segment of N keys gives ⌈N/split⌉ items, an empty one none), plus one item per segment for the
dense tail of decoded tokens. One program per item computes, for the r query heads of its GQA group at once
(they share every K/V load), the partial softmax statistics

    m = max_j s_j,   l = Σ_j exp(s_j − m),   acc = Σ_j exp(s_j − m) v_j,   s_j = scaling · q·k_j,

and a second pass merges a segment's items: out = Σ_i e^{m_i − M} acc_i / Σ_i e^{m_i − M} l_i, M = max_i m_i.
Items are the same size whatever the policy's per-head budgets, so ragged (layer-wise) eviction keeps the GPU
busy as well as uniform eviction does; the item tables are built once after prefill (the prefix never changes).

Three implementations of that one algorithm:
- `split_kv_torch`: pure PyTorch (CPU or GPU), the readable version, checked against `RaggedCache.attend`;
- the Triton kernels (`_triton()`; imported lazily: CPU machines have no triton);
- `RaggedCache.attend` remains the reference.

`StaticRaggedCache` + `FastDecoder` make a whole decode step static (fixed buffers, the tail length and RoPE position
held on the device), so it can be captured once as a CUDA graph and replayed per token: no Python per layer.
`ragged_attend` plugs the split-KV attention into `generate.decode(..., attend=ragged_attend)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attention import apply_rope, scaling_of
from .cache import RaggedCache
from .capture import rotary, run_layer

LOG2E = 1.4426950408889634
# Launch configuration of the Triton kernels (benchmarks/NOTES.md: how each value was chosen). `bench gpu --tune`
# times variants and the sweep then uses the fastest; `waves`: work items ≈ waves × multiprocessors.
CONFIG = {"block": 32, "num_warps": 4, "num_stages": 3, "waves": 8, "combine_items": 64}


# --------------------------------------------------------------------------------------------------------------
# work items
# --------------------------------------------------------------------------------------------------------------
def choose_split(total_keys: int, n_programs: int, block: int | None = None, max_split: int = 8192) -> int:
    """Keys per work item: a multiple of the kernel's tile (block) such that ≈ n_programs items cover total_keys."""
    block = block or CONFIG["block"]
    if total_keys <= 0:
        return block
    split = math.ceil(total_keys / max(1, n_programs) / block) * block
    return int(min(max_split, max(block, split)))


def target_programs(device: torch.device | str) -> int:
    """Work items to aim for: CONFIG['waves'] per multiprocessor on CUDA (fills the GPU and evens out the last
    wave); 16 on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return CONFIG["waves"] * torch.cuda.get_device_properties(device).multi_processor_count
    return 16


@dataclass
class WorkItems:
    """Item tables of one layer (device int64 / int32 tensors). Item i covers packed rows [start_i, end_i) of
    segment seg_i; the items of segment s are seg_item_off[s]:seg_item_off[s+1] (contiguous)."""

    seg: torch.Tensor  # (I,) int32
    start: torch.Tensor  # (I,) int64 packed row where the item starts
    end: torch.Tensor  # (I,) int64 packed row after its last key
    seg_item_off: torch.Tensor  # (S + 1,) int32
    split: int

    @property
    def count(self) -> int:
        return int(self.seg.numel())


def work_items(offsets: torch.Tensor, split: int, device: torch.device | str = "cpu") -> WorkItems:
    """Cut each segment [offsets[s], offsets[s+1]) into items of ≤ split keys (empty segments get none)."""
    if split < 1:
        raise ValueError(f"split={split}: must be ≥ 1 keys per work item")
    off = offsets.detach().to("cpu", torch.long)  # (S + 1,)
    lengths = off[1:] - off[:-1]  # (S,)
    if (lengths < 0).any():
        raise ValueError("offsets must be non-decreasing")
    counts = (lengths + split - 1) // split  # (S,) items per segment
    seg_item_off = torch.zeros(len(lengths) + 1, dtype=torch.long)
    seg_item_off[1:] = torch.cumsum(counts, 0)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), counts)  # (I,)
    local = torch.arange(len(seg)) - seg_item_off[seg]
    start = off[seg] + local * split
    end = torch.minimum(start + split, off[seg + 1])
    return WorkItems(seg.to(device, torch.int32), start.to(device), end.to(device),
                     seg_item_off.to(device, torch.int32), split)


# --------------------------------------------------------------------------------------------------------------
# the algorithm in PyTorch
# --------------------------------------------------------------------------------------------------------------
def split_kv_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, items: WorkItems, tail_k: torch.Tensor,
                   tail_v: torch.Tensor, n_tail: torch.Tensor | int, scaling: float) -> torch.Tensor:
    """Decode attention of one new token per segment, by the split-KV algorithm, in PyTorch.

    q (S, r, d): the r query heads of each segment's group; k, v (N, d) packed prefix; tail_k/v (S, cap, d);
    n_tail: tail tokens visible (the new one included; int or a 0-d/1-element tensor, so graphs can hold it).
    Returns (S, r, d) in q's dtype. Static shapes (the tail is masked, not sliced), so it can be graph-captured."""
    S, r, d = q.shape
    cap = tail_k.shape[1]
    qf = q.float() * scaling  # (S, r, d)
    # prefix items: gather each item's keys into a padded (I, split, d) block
    parts_m, parts_l, parts_acc, parts_seg = [], [], [], []
    if items.count:
        idx = items.start.unsqueeze(1) + torch.arange(items.split, device=q.device)  # (I, split)
        valid = idx < items.end.unsqueeze(1)  # (I, split)
        idx = torch.where(valid, idx, torch.zeros_like(idx))
        seg = items.seg.long()  # (I,)
        logits = torch.einsum("ird,ijd->irj", qf[seg], k[idx].float())  # (I, r, split)
        logits = logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
        m = logits.amax(-1)  # (I, r)
        p = torch.exp(logits - m.unsqueeze(-1))
        parts_m.append(m)
        parts_l.append(p.sum(-1))
        parts_acc.append(torch.einsum("irj,ijd->ird", p, v[idx].float()))
        parts_seg.append(seg)
    # tail items: one per segment over the first n_tail slots
    n_tail_t = torch.as_tensor(n_tail, device=q.device).reshape(())
    tvalid = torch.arange(cap, device=q.device) < n_tail_t  # (cap,)
    tl_ = torch.einsum("srd,scd->src", qf, tail_k.float()).masked_fill(~tvalid, float("-inf"))  # (S, r, cap)
    tm = tl_.amax(-1)
    tp = torch.exp(tl_ - tm.unsqueeze(-1))
    parts_m.append(tm)
    parts_l.append(tp.sum(-1))
    tv = tail_v.float().masked_fill(~tvalid.view(1, cap, 1), 0.0)  # unwritten slots may hold NaN: never read them
    parts_acc.append(torch.einsum("src,scd->srd", tp, tv))
    parts_seg.append(torch.arange(S, device=q.device))
    # merge the partials of each segment
    m, lsum, acc, seg = (torch.cat(x) for x in (parts_m, parts_l, parts_acc, parts_seg))
    M = torch.full((S, r), float("-inf"), device=q.device).scatter_reduce_(0, seg.unsqueeze(1).expand_as(m), m,
                                                                          "amax")  # (S, r)
    w = torch.exp(m - M[seg])  # (I + S, r)
    num = torch.zeros(S, r, d, device=q.device).index_add_(0, seg, acc * w.unsqueeze(-1))
    den = torch.zeros(S, r, device=q.device).index_add_(0, seg, lsum * w)
    return (num / den.unsqueeze(-1)).to(q.dtype)


# --------------------------------------------------------------------------------------------------------------
# the algorithm in Triton (imported lazily)
# --------------------------------------------------------------------------------------------------------------
_TRITON: dict = {}


def triton_available() -> bool:
    """True when triton imports and a CUDA device is present (or TRITON_INTERPRET=1 for CPU checks)."""
    import os

    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _triton():
    """Build the two Triton kernels on first use (so importing this module never needs triton)."""
    if _TRITON:
        return _TRITON
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(Q, K, V, NTAIL, TAB, M_OUT, L_OUT, ACC_OUT, n_all, qk_scale,
                     R: tl.constexpr, R_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                     BLOCK: tl.constexpr):
        # TAB rows (each n_all long): segment, K element offset, V element offset, prefix length, is-tail flag
        pid = tl.program_id(0)
        seg = tl.load(TAB + pid)
        kb = K + tl.load(TAB + n_all + pid)  # first key of the item (packed prefix or a tail, same address space)
        vb = V + tl.load(TAB + 2 * n_all + pid)
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

    @triton.jit
    def combine_kernel(M_IN, L_IN, ACC_IN, SEG_FIRST, SEG_COUNT, OUT,
                       R: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_I: tl.constexpr):
        # one program per (segment, query row): merge the segment's items BLOCK_I at a time (online rescaling)
        seg = tl.program_id(0)
        row = tl.program_id(1)
        cols = tl.arange(0, D_PAD)
        cmask = cols < D
        a = tl.load(SEG_FIRST + seg)
        c = tl.load(SEG_COUNT + seg)  # ≥ 1: the tail item always holds the new token
        m = tl.full([1], float("-inf"), tl.float32)
        l_ = tl.zeros([1], tl.float32)
        acc = tl.zeros([D_PAD], tl.float32)
        for i0 in range(0, c, BLOCK_I):
            it = i0 + tl.arange(0, BLOCK_I)
            imask = it < c
            o = (a + it) * R + row  # int64 (SEG_FIRST is int64)
            mi = tl.load(M_IN + o, mask=imask, other=float("-inf"))  # (BLOCK_I,)
            li = tl.load(L_IN + o, mask=imask, other=0.0)
            ai = tl.load(ACC_IN + o[:, None] * D + cols[None, :], mask=imask[:, None] & cmask[None, :],
                         other=0.0)  # (BLOCK_I, D_PAD)
            mn = tl.maximum(m, tl.max(mi, 0))  # (1,)
            s0 = tl.exp2(m - mn)
            w = tl.exp2(mi - mn)  # (BLOCK_I,), 0 for masked items
            l_ = l_ * s0 + tl.sum(w * li, 0)
            acc = acc * s0 + tl.sum(w[:, None] * ai, 0)
            m = mn
        out = acc / l_
        tl.store(OUT + (seg.to(tl.int64) * R + row) * D + cols, out.to(OUT.dtype.element_ty), mask=cmask)

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

    _TRITON.update(split=split_kernel, combine=combine_kernel, flowkv_score=flowkv_score_kernel, triton=triton)
    return _TRITON


@dataclass
class TritonTables:
    """Device tables of one layer for the Triton kernels: tab (5, I + S) int64 rows = segment, K element offset,
    V element offset, prefix keys, is-tail; seg_first/seg_count (S,) (a segment's items are contiguous:
    its prefix items, then its tail item; int64). Offsets are relative to the base tensors k_base / v_base."""

    tab: torch.Tensor
    seg_first: torch.Tensor
    seg_count: torch.Tensor
    k_base: torch.Tensor
    v_base: torch.Tensor


def triton_tables(items: WorkItems, k: torch.Tensor, v: torch.Tensor, tail_k: torch.Tensor,
                  tail_v: torch.Tensor) -> TritonTables:
    """Address every item (prefix items of `items` and one tail item per segment) relative to one base pointer,
    so one kernel reads both the packed prefix and the separate tail tensors."""
    S, cap, d = tail_k.shape
    k_base = k if k.numel() else tail_k  # an empty prefix has no storage to point at
    v_base = v if v.numel() else tail_v
    esz = k.element_size()
    dk = (tail_k.data_ptr() - k_base.data_ptr()) // esz  # element distance from the K base to the tail
    dv = (tail_v.data_ptr() - v_base.data_ptr()) // esz
    seg_item_off = items.seg_item_off.long().cpu()
    counts = seg_item_off[1:] - seg_item_off[:-1]  # (S,) prefix items per segment
    first = seg_item_off[:-1] + torch.arange(S)  # each segment also owns its tail item
    n_items = items.count
    seg_p = items.seg.long().cpu()
    pos_p = torch.arange(n_items) + seg_p  # prefix item i moves down by the tail items of earlier segments
    pos_t = first + counts  # the tail item comes after the segment's prefix items
    n_all = n_items + S
    tab = torch.zeros(5, n_all, dtype=torch.long)
    start = items.start.long().cpu()
    tab[0, pos_p] = seg_p
    tab[1, pos_p] = start * d
    tab[2, pos_p] = start * d
    tab[3, pos_p] = items.end.long().cpu() - start
    tab[0, pos_t] = torch.arange(S)
    tab[1, pos_t] = dk + torch.arange(S) * cap * d
    tab[2, pos_t] = dv + torch.arange(S) * cap * d
    tab[4, pos_t] = 1
    dev = k_base.device
    return TritonTables(tab.to(dev), first.to(dev), (counts + 1).to(dev), k_base, v_base)


@dataclass
class SplitKVWorkspace:
    """Partial-result buffers of one layer's items (reused every step; static for CUDA graphs)."""

    m: torch.Tensor  # (I + S, r) float32
    lsum: torch.Tensor  # (I + S, r)
    acc: torch.Tensor  # (I + S, r, d)
    out: torch.Tensor  # (S, r, d) model dtype


def make_workspace(items: WorkItems, segments: int, r: int, d: int, dtype: torch.dtype,
                   device: torch.device | str) -> SplitKVWorkspace:
    n = items.count + segments
    return SplitKVWorkspace(torch.empty(n, r, dtype=torch.float32, device=device),
                            torch.empty(n, r, dtype=torch.float32, device=device),
                            torch.empty(n, r, d, dtype=torch.float32, device=device),
                            torch.empty(segments, r, d, dtype=dtype, device=device))


def split_kv_triton(q: torch.Tensor, tables: TritonTables, n_tail: torch.Tensor, scaling: float,
                    ws: SplitKVWorkspace, num_warps: int | None = None, num_stages: int | None = None,
                    block: int | None = None) -> torch.Tensor:
    """The Triton split-KV decode attention: q (S, r, d) contiguous, n_tail a 1-element int64 device tensor.
    Returns ws.out (S, r, d) (overwritten by the next call with the same workspace). Launch settings default to
    CONFIG."""
    S, r, d = q.shape
    kern = _triton()
    r_pad = max(16, 1 << (r - 1).bit_length())
    d_pad = max(16, 1 << (d - 1).bit_length())
    n_all = tables.tab.shape[1]
    kern["split"][(n_all,)](q, tables.k_base, tables.v_base, n_tail, tables.tab, ws.m, ws.lsum, ws.acc, n_all,
                            scaling * LOG2E, R=r, R_PAD=r_pad, D=d, D_PAD=d_pad, BLOCK=block or CONFIG["block"],
                            num_warps=num_warps or CONFIG["num_warps"], num_stages=num_stages or CONFIG["num_stages"])
    kern["combine"][(S, r)](ws.m, ws.lsum, ws.acc, tables.seg_first, tables.seg_count, ws.out,
                            R=r, D=d, D_PAD=d_pad, BLOCK_I=CONFIG["combine_items"], num_warps=4)
    return ws.out


def split_kv(q, k, v, items, tail_k, tail_v, n_tail, scaling, impl: str = "auto") -> torch.Tensor:
    """One-off split-KV attention (tables built per call): impl 'triton', 'torch' or 'auto' (triton on CUDA when
    importable, else torch). Same arguments as `split_kv_torch`."""
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl={impl!r}: allowed are 'auto', 'triton', 'torch'")
    use_triton = impl == "triton" or (impl == "auto" and q.is_cuda and triton_available())
    if not use_triton:
        return split_kv_torch(q, k, v, items, tail_k, tail_v, n_tail, scaling)
    S, r, d = q.shape
    nt = n_tail if torch.is_tensor(n_tail) else torch.tensor([int(n_tail)], device=q.device)
    ws = make_workspace(items, S, r, d, q.dtype, q.device)
    out = split_kv_triton(q.contiguous(), triton_tables(items, k, v, tail_k, tail_v), nt.reshape(1).long(),
                          scaling, ws)
    return out


# Launch settings of the FlowKV score kernel (benchmarks/NOTES.md). 'precision': 'split' (M = M_hi + M_lo, two TF32
# products: float32 accuracy when v is bf16/fp16, which TF32 holds exactly; other v fall back to 'tf32x3'), or any
# tl.dot input precision: 'tf32x3' (three TF32 products), 'tf32' (one: ≈ 1e-3 relative), 'ieee' (CUDA cores).
SCORE_CONFIG = {"tokens": 64, "cols": 32, "num_warps": 4, "num_stages": 2, "precision": "split"}


def tf32_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x = hi + lo exactly, with hi rounded to TF32 (10 mantissa bits), so hi converts to TF32 without error and
    lo's conversion error is ≈ 2⁻¹¹ of lo, i.e. ≈ 2⁻²² of x: float32 accuracy from two TF32 products."""
    x = x.float().contiguous()
    hi = ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)
    return hi, x - hi


def flowkv_scores_triton(A: torch.Tensor, v: torch.Tensor, gram: torch.Tensor, m: int,
                         precision: str | None = None) -> torch.Tensor:
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
    c = SCORE_CONFIG
    prec = precision or c["precision"]
    if prec == "split" and v.dtype not in (torch.bfloat16, torch.float16):
        prec = "tf32x3"
    two = prec == "split"
    if two:
        gram, lo = tf32_split(gram)
    else:
        gram = gram.float().contiguous()
        lo = gram
    d_pad = max(16, 1 << (d - 1).bit_length())
    kern = _triton()["flowkv_score"]
    kern[(math.ceil(m / c["tokens"]), G)](A, v, gram, lo, out, m, A.stride(0), A.stride(1), v.stride(0),
                                          v.stride(1), R=r, W=w, W_PAD=max(16, 1 << (w - 1).bit_length()), D=d,
                                          D_PAD=d_pad, BT=c["tokens"], BE=min(c["cols"], d_pad),
                                          PREC="tf32" if two else prec, TWO=two, num_warps=c["num_warps"],
                                          num_stages=c["num_stages"])
    return out


# --------------------------------------------------------------------------------------------------------------
# plug-in for generate.decode over a RaggedCache (one sequence)
# --------------------------------------------------------------------------------------------------------------
def ragged_attend(cache: RaggedCache, layer: int, q: torch.Tensor, T: int, scaling: float,
                  impl: str = "auto") -> torch.Tensor:
    """`generate.decode(..., attend=ragged_attend)`: split-KV attention for one new token (T = 1), q (H, 1, d) →
    (H, 1, d). T > 1 (teacher forcing) falls back to the reference `cache.attend`."""
    if T != 1:
        return cache.attend(layer, q, T, scaling)
    lay = cache.layers[layer]
    G = lay.offsets.numel() - 1
    H, _, d = q.shape
    memo = cache.__dict__.setdefault("_split_kv", {})
    if layer not in memo:  # the prefix never changes after prefill: cut it into items once per layer
        split = choose_split(int(lay.offsets[-1]), target_programs(q.device))
        memo[layer] = [work_items(lay.offsets, split, q.device), None, None]
    items = memo[layer][0]
    qg = q.reshape(G, H // G, d).contiguous()  # (G, r, d)
    use_triton = impl == "triton" or (impl == "auto" and q.is_cuda and triton_available())
    if not use_triton:
        out = split_kv_torch(qg, lay.k, lay.v, items, lay.tail_k, lay.tail_v, cache.used + 1, scaling)
        return out.reshape(H, 1, d)
    key = (lay.tail_k.data_ptr(), lay.tail_v.data_ptr(), lay.tail_k.shape[1])
    if memo[layer][1] is None or memo[layer][1][0] != key:  # the tail grew (moved): re-address the items
        memo[layer][1] = (key, triton_tables(items, lay.k, lay.v, lay.tail_k, lay.tail_v))
        memo[layer][2] = make_workspace(items, G, H // G, d, q.dtype, q.device)
    nt = torch.full((1,), cache.used + 1, dtype=torch.long, device=q.device)
    out = split_kv_triton(qg, memo[layer][1][1], nt, scaling, memo[layer][2])
    return out.reshape(H, 1, d).clone()


# --------------------------------------------------------------------------------------------------------------
# static batched cache + a decode step that can be captured as one CUDA graph
# --------------------------------------------------------------------------------------------------------------
@dataclass
class StaticLayer:
    k: torch.Tensor  # (N, d) packed kept keys of all B·G segments, sequence-major then head
    v: torch.Tensor  # (N, d)
    offsets: torch.Tensor  # (B·G + 1,) int64 (CPU)
    tail_k: torch.Tensor  # (B·G, capacity, d)
    tail_v: torch.Tensor
    items: WorkItems
    tables: TritonTables | None = None  # built by FastDecoder when it uses the Triton kernels
    ws: SplitKVWorkspace | None = None


class StaticRaggedCache:
    """B sequences' ragged caches in fixed buffers: per layer packed K/V over B·G segments + a dense tail, the
    number of tail tokens `used` (1-element int64 on the device) and each sequence's next RoPE position `pos`."""

    def __init__(self, layers: list[StaticLayer], batch: int, kv_heads: int, next_pos: torch.Tensor):
        self.layers = layers
        self.batch = batch
        self.kv_heads = kv_heads
        dev = layers[0].k.device
        self.used = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = next_pos.to(dev).view(batch, 1).long()  # (B, 1)
        self.start_pos = self.pos.clone()

    @property
    def capacity(self) -> int:
        return self.layers[0].tail_k.shape[1]

    @property
    def device(self) -> torch.device:
        return self.layers[0].k.device

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor, head_dim: int, capacity: int, next_pos: int,
                     dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                     split: int | None = None, seed: int = 0) -> StaticRaggedCache:
        """A cache of random contents with given kept lengths (L, B, G) — for speed and memory measurements,
        where only the lengths matter. Contents are N(0, 1) (never zeros)."""
        L, B, G = lengths.shape
        gen = torch.Generator(device=device).manual_seed(seed)
        layers = []
        for li in range(L):
            lens = lengths[li].reshape(-1).long().cpu()
            off = torch.zeros(B * G + 1, dtype=torch.long)
            off[1:] = torch.cumsum(lens, 0)
            N = int(off[-1])
            k = torch.randn(N, head_dim, generator=gen, device=device, dtype=dtype)
            v = torch.randn(N, head_dim, generator=gen, device=device, dtype=dtype)
            layers.append(_static_layer(k, v, off, capacity, split))
        return cls(layers, B, G, torch.full((B,), next_pos, dtype=torch.long))

    @classmethod
    def from_ragged(cls, caches: list[RaggedCache], capacity: int, split: int | None = None,
                    share: bool = True) -> StaticRaggedCache:
        """Wrap RaggedCaches (their prefix only; tails start empty). With one cache and share=True the packed
        tensors are used in place (no copy); several caches are concatenated."""
        B = len(caches)
        G = caches[0].layers[0].offsets.numel() - 1
        layers = []
        for li in range(len(caches[0].layers)):
            lays = [c.layers[li] for c in caches]
            if B == 1 and share:
                k, v = lays[0].k, lays[0].v
            else:
                k = torch.cat([x.k for x in lays])
                v = torch.cat([x.v for x in lays])
            lens = torch.cat([x.lengths.cpu() for x in lays])
            off = torch.zeros(B * G + 1, dtype=torch.long)
            off[1:] = torch.cumsum(lens, 0)
            layers.append(_static_layer(k, v, off, capacity, split))
        return cls(layers, B, G, torch.tensor([c.next_pos for c in caches]))

    def kept_bytes(self) -> int:
        return sum(x.k.numel() * x.k.element_size() + x.v.numel() * x.v.element_size() for x in self.layers)

    def allocated_bytes(self, include_tail: bool = False) -> int:
        total = 0
        for x in self.layers:
            total += x.k.untyped_storage().nbytes() + x.v.untyped_storage().nbytes() + 8 * x.offsets.numel()
            if include_tail:
                total += x.tail_k.untyped_storage().nbytes() + x.tail_v.untyped_storage().nbytes()
        return total

    def reset(self, used: int, pos: torch.Tensor) -> None:
        self.used.fill_(used)
        self.pos.copy_(pos)

    def rewind(self) -> None:
        """Forget every decoded token (empty tails, positions back to the end of the prompts)."""
        self.reset(0, self.start_pos)


def _static_layer(k, v, off, capacity, split) -> StaticLayer:
    S = off.numel() - 1
    d = k.shape[1]
    split = split or choose_split(int(off[-1]), target_programs(k.device))
    items = work_items(off, split, k.device)
    tk = torch.randn(S, capacity, d, dtype=k.dtype, device=k.device)  # poisoned with noise, never read unwritten
    tv = torch.randn(S, capacity, d, dtype=k.dtype, device=k.device)
    return StaticLayer(k, v, off, tk, tv, items)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm exactly: float32 statistics, weight applied in the input dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def fused_pre_attention(h, ln_w, eps: float, w_qkv, cos, sin, tail_k, tail_v, used, H: int, G: int, d: int):
    """norm → one q/k/v product → RoPE → write k, v into the tail at `used`. h (B, 1, D) → q (B·G, r, d)."""
    B = h.shape[0]
    qkv = torch.nn.functional.linear(_rms(h, ln_w, eps), w_qkv)  # (B, 1, (H + 2G)·d)
    q, k, v = qkv.split([H * d, G * d, G * d], dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, 1, d)
    q = apply_rope(q.view(B, 1, H, d).transpose(1, 2), cos, sin)  # (B, H, 1, d)
    k = apply_rope(k.view(B, 1, G, d).transpose(1, 2), cos, sin)  # (B, G, 1, d)
    tail_k.index_copy_(1, used, k.reshape(B * G, 1, d))
    tail_v.index_copy_(1, used, v.reshape(B * G, 1, d))
    return q.reshape(B * G, H // G, d).contiguous()


def fused_post_attention(h, o, w_o, ln_w, eps: float, w_gate_up, w_down, inter: int):
    """o_proj + residual → norm → one gate/up product → SiLU·up → down + residual. h (B, 1, D), o (B·G, r, d)."""
    B = h.shape[0]
    h = h + torch.nn.functional.linear(o.reshape(B, 1, -1), w_o)
    g, u = torch.nn.functional.linear(_rms(h, ln_w, eps), w_gate_up).split([inter, inter], dim=-1)
    return h + torch.nn.functional.linear(torch.nn.functional.silu(g) * u, w_down)


def fusable(model) -> bool:
    """Llama-style layers the fused step reproduces exactly: no q/k norms, no biases, SiLU MLP."""
    c = model.config
    lay = model.model.layers[0]
    a = lay.self_attn
    return (getattr(a, "q_norm", None) is None and all(getattr(m, "bias", None) is None for m in
            (a.q_proj, a.k_proj, a.v_proj, a.o_proj, lay.mlp.gate_proj, lay.mlp.up_proj, lay.mlp.down_proj))
            and getattr(c, "hidden_act", "silu") == "silu")


def fuse_projections(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pack each layer's q/k/v weights into one tensor and gate/up into another, and point the modules' weights at
    views of them: the model computes exactly as before and no weight is stored twice. Returns [(w_qkv, w_gu)]."""
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        if getattr(a, "_flowkv_qkv", None) is None:
            w_qkv = torch.cat([a.q_proj.weight.data, a.k_proj.weight.data, a.v_proj.weight.data])
            w_gu = torch.cat([m.gate_proj.weight.data, m.up_proj.weight.data])
            nq, nk = a.q_proj.weight.shape[0], a.k_proj.weight.shape[0]
            a.q_proj.weight.data = w_qkv[:nq]
            a.k_proj.weight.data = w_qkv[nq:nq + nk]
            a.v_proj.weight.data = w_qkv[nq + nk:]
            ni = m.gate_proj.weight.shape[0]
            m.gate_proj.weight.data = w_gu[:ni]
            m.up_proj.weight.data = w_gu[ni:]
            a._flowkv_qkv, m._flowkv_gu = w_qkv, w_gu
        out.append((a._flowkv_qkv, m._flowkv_gu))
    return out


_COMPILED: dict = {}


def _compiled(fn):
    """torch.compile'd once per function (the same code serves every layer: only tensors change)."""
    if fn not in _COMPILED:
        # emulate_precision_casts: round to bf16 where eager does, so compiled == eager bit for bit (tested)
        _COMPILED[fn] = torch.compile(fn, fullgraph=True, options={"emulate_precision_casts": True})
    return _COMPILED[fn]


class FastDecoder:
    """One greedy decode step for B sequences over a StaticRaggedCache:
    embed → per layer (norm, q/k/v + RoPE, tail write, split-KV attention, o_proj, MLP) → norm → lm_head.

    Everything the step needs lives in fixed buffers (ids, positions, tail length), so on CUDA `capture()` records
    the whole step as one CUDA graph and `step()` replays it. impl: split-KV implementation ('auto'|'triton'|'torch').
    fuse: per layer one q/k/v product and one gate/up product (`fuse_projections`) and the elementwise work
    (norms, RoPE, SiLU, residuals) compiled into few kernels (`fused_pre_attention` / `fused_post_attention`,
    torch.compile'd when compile=True); default on CUDA for Llama-style models. fuse=False runs the model's own
    modules through `capture.run_layer`."""

    def __init__(self, model, cache: StaticRaggedCache, impl: str = "auto", fuse: bool | None = None,
                 compile: bool | None = None):
        self.model = model
        self.cache = cache
        self.impl = impl
        dev = cache.device
        self.ids = torch.zeros(cache.batch, 1, dtype=torch.long, device=dev)  # (B, 1)
        self.graph = None
        self.logits = None
        inner = model.model
        self.scalings = [scaling_of(layer.self_attn) for layer in inner.layers]
        use_triton = impl == "triton" or (impl == "auto" and dev.type == "cuda" and triton_available())
        self.impl_used = "triton" if use_triton else "torch"
        if use_triton:
            r = model.config.num_attention_heads // cache.kv_heads
            for lay in cache.layers:
                lay.tables = triton_tables(lay.items, lay.k, lay.v, lay.tail_k, lay.tail_v)
                lay.ws = make_workspace(lay.items, lay.offsets.numel() - 1, r, lay.k.shape[1], lay.k.dtype, dev)
        self.fuse = (dev.type == "cuda" and fusable(model)) if fuse is None else bool(fuse)
        if self.fuse and not fusable(model):
            raise ValueError("fuse=True needs Llama-style layers (no q/k norms, no biases, SiLU MLP)")
        self.compile = (dev.type == "cuda") if compile is None else bool(compile)
        if self.fuse:
            self.fused = fuse_projections(model)
            self.pre = _compiled(fused_pre_attention) if self.compile else fused_pre_attention
            self.post = _compiled(fused_post_attention) if self.compile else fused_post_attention
        self.label = self.impl_used + ("+fused" if self.fuse else "") + ("+compiled" if self.fuse and self.compile
                                                                        else "")

    def _attend(self, li: int, qs: torch.Tensor) -> torch.Tensor:
        """Split-KV attention of layer li for q (B·G, r, d) (the new k, v are already in the tail)."""
        c, lay = self.cache, self.cache.layers[li]
        if self.impl_used == "triton":
            return split_kv_triton(qs, lay.tables, c.used + 1, self.scalings[li], lay.ws)
        return split_kv_torch(qs, lay.k, lay.v, lay.items, lay.tail_k, lay.tail_v, c.used + 1, self.scalings[li])

    @torch.no_grad()
    def _forward(self) -> torch.Tensor:
        c = self.cache
        inner = self.model.model
        B, G = c.batch, c.kv_heads
        h = inner.embed_tokens(self.ids)  # (B, 1, D)
        cos, sin = rotary(self.model, h, c.pos)
        if self.fuse:
            cfg = self.model.config
            H, d = cfg.num_attention_heads, c.layers[0].k.shape[1]
            for li, layer in enumerate(inner.layers):
                lay, (w_qkv, w_gu) = c.layers[li], self.fused[li]
                a, m = layer.self_attn, layer.mlp
                qs = self.pre(h, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon, w_qkv, cos,
                              sin, lay.tail_k, lay.tail_v, c.used, H, G, d)
                o = self._attend(li, qs)
                h = self.post(h, o, a.o_proj.weight, layer.post_attention_layernorm.weight,
                              layer.post_attention_layernorm.variance_epsilon, w_gu, m.down_proj.weight,
                              m.gate_proj.weight.shape[0])
        else:
            for li, layer in enumerate(inner.layers):
                lay = c.layers[li]

                def att(q, k, v, lay=lay, li=li):  # q (B, H, 1, d), k/v (B, G, 1, d)
                    S = B * G
                    d = q.shape[-1]
                    lay.tail_k.index_copy_(1, c.used, k.reshape(S, 1, d))
                    lay.tail_v.index_copy_(1, c.used, v.reshape(S, 1, d))
                    return self._attend(li, q.reshape(S, -1, d).contiguous()).reshape(B, -1, 1, d)

                h = run_layer(layer, h, cos, sin, att)[0]
        logits = self.model.lm_head(inner.norm(h))[:, -1]  # (B, vocab)
        c.used += 1
        c.pos += 1
        return logits

    def capture(self, warmup: int = 2) -> None:
        """Record the step as a CUDA graph (warm-up steps run first; the cache's tail/positions are restored)."""
        if self.cache.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device; on CPU call step() without capture()")
        c = self.cache
        used0, pos0 = int(c.used), c.pos.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                self._forward()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
        torch.cuda.synchronize()
        c.reset(used0, pos0)

    @torch.no_grad()
    def step(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Feed one token per sequence (ids (B,) or (B, 1); None repeats the last) → logits (B, vocab)."""
        if int(self.cache.used) >= self.cache.capacity:
            raise RuntimeError(f"tail capacity {self.cache.capacity} exhausted; build the cache with a larger one")
        if ids is not None:
            self.ids.copy_(ids.view(-1, 1))
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._forward()

    def step_no_check(self) -> None:
        """Replay without the capacity check (which reads `used` from the device): timing loops only."""
        self.graph.replay()
