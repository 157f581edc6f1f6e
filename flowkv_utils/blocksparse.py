"""Block-sparse decode attention, Quest-style: the whole KV cache stays resident, and each decode step reads only a
query-aware top-k of fixed-size pages per KV head (issue 14's comparator for eviction: it saves bandwidth, not
memory).

Quest (Tang et al., 2024) keeps, per page of P consecutive keys, the elementwise minimum m and maximum M of the keys.
For a query q the largest logit any key k of the page can reach is bounded by

    u(q, page) = Σ_i max(q_i · m_i, q_i · M_i)  ≥  max_{k ∈ page} q · k,

since for every coordinate q_i k_i lies between q_i m_i and q_i M_i. The step keeps the k_pages pages of largest u
(ties to the earlier page) and attends exactly over their tokens (softmax over the kept tokens only). Quest is
defined per attention head; with grouped-query attention the KV head's pages are shared by its r query heads, so
here a page's bound is the **maximum over the group's query heads** (a page any head of the group may need) — the
project's choice for GQA, stated wherever it is used. The page holding the newest token is always kept (Quest
attends to the current page), so the newest token is always seen.

Shapes: q (H, d) one decode query per query head, k/v (G, n, d) one sequence's cache, H = r·G.

- `page_bounds(k, page)`: per-page key minimum and maximum (G, n_pages, d) — computed once per page as it fills.
- `page_scores(q, kmin, kmax)`: u per (KV head, page), the group maximum (G, n_pages).
- `select_pages(scores, k_pages)`: indices (G, k_pages) of the kept pages, ascending, the last page always in.
- `page_mask(pages, n, page)`: the kept tokens as a bool mask (G, n).
- `page_work_items(offsets, pages, page)`: the kept pages as the split-KV kernel's work items (one item per kept
  page, built on the device with a fixed count, so the step stays graph-capturable): the project's split-KV decode
  (`kernels.split_kv_torch` / `split_kv_triton`) then reads only those pages of the resident packed cache.
- `update_page_tables(tables, items, d)`: the Triton kernel's tables, built once by `kernels.triton_tables` from a
  first step's page items, rewritten in place on the device for each later step (what a captured graph replays).
- `PageAttend(budget, page)`: `generate.decode(..., attend=PageAttend(0.05))` — the method itself over a resident
  full cache (`cache.RaggedCache.from_prefill(pf)`, nothing evicted): every decode step and layer, each KV head reads
  ⌈B/page⌉ pages of its prompt (B: the budget's tokens per head) plus every decoded token, through the split-KV
  kernel. So block-sparse answers can be scored like an eviction policy's at the same bytes read per step.
- `PageDecode(cache, budget, page)`: the same method inside `fastdecode.FastDecoder(..., sparse=PageDecode(...))`
  over a `fastdecode.StaticRaggedCache` of B whole prompts: page bounds stored once per layer in the cache's dtype
  (the min and max of bf16 keys are bf16 numbers: exact), per step the bound of every page as two batched matrix
  products (max(q_i m_i, q_i M_i) = q_i⁺ M_i + q_i⁻ m_i), a top-k of pages, the work items and Triton tables
  rewritten in place: fixed shapes and no host round trip, so the whole step is one CUDA graph. `read_bytes()`: the
  bytes a step reads from the cache (kept pages, bounds, tail) — the floor of a block-sparse row.
- `blocksparse_attention(q, k, v, k_pages, page, scaling)`: the decode output (H, d) from the kept pages only
  (gathered: what a step reads), and the kept page indices. A torch reference of the semantics; the H200 kernel and
  its timings are issue 14's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .budgets import parse_budget
from .kernels import (
    DEFAULT_CONFIG,
    SplitKVConfig,
    TritonTables,
    WorkItems,
    make_workspace,
    split_kv_torch,
    split_kv_triton,
    triton_tables,
    use_triton,
)


def _check_page(page: int) -> None:
    if isinstance(page, bool) or not isinstance(page, int) or page < 1:
        raise ValueError(f"page={page!r}: the page size must be a positive int (tokens per page, e.g. 16 or 64)")


def _check_budget(budget) -> int | float:
    """A block-sparse budget in canonical form (int tokens per KV head or a float fraction of the prompt)."""
    b = parse_budget(budget)
    if not isinstance(b, (int, float)) or isinstance(b, bool):
        raise ValueError(f"budget={budget!r}: block-sparse attention reads a part of the cache: give tokens per KV "
                         "head (int) or a fraction of the prompt (float); 'full' is plain attention")
    return b


def n_pages(n: int, page: int) -> int:
    """Pages of `page` tokens needed for n tokens (the last may be partial)."""
    _check_page(page)
    return math.ceil(n / page)


def page_bounds(k: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kmin, kmax), each (G, n_pages, d) float32: the elementwise min and max of each page's keys; a partial last
    page uses only its real tokens."""
    if k.dim() != 3:
        raise ValueError(f"k has shape {tuple(k.shape)}: expected (G, n, d), one sequence's keys")
    G, n, d = k.shape
    if n == 0:
        raise ValueError("k holds no tokens: a page bound needs at least one key")
    p = n_pages(n, page)
    pad = p * page - n
    kf = k.float()
    lo = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=math.inf).view(G, p, page, d).amin(2)
    hi = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=-math.inf).view(G, p, page, d).amax(2)
    return lo, hi


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound u = Σ_i max(q_i m_i, q_i M_i) per (query head, page), maximised over the query heads
    of each KV head's group: (G, n_pages) float32. q: (H, d) with H a multiple of G."""
    if q.dim() != 2 or kmin.dim() != 3 or kmin.shape != kmax.shape or q.shape[-1] != kmin.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)}, kmin {tuple(kmin.shape)}, kmax {tuple(kmax.shape)}: expected q (H, d) "
                         "and kmin = kmax shapes (G, pages, d) of the same d")
    H, G = q.shape[0], kmin.shape[0]
    if H % G:
        raise ValueError(f"{H} query heads are not a multiple of the {G} KV heads")
    qg = q.float().view(G, H // G, 1, -1)  # (G, r, 1, d)
    u = torch.maximum(qg * kmin.unsqueeze(1), qg * kmax.unsqueeze(1)).sum(-1)  # (G, r, pages)
    return u.amax(1)


def select_pages(scores: torch.Tensor, k_pages: int) -> torch.Tensor:
    """Indices (G, k_pages), ascending, of the kept pages per KV head: the last page (the newest token's) always,
    then the k_pages − 1 other pages of largest bound, ties to the earlier page. k_pages ≥ the page count keeps
    every page."""
    if isinstance(k_pages, bool) or not isinstance(k_pages, int) or k_pages < 1:
        raise ValueError(f"k_pages={k_pages!r}: must be an int ≥ 1 (the newest page is always kept)")
    G, p = scores.shape
    k_pages = min(k_pages, p)
    s = scores.float().clone()
    s[:, -1] = math.inf  # the current page
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :k_pages]
    return order.sort(dim=-1).values


