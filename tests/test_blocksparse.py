"""Quest-style block-sparse decode attention: the page bound is an upper bound of every key's logit, every page kept
is dense attention, the kept pages are the top bounds with the newest page always in, and the gathered output equals
dense attention with the other tokens masked out."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowkv_utils import blocksparse as bs
from flowkv_utils.kernels import split_kv_torch, triton_tables


def _qkv(G=2, r=3, n=37, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(G * r, d, generator=g), torch.randn(G, n, d, generator=g), torch.randn(G, n, d, generator=g))


def _dense(q, k, v, scaling, mask=None):
    G, n, d = k.shape
    logits = torch.einsum("grd,gnd->grn", q.view(G, -1, d), k) * scaling
    if mask is not None:
        logits = logits.masked_fill(~mask.unsqueeze(1), -math.inf)
    return torch.einsum("grn,gnd->grd", torch.softmax(logits, -1), v).reshape(-1, d)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 70), page=st.integers(1, 16), seed=st.integers(0, 10**6))
def test_page_bound_is_an_upper_bound_of_every_logit_of_the_group(n, page, seed):
    q, k, _ = _qkv(n=n, seed=seed)
    u = bs.page_scores(q, *bs.page_bounds(k, page))  # (G, pages)
    logits = torch.einsum("grd,gnd->grn", q.view(2, 3, -1), k).amax(1)  # (G, n): the group's largest logit
    per_token_bound = u.repeat_interleave(page, dim=1)[:, :n]
    assert (logits <= per_token_bound + 1e-5).all()
    assert u.shape == (2, bs.n_pages(n, page))


def test_every_page_kept_is_dense_attention():
    q, k, v = _qkv(n=50)
    out, pages = bs.blocksparse_attention(q, k, v, k_pages=100, page=8, scaling=0.3)
    assert pages.shape == (2, 7) and (pages == torch.arange(7)).all()
    torch.testing.assert_close(out, _dense(q, k, v, 0.3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,page,k_pages", [(50, 8, 3), (64, 16, 2), (33, 4, 5), (9, 16, 1)])
def test_gathered_pages_equal_dense_attention_over_their_tokens(n, page, k_pages):
    q, k, v = _qkv(n=n, seed=n)
    out, pages = bs.blocksparse_attention(q, k, v, k_pages, page, scaling=0.25)
    p = bs.n_pages(n, page)
    assert pages.shape == (2, min(k_pages, p)) and (pages[:, -1] == p - 1).all()  # the newest page always kept
    mask = bs.page_mask(pages, n, page)
    assert mask[:, -1].all() and int(mask.sum()) <= 2 * min(k_pages, p) * page
    torch.testing.assert_close(out, _dense(q, k, v, 0.25, mask), rtol=1e-5, atol=1e-6)


def test_selection_is_the_top_bounds_besides_the_newest_page_ties_to_the_earlier():
    scores = torch.tensor([[5.0, 1.0, 5.0, 3.0, 0.0], [0.0, 2.0, 2.0, 2.0, 9.0]])
    assert bs.select_pages(scores, 3).tolist() == [[0, 2, 4], [1, 2, 4]]
    assert bs.select_pages(scores, 1).tolist() == [[4], [4]]


@pytest.mark.parametrize("n,page,k_pages", [(50, 8, 3), (40, 16, 9), (33, 4, 5)])
def test_split_kv_over_the_page_items_is_blocksparse_attention(n, page, k_pages):
    """The kept pages as work items of the project's split-KV decode (packed cache of G full segments, one decoded
    token in the tail) give the same output as attending over the kept pages' tokens and the new token."""
    G, r, d = 2, 3, 8
    q, k, v = _qkv(G=G, r=r, n=n + 1, d=d, seed=n)
    prefix_k, prefix_v = k[:, :n], v[:, :n]  # the resident cache; token n is the new one, in the tail
    pages = bs.select_pages(bs.page_scores(q, *bs.page_bounds(prefix_k, page)), k_pages)
    items = bs.page_work_items(torch.arange(G + 1) * n, pages, page)
    assert items.count == G * pages.shape[1] and int((items.end - items.start).max()) <= page
    out = split_kv_torch(q.view(G, r, d), prefix_k.reshape(-1, d), prefix_v.reshape(-1, d), items, k[:, n:],
                         v[:, n:], 1, scaling=0.25)
    mask = torch.cat([bs.page_mask(pages, n, page), torch.ones(G, 1, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(out.reshape(-1, d), _dense(q, k, v, 0.25, mask), rtol=1e-5, atol=1e-6)


def test_page_tables_rewritten_in_place_equal_tables_built_afresh():
    """Tables built once for 3 pages per segment and updated with the next step's pages are the tables the split-KV
    kernel would get from its own builder for those pages (CPU tensors: the tables are plain integers)."""
    G, n, d, page = 2, 40, 8, 8
    k, v = torch.randn(G * n, d), torch.randn(G * n, d)
    tail_k, tail_v = torch.zeros(G, 4, d), torch.zeros(G, 4, d)
    off = torch.arange(G + 1) * n
    first, later = torch.tensor([[0, 1, 4], [1, 3, 4]]), torch.tensor([[2, 3, 4], [0, 2, 4]])
    tables = triton_tables(bs.page_work_items(off, first, page), k, v, tail_k, tail_v)
    bs.update_page_tables(tables, bs.page_work_items(off, later, page), d)
    fresh = triton_tables(bs.page_work_items(off, later, page), k, v, tail_k, tail_v)
    assert torch.equal(tables.tab, fresh.tab) and torch.equal(tables.seg_first, fresh.seg_first)
    with pytest.raises(ValueError, match="same number of kept pages"):
        bs.update_page_tables(tables, bs.page_work_items(off, later[:, :2], page), d)


def test_bad_input_is_named():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="page=0"):
        bs.page_bounds(k, 0)
    with pytest.raises(ValueError, match="k_pages=0"):
        bs.select_pages(torch.zeros(2, 3), 0)
    with pytest.raises(ValueError, match="not a multiple"):
        bs.page_scores(q[:5], *bs.page_bounds(k, 4))
    with pytest.raises(ValueError, match="starts past its segment"):
        bs.page_work_items(torch.tensor([0, 10, 20]), torch.tensor([[0, 3], [1, 2]]), 4)
    with pytest.raises(ValueError, match="expected the same shape"):
        bs.blocksparse_attention(q, k, v[:, :-1], 2, 4, 1.0)


# ------------------------------------------------------------------- the method in decode: PageAttend over a cache
def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_page_attend_reading_every_page_is_the_full_cache_decode(tiny):
    from flowkv_utils import generate
    from flowkv_utils.cache import RaggedCache

    m, pf, _ = tiny
    c_ref, c_bs = RaggedCache.from_prefill(pf, capacity=8), RaggedCache.from_prefill(pf, capacity=8)
    attend = bs.PageAttend(budget=1.0, page=16)
    assert attend.k_pages(90) == 6
    for t in (5, 17, 42):
        a = generate.decode(m, c_ref, torch.tensor([[t]]))[-1]
        b = generate.decode(m, c_bs, torch.tensor([[t]]), attend=attend)[-1]
        assert _rel(b, a) < 1e-5


def test_page_attend_reads_the_top_pages_and_every_decoded_token(tiny):
    """One layer's call equals dense attention over the kept pages' tokens and the tail's decoded tokens."""
    from flowkv_utils.cache import RaggedCache

    _, pf, _ = tiny
    cache = RaggedCache.from_prefill(pf, capacity=8)
    lay = cache.layers[0]
    G, n, d = 2, 90, 16
    g = torch.Generator().manual_seed(1)
    lay.tail_k[:, :3], lay.tail_v[:, :3] = torch.randn(G, 3, d, generator=g), torch.randn(G, 3, d, generator=g)
    cache.used, cache.next_pos = 2, 92  # two decoded tokens before this one: the call sees 3 tail tokens
    q = torch.randn(8, 1, d, generator=g)
    attend = bs.PageAttend(budget=20, page=8)  # ⌈20 / 8⌉ = 3 pages of 8 tokens per KV head
    out = attend(cache, 0, q, 1, 0.25)
    k, v = lay.k.view(G, n, d), lay.v.view(G, n, d)
    pages = bs.select_pages(bs.page_scores(q.view(8, d), *bs.page_bounds(k, 8)), 3)
    mask = torch.cat([bs.page_mask(pages, n, 8), torch.ones(G, 3, dtype=torch.bool)], 1)
    ref = _dense(q.view(8, d), torch.cat([k, lay.tail_k[:, :3]], 1), torch.cat([v, lay.tail_v[:, :3]], 1), 0.25, mask)
    assert (pages[:, -1] == 11).all()  # the prompt's last page (2 tokens of 90 = 11·8 + 2) is always read
    assert int(bs.page_mask(pages, n, 8).sum()) == G * (2 * 8 + 2)
    torch.testing.assert_close(out.view(8, d), ref, rtol=1e-5, atol=1e-6)


def test_page_attend_refuses_what_it_cannot_do(tiny):
    from flowkv_utils.cache import RaggedCache

    m, pf, res = tiny
    with pytest.raises(ValueError, match="'full' is plain attention"):
        bs.PageAttend(budget="full")
    with pytest.raises(ValueError, match="page=0"):
        bs.PageAttend(budget=0.1, page=0)
    compressed = RaggedCache.from_prefill(pf, res, capacity=8)  # FlowKV kept 24 of 90 per head on average
    with pytest.raises(ValueError, match="whole resident prompt"):
        bs.PageAttend(budget=0.1)(compressed, 0, torch.randn(8, 1, 16), 1, 0.25)


# ------------------------------------------------------ the method in the fast decoder: PageDecode in FastDecoder
def _whole(pf, batch: int = 1, capacity: int = 8):
    from flowkv_utils.fastdecode import StaticRaggedCache

    L, G = len(pf.layers), pf.layers[0].k.shape[0]
    return StaticRaggedCache.from_keeps(pf, torch.ones(batch, L, G, pf.n, dtype=torch.bool), None, capacity)


def test_page_decode_selects_the_reference_pages(tiny):
    """q⁺·M + q⁻·m is Quest's bound: the same pages as page_scores + select_pages (float32, no ties)."""
    _, pf, _ = tiny
    cache = _whole(pf, batch=2)
    dec = bs.PageDecode(cache, budget=20, page=8)
    g = torch.Generator().manual_seed(3)
    for li in range(len(pf.layers)):
        qs = torch.randn(4, 4, 16, generator=g)  # (B·G, r, d)
        got = dec.select(li, qs)
        k = pf.layers[li].k  # (G, n, d), the same prompt in both sequences
        for s in range(4):
            want = bs.select_pages(bs.page_scores(qs[s], *bs.page_bounds(k[s % 2: s % 2 + 1], 8)), 3)
            assert torch.equal(got[s], want[0])


def test_page_decode_in_the_fast_decoder_is_page_attend_in_generate_decode(tiny):
    from flowkv_utils import generate
    from flowkv_utils.cache import RaggedCache
    from flowkv_utils.fastdecode import FastDecoder

    m, pf, _ = tiny
    ref_cache = RaggedCache.from_prefill(pf, capacity=8)
    attend = bs.PageAttend(budget=0.2, page=8)
    cache = _whole(pf)
    dec = FastDecoder(m, cache, sparse=bs.PageDecode(cache, budget=0.2, page=8))
    assert dec.label.endswith("+pages8")
    for t in (5, 17, 42):
        a = generate.decode(m, ref_cache, torch.tensor([[t]]), attend=attend)[-1]
        b = dec.step(torch.tensor([t]))[0]
        assert _rel(b, a) < 1e-5
    full = FastDecoder(m, _whole(pf)).step(torch.tensor([5]))[0]
    assert _rel(FastDecoder(m, c := _whole(pf), sparse=bs.PageDecode(c, 0.2, 8)).step(torch.tensor([5]))[0], full) > 1e-4


def test_page_decode_reads_its_pages_bounds_and_tail():
    from flowkv_utils.fastdecode import StaticRaggedCache

    L, B, G, n, d = 2, 1, 2, 100, 16
    cache = StaticRaggedCache.from_lengths(torch.full((L, B, G), n), d, capacity=4, next_pos=n, dtype=torch.float32)
    dec = bs.PageDecode(cache, budget=0.1, page=8)  # ⌈10 / 8⌉ = 2 pages; 13 pages of bounds
    assert dec.layers[0]["k_pages"] == 2
    assert dec.read_bytes() == L * G * d * 4 * (2 * 16 + 2 * 13 + 2 * 4)
    assert dec.read_bytes() < cache.kept_bytes()  # reads less than it holds: bandwidth saved, memory not


def test_page_decode_refuses_evicted_caches(tiny):
    from flowkv_utils.fastdecode import StaticRaggedCache

    _, pf, res = tiny
    keep = res.keep.unsqueeze(0)
    with pytest.raises(ValueError, match="whole resident prompts"):
        bs.PageDecode(StaticRaggedCache.from_keeps(pf, keep, None, 4), 0.1)
    with pytest.raises(ValueError, match="'full'"):
        bs.PageDecode(_whole(pf), "full")
