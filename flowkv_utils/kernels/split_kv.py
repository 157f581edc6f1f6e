"""Split-KV ("flash-decoding") attention of one new token over a packed, ragged KV layout.

Per layer the kept keys of all (sequence, KV head) *segments* are packed back to back (offsets (S + 1,)); the packed
rows are cut into equal **work items** of at most `split` keys (a segment of N keys gives ⌈N/split⌉ items, an empty
one none), plus one item per segment for the dense tail of decoded tokens. One program per item computes, for the r
query heads of its GQA group at once (they share every K/V load), the partial softmax statistics

    m = max_j s_j,   l = Σ_j exp(s_j − m),   acc = Σ_j exp(s_j − m) v_j,   s_j = scaling · q·k_j,

and a second pass merges a segment's items: out = Σ_i e^{m_i − M} acc_i / Σ_i e^{m_i − M} l_i, M = max_i m_i.
Items are the same size whatever the per-head lengths, so ragged (layer-wise) eviction keeps the GPU as busy as
uniform eviction; the item tables are built once after prefill (the prefix never changes).

Two implementations of that one algorithm: `split_kv_torch` (pure PyTorch, the readable version) and the Triton
kernels (`split_kv_triton`, built on first use). Launch settings are a `SplitKVConfig` value passed in, never a
module global. This module is a leaf: it imports nothing else of the project (the cache that owns the layout,
`cache.RaggedCache`, and the static decoder, `fastdecode`, call into it).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ._triton import built, cuda_capability, pow2_pad, replace_fields, use_triton

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class SplitKVConfig:
    """Launch settings of the split-KV kernels (benchmarks/NOTES.md says how each default was chosen).
    block: keys per inner tile; waves: work items ≈ waves × multiprocessors; combine_items: items merged per step;
    combine_cols: output columns per program of the combine kernel (a power of two; the head dim, padded, at most),
    so a segment's merge is spread over several programs; fused_combine: the last item of each segment to finish
    merges the segment (an atomic count per segment) instead of a second kernel doing it; pdl: programmatic dependent launch (Hopper and later; ignored before): each kernel
    is launched while the one before it in the stream still runs and waits inside for its writes, so launch and
    ramp-up overlap the previous kernel's tail."""

    block: int = 32
    num_warps: int = 4
    num_stages: int = 3
    waves: int = 4
    combine_items: int = 256
    combine_cols: int = 32
    fused_combine: bool = False
    pdl: bool = True

    def __post_init__(self) -> None:
        for name in ("block", "combine_items", "combine_cols"):
            x = getattr(self, name)
            if not (isinstance(x, int) and x >= 1 and x & (x - 1) == 0):
                raise ValueError(f"SplitKVConfig: {name}={x!r}; allowed: a power of two (a Triton tile side)")

    def replace(self, **changes) -> SplitKVConfig:
        """A copy with some settings changed; unknown names raise, naming the known ones."""
        return replace_fields(self, **changes)


DEFAULT_CONFIG = SplitKVConfig()


# --------------------------------------------------------------------------------------------------------------
# work items
# --------------------------------------------------------------------------------------------------------------
def choose_split(total_keys: int, n_programs: int, block: int | None = None, max_split: int = 8192) -> int:
    """Keys per work item: a multiple of the kernel's tile (block) such that ≈ n_programs items cover total_keys."""
    block = block or DEFAULT_CONFIG.block
    if total_keys <= 0:
        return block
    split = math.ceil(total_keys / max(1, n_programs) / block) * block
    return int(min(max_split, max(block, split)))


def target_programs(device: torch.device | str, config: SplitKVConfig = DEFAULT_CONFIG) -> int:
    """Work items to aim for: config.waves per multiprocessor on CUDA (fills the GPU and evens out the last
    wave); 16 on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return config.waves * torch.cuda.get_device_properties(device).multi_processor_count
    return 16


CPU_ITEM_KEYS = 256  # keys per work item on the CPU: the PyTorch path pads every item to `split` keys


def auto_split(total_keys: int, device: torch.device | str, config: SplitKVConfig = DEFAULT_CONFIG) -> int:
    """The split a layer of `total_keys` packed keys gets by default on `device`: ≈ waves × multiprocessors items
    on CUDA; on the CPU items of ≈ CPU_ITEM_KEYS keys, so that padding short segments to the split stays cheap."""
    if torch.device(device).type != "cuda":
        return choose_split(total_keys, max(16, math.ceil(total_keys / CPU_ITEM_KEYS)), config.block)
    return choose_split(total_keys, target_programs(device, config), config.block)

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
# the algorithm in Triton (built on first use)
# --------------------------------------------------------------------------------------------------------------
def _build() -> dict:
    from . import _split_kv_triton as k

    return {"split": k.split_kernel, "combine": k.combine_kernel}


@dataclass
class TritonTables:
    """Device tables of one layer for the Triton kernels: tab (5, I + S) int64 rows = segment, K element offset,
    V element offset, prefix keys, is-tail; seg_first/seg_count (S,) (a segment's items are contiguous:
    its prefix items, then its tail item; int64). Offsets are relative to the base tensors k_base / v_base; every
    one is a multiple of `align` elements (a power of two ≤ 16; offsets rewritten later, as `blocksparse` does,
    must stay multiples of d, which align divides)."""

    tab: torch.Tensor
    seg_first: torch.Tensor
    seg_count: torch.Tensor
    k_base: torch.Tensor
    v_base: torch.Tensor
    align: int = 1
    max_items: int = 1  # most items of one segment (its tail item included): the combine's tile needs no more


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
    return TritonTables(tab.to(dev), first.to(dev), (counts + 1).to(dev), k_base, v_base,
                        offset_alignment(d, cap * d, dk, dv), int(counts.max()) + 1 if S else 1)


def offset_alignment(*offsets: int, most: int = 16) -> int:
    """The largest power of two ≤ most that divides every offset (in elements; 0 is divisible by anything): the
    alignment the split kernel may assume of its tables. Item offsets are start·d and dk + s·cap·d, so passing d,
    cap·d, dk and dv covers them all."""
    g = math.gcd(*(abs(int(o)) for o in offsets))
    if g == 0:
        return most
    return min(most, g & -g)


@dataclass
class SplitKVWorkspace:
    """Partial-result buffers of one layer's items (reused every step; static for CUDA graphs)."""

    m: torch.Tensor  # (I + S, r) float32
    lsum: torch.Tensor  # (I + S, r)
    acc: torch.Tensor  # (I + S, r, d)
    out: torch.Tensor  # (S, r, d) model dtype
    done: torch.Tensor  # (S,) int32 items finished per segment (fused combine; zero between calls)