def page_mask(pages: torch.Tensor, n: int, page: int) -> torch.Tensor:
    """Bool mask (G, n) of the tokens of the kept pages (the indices of `select_pages`)."""
    p = n_pages(n, page)
    kept = torch.zeros(pages.shape[0], p, dtype=torch.bool, device=pages.device)
    kept.scatter_(1, pages, True)
    return kept.repeat_interleave(page, dim=1)[:, :n]


def blocksparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pages: int, page: int,
                          scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of Quest-style attention over one sequence's resident cache: (output (H, d) in q's dtype,
    kept page indices (G, k_pages)). Gathers only the kept pages' keys and values (k_pages·page tokens per KV head
    instead of n; the pad of a partial last page is masked) and takes the softmax (float32) over their tokens."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)}: expected the same shape (G, n, d)")
    G, n, d = k.shape
    kmin, kmax = page_bounds(k, page)
    pages = select_pages(page_scores(q, kmin, kmax), k_pages)  # (G, kp)
    p, kp = kmin.shape[1], pages.shape[1]
    pad = p * page - n

    def gathered(x: torch.Tensor) -> torch.Tensor:  # (G, kp·page, d): the kept pages only
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).view(G, p, page, d)
        return torch.gather(x, 1, pages.view(G, kp, 1, 1).expand(G, kp, page, d)).view(G, kp * page, d)

    token = (pages.unsqueeze(-1) * page + torch.arange(page, device=k.device)).view(G, kp * page)
    H = q.shape[0]
    logits = torch.einsum("grd,gnd->grn", q.float().view(G, H // G, d), gathered(k)) * scaling
    logits = logits.masked_fill((token >= n).unsqueeze(1), -math.inf)  # the pad of a partial last page
    out = torch.einsum("grn,gnd->grd", torch.softmax(logits, dim=-1), gathered(v))
    return out.reshape(H, d).to(q.dtype), pages


def page_work_items(offsets: torch.Tensor, pages: torch.Tensor, page: int, check: bool = True) -> WorkItems:
    """Work items (`kernels.WorkItems`) covering exactly the kept pages: segment s = (sequence, KV head) of the
    packed layout (rows offsets[s]:offsets[s+1]), kept pages pages[s] (S, k_pages) ascending; item (s, j) covers
    rows [offsets[s] + pages[s, j]·page, min(that + page, offsets[s+1])). Device tensors in, device tensors out, and
    always S·k_pages items (CUDA-graph friendly: only the starts and ends change from step to step). check: verify
    that every page lies inside its segment (a device sync: pass False inside a captured step)."""
    _check_page(page)
    S, kp = pages.shape
    if offsets.shape != (S + 1,):
        raise ValueError(f"offsets has shape {tuple(offsets.shape)}: expected ({S + 1},) for {S} segments of pages")
    off = offsets.to(pages.device, torch.long)
    seg = torch.arange(S, device=pages.device).repeat_interleave(kp)
    start = off[seg] + pages.reshape(-1).long() * page
    end = torch.minimum(start + page, off[seg + 1])
    if check and bool((start >= off[seg + 1]).any()):
        raise ValueError("a kept page starts past its segment's end: pages must index the segment's own pages")
    return WorkItems(seg.to(torch.int32), start, end,
                     (torch.arange(S + 1, device=pages.device) * kp).to(torch.int32), page)


def update_page_tables(tables: TritonTables, items: WorkItems, d: int) -> TritonTables:
    """Write this step's page items into tables that `kernels.triton_tables` built from page items of the same
    segments and page count (the layout never changes: every segment has k_pages items and its tail item), in
    place and on the device (no host round trip): rows 1–3 of each segment's prefix items (K and V element offsets,
    keys). d: the head dimension (the tables address elements)."""
    S = tables.seg_count.numel()
    kp = items.count // max(1, S)
    if items.count != S * kp or tables.tab.shape[1] != S * (kp + 1):  # shapes only: no device sync in a graph
        raise ValueError(f"{items.count} page items for {S} segments whose tables hold "
                         f"{tables.tab.shape[1] // max(1, S) - 1} prefix items each: build the tables "
                         "(kernels.triton_tables) with the same number of kept pages")
    pos = (tables.seg_first.view(S, 1) + torch.arange(kp, device=tables.tab.device)).reshape(-1)
    start = items.start.to(tables.tab.device, torch.long)
    tables.tab[1, pos] = start * d
    tables.tab[2, pos] = start * d
    tables.tab[3, pos] = items.end.to(tables.tab.device, torch.long) - start
    return tables


@dataclass
class PageAttend:
    """`generate.decode(model, cache, ids, attend=PageAttend(budget=0.05, page=16))`: Quest-style block-sparse
    attention for one new token (T = 1) over a cache whose prompt part is whole (every KV head holds all n prompt
    tokens: `RaggedCache.from_prefill(pf)` with no policy). Per layer and step: the page bounds of the prompt (computed
    once per layer), the ⌈B/page⌉ pages of largest bound per KV head (B = the budget's tokens per head, a token count
    or a fraction of the prompt as everywhere; the prompt's last page always), and the decoded tokens of the tail,
    all of them (the newest page); the split-KV kernel reads only those. T > 1 (teacher forcing) falls back to the
    reference `cache.attend` over the whole cache. Use one instance per cache."""

    budget: int | float = 0.05
    page: int = 16
    impl: str = "auto"
    _cache: object = field(default=None, repr=False)
    _bounds: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.budget = _check_budget(self.budget)  # canonical: int tokens per KV head or a float fraction
        _check_page(self.page)

    def k_pages(self, n: int) -> int:
        """Pages read per KV head for a prompt of n tokens (`pages_for`)."""
        return pages_for(self.budget, n, self.page)

    def __call__(self, cache, layer: int, q: torch.Tensor, T: int, scaling: float) -> torch.Tensor:
        if T != 1:
            return cache.attend(layer, q, T, scaling)
        if self._cache is not cache:
            self._cache, self._bounds = cache, {}
        lay = cache.layers[layer]
        lengths = lay.lengths
        G, (H, _, d) = lengths.numel(), q.shape
        n = int(lengths[0])
        if layer not in self._bounds:
            prompt = cache.next_pos - cache.used  # the prompt's tokens (positions 0 … prompt − 1)
            if not bool((lengths == prompt).all()) or prompt == 0:
                raise ValueError(f"layer {layer}: KV heads hold {sorted(set(lengths.tolist()))} of the prompt's "
                                 f"{prompt} tokens; block-sparse attention runs over the whole resident prompt (a "
                                 "cache built with no policy: RaggedCache.from_prefill(pf))")
            self._bounds[layer] = page_bounds(lay.k.view(G, n, d), self.page)
        pages = select_pages(page_scores(q.reshape(H, d), *self._bounds[layer]), self.k_pages(n))
        items = page_work_items(lay.offsets, pages, self.page, check=False)
        qg = q.reshape(G, H // G, d).contiguous()
        if not use_triton(self.impl, q):
            return split_kv_torch(qg, lay.k, lay.v, items, lay.tail_k, lay.tail_v, cache.used + 1,
                                  scaling).reshape(H, 1, d)
        tables = triton_tables(items, lay.k, lay.v, lay.tail_k, lay.tail_v)  # eager path: rebuilt every step
        ws = make_workspace(items, G, H // G, d, q.dtype, q.device)
        nt = torch.full((1,), cache.used + 1, dtype=torch.long, device=q.device)
        return split_kv_triton(qg, tables, nt, scaling, ws).reshape(H, 1, d).clone()


def pages_for(budget: int | float, n: int, page: int) -> int:
    """Pages read per KV head for a prompt of n tokens at a budget (tokens per KV head, or a fraction of the prompt):
    ⌈B/page⌉, at least 1, at most every page."""
    tokens = budget if isinstance(budget, int) else budget * n
    return max(1, min(n_pages(n, page), math.ceil(tokens / page)))


class PageDecode:
    """Quest-style block-sparse attention for `fastdecode.FastDecoder(model, cache, sparse=PageDecode(cache, 0.05))`:
    every segment (sequence, KV head) of the `StaticRaggedCache` holds its whole prompt of n tokens; each step and
    layer it reads ⌈B/page⌉ pages of the prompt per segment (the last page always) and every decoded token of the
    tail (see the module docstring). Bounds are kept in the cache's dtype; page bounds u are computed as
    q⁺·M + q⁻·m in that dtype's matrix products (float32 on the CPU), so near-equal bounds may rank differently
    from the float32 reference `page_scores` on a bf16 cache. One instance per cache."""

    def __init__(self, cache, budget: int | float = 0.05, page: int = 16, impl: str = "auto",
                 config: SplitKVConfig = DEFAULT_CONFIG):
        b = _check_budget(budget)
        _check_page(page)
        self.budget, self.page, self.config = b, page, config
        self.cache = cache
        lay0 = cache.layers[0]
        self.triton = use_triton(impl, lay0.k)
        self.layers = []
        for li, lay in enumerate(cache.layers):
            lengths = (lay.offsets[1:] - lay.offsets[:-1]).tolist()
            if len(set(lengths)) != 1 or lengths[0] == 0:
                raise ValueError(f"layer {li}: segments hold {sorted(set(lengths))} tokens; block-sparse attention "
                                 "runs over whole resident prompts (every segment the same n tokens, nothing evicted)")
            S, n, d = len(lengths), lengths[0], lay.k.shape[1]
            kmin, kmax = page_bounds(lay.k.view(S, n, d), page)
            kp = pages_for(b, n, page)
            first = torch.arange(kp, device=lay.k.device).expand(S, kp)
            items = page_work_items(lay.offsets.to(lay.k.device), first, page)
            plan = dict(kmin=kmin.to(lay.k.dtype), kmax=kmax.to(lay.k.dtype), k_pages=kp, n=n,
                        offsets=lay.offsets.to(lay.k.device), items=items)
            if self.triton:
                plan["tables"] = triton_tables(items, lay.k, lay.v, lay.tail_k, lay.tail_v)
                plan["ws"] = None  # sized on the first call, when the group size r is known
            self.layers.append(plan)

    def select(self, li: int, qs: torch.Tensor) -> torch.Tensor:
        """Kept pages (S, k_pages), ascending, of layer li for the queries qs (S, r, d): the last page always."""
        p = self.layers[li]
        q = qs.to(p["kmax"].dtype)
        u = torch.bmm(q.clamp(min=0), p["kmax"].transpose(1, 2)) + torch.bmm(q.clamp(max=0), p["kmin"].transpose(1, 2))
        u = u.float().amax(1)  # (S, pages): the group's largest bound
        u[:, -1] = math.inf
        return torch.topk(u, p["k_pages"], dim=-1, sorted=False).indices.sort(dim=-1).values

    def attend(self, li: int, qs: torch.Tensor, n_tail: torch.Tensor, scaling: float) -> torch.Tensor:
        """The step's attention output (S, r, d) of layer li (the new token already in the tail)."""
        p, lay = self.layers[li], self.cache.layers[li]
        items = page_work_items(p["offsets"], self.select(li, qs), self.page, check=False)
        if not self.triton:
            return split_kv_torch(qs, lay.k, lay.v, items, lay.tail_k, lay.tail_v, n_tail, scaling)
        if p["ws"] is None:
            p["ws"] = make_workspace(items, qs.shape[0], qs.shape[1], qs.shape[2], qs.dtype, qs.device)
        update_page_tables(p["tables"], items, qs.shape[2])
        return split_kv_triton(qs, p["tables"], n_tail, scaling, p["ws"], self.config)

    def read_bytes(self) -> int:
        """Bytes a step reads from the cache: the kept pages' keys and values, both page bounds of every page, and
        the tail (the decoded tokens, counted at its full capacity: an upper bound)."""
        total = 0
        for p, lay in zip(self.layers, self.cache.layers, strict=True):
            S, d, esz = p["kmin"].shape[0], lay.k.shape[1], lay.k.element_size()
            tokens = min(p["k_pages"] * self.page, p["n"])
            total += S * d * esz * (2 * tokens + 2 * p["kmin"].shape[1] + 2 * lay.tail_k.shape[1])
        return total