def make_workspace(items: WorkItems, segments: int, r: int, d: int, dtype: torch.dtype,
                   device: torch.device | str) -> SplitKVWorkspace:
    n = items.count + segments
    return SplitKVWorkspace(torch.empty(n, r, dtype=torch.float32, device=device),
                            torch.empty(n, r, dtype=torch.float32, device=device),
                            torch.empty(n, r, d, dtype=torch.float32, device=device),
                            torch.empty(segments, r, d, dtype=dtype, device=device),
                            torch.zeros(segments, dtype=torch.int32, device=device))


def split_kv_triton(q: torch.Tensor, tables: TritonTables, n_tail: torch.Tensor, scaling: float,
                    ws: SplitKVWorkspace, config: SplitKVConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """The Triton split-KV decode attention: q (S, r, d) contiguous, n_tail a 1-element int64 device tensor.
    Returns ws.out (S, r, d) (overwritten by the next call with the same workspace)."""
    S, r, d = q.shape
    kern = built("split_kv", _build)
    d_pad = pow2_pad(d)
    n_all = tables.tab.shape[1]
    pdl = config.pdl and _has_pdl(q.device)
    bi, dc = combine_tile(config, tables.max_items, d_pad)
    kern["split"][(n_all,)](q, tables.k_base, tables.v_base, n_tail, tables.tab, ws.m, ws.lsum, ws.acc, n_all,
                            scaling * LOG2E, ws.done, tables.seg_first, tables.seg_count, ws.out, R=r,
                            R_PAD=pow2_pad(r), D=d, D_PAD=d_pad, BLOCK=config.block, ALIGN=tables.align,
                            FUSE=config.fused_combine, BLOCK_I=bi, PDL=pdl,
                            num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl)
    if not config.fused_combine:
        kern["combine"][(S, r, d_pad // dc)](ws.m, ws.lsum, ws.acc, tables.seg_first, tables.seg_count, ws.out,
                                             R=r, D=d, DC=dc, BLOCK_I=bi, PDL=pdl, num_warps=4, launch_pdl=pdl)
    return ws.out


def combine_tile(config: SplitKVConfig, max_items: int, d_pad: int) -> tuple[int, int]:
    """(items, columns) of one combine program's tile: at most config.combine_items items, no more than a segment
    has (`TritonTables.max_items`, rounded up to a power of two), and as many columns as keep the tile within
    combine_items × combine_cols elements (at most the padded head dim). So a long segment's merge is spread over
    narrow programs and a batch of short segments (one or two items each) gets few wide ones."""
    bi = min(config.combine_items, pow2_pad(max(1, max_items)))
    dc = min(d_pad, max(config.combine_cols, config.combine_items * config.combine_cols // bi))
    return bi, dc


def _has_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch needs compute capability 9.0 (Hopper) or later, and a real GPU (not Triton's
    interpreter)."""
    return (device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and cuda_capability(device)[0] >= 9)


def split_kv(q, k, v, items, tail_k, tail_v, n_tail, scaling, impl: str = "auto",
             config: SplitKVConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """One-off split-KV attention (tables built per call): impl 'triton', 'torch' or 'auto' (triton on CUDA when
    importable, else torch). Same arguments as `split_kv_torch`."""
    if not use_triton(impl, q):
        return split_kv_torch(q, k, v, items, tail_k, tail_v, n_tail, scaling)
    S, r, d = q.shape
    nt = n_tail if torch.is_tensor(n_tail) else torch.tensor([int(n_tail)], device=q.device)
    ws = make_workspace(items, S, r, d, q.dtype, q.device)
    return split_kv_triton(q.contiguous(), triton_tables(items, k, v, tail_k, tail_v), nt.reshape(1).long(),
                           scaling, ws, config)
