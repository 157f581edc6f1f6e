"""The split-KV decode path: work items, the PyTorch split-KV against `RaggedCache.attend`, the Triton tables'
addressing, the static decode step against `generate.decode`. GPU parts skip without CUDA (CI has none); the Triton
kernels themselves are checked on the GPU by `python -m flowkv_utils.bench gpu` (results/gpu/check.csv)."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowkv_utils import capture, fastdecode, generate, kernels, policies
from flowkv_utils.cache import RaggedCache, RaggedLayer
from flowkv_utils.kernels.split_kv import combine_tile, offset_alignment


def ragged_layer(lengths, d=16, cap=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = len(lengths)
    off = torch.zeros(G + 1, dtype=torch.long)
    off[1:] = torch.cumsum(torch.tensor(lengths), 0)
    N = int(off[-1])
    k, v = (torch.randn(N, d, generator=g).to(dtype) for _ in range(2))
    tk, tv = (torch.randn(G, cap, d, generator=g).to(dtype) for _ in range(2))
    return RaggedLayer(k, v, off, tk, tv)


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_module_imports_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    mod = importlib.reload(kernels._triton)
    assert mod.triton_available() is False
    importlib.reload(kernels._triton)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=1, max_size=8), st.integers(1, 70))
def test_work_items_cover_each_segment_exactly(lengths, split):
    off = torch.zeros(len(lengths) + 1, dtype=torch.long)
    off[1:] = torch.cumsum(torch.tensor(lengths), 0)
    it = kernels.work_items(off, split)
    for s, n in enumerate(lengths):
        a, b = int(it.seg_item_off[s]), int(it.seg_item_off[s + 1])
        rows = [r for i in range(a, b) for r in range(int(it.start[i]), int(it.end[i]))]
        assert rows == list(range(int(off[s]), int(off[s + 1])))  # every kept row once, in order
        assert all(int(it.seg[i]) == s for i in range(a, b))
        assert all(0 < int(it.end[i] - it.start[i]) <= split for i in range(a, b))
        assert b - a == -(-n // split)  # empty segments get no item


def test_choose_split_is_a_multiple_of_the_tile():
    for total in (0, 1, 100, 10_000, 1_638_400):
        s = kernels.choose_split(total, 1056, block=32)
        assert s % 32 == 0 and 32 <= s <= 8192
    assert kernels.choose_split(1_638_400, 1056, block=32) * 1056 >= 1_638_400


@pytest.mark.parametrize("lengths,r,used", [([0, 1, 130, 7], 4, 0), ([300, 0], 2, 5), ([64, 64, 64], 1, 7),
                                            ([0, 0], 3, 2), ([1000, 3, 0, 17, 250], 2, 1)])
@pytest.mark.parametrize("split", [1, 16, 64, 4096])
def test_split_kv_torch_matches_reference_attention(lengths, r, used, split):
    lay = ragged_layer(lengths, seed=split + used)
    G, d = len(lengths), lay.k.shape[1]
    cache = RaggedCache([lay], next_pos=int(lay.offsets[-1]))
    cache.used = used
    q = torch.randn(G * r, 1, d, generator=torch.Generator().manual_seed(1))
    ref = cache.attend(0, q, 1, d ** -0.5)  # (H, 1, d)
    items = kernels.work_items(lay.offsets, split)
    lay.tail_k[:, used + 1:] = float("nan")  # unwritten tail slots must never be read
    lay.tail_v[:, used + 1:] = float("nan")
    out = kernels.split_kv_torch(q.view(G, r, d), lay.k, lay.v, items, lay.tail_k, lay.tail_v, used + 1, d ** -0.5)
    assert torch.isfinite(out).all()
    assert rel(out.reshape(G * r, 1, d), ref) < 1e-5


def test_split_kv_torch_bf16_within_tolerance():
    lay = ragged_layer([500, 0, 37, 2048], d=64, dtype=torch.bfloat16)
    cache = RaggedCache([lay], next_pos=0)
    q = torch.randn(8, 1, 64).to(torch.bfloat16)
    lay64 = RaggedLayer(lay.k.double(), lay.v.double(), lay.offsets, lay.tail_k.double(), lay.tail_v.double())
    ref = RaggedCache([lay64], next_pos=0).attend(0, q.double(), 1, 0.125)
    out = kernels.split_kv(q.view(4, 2, 64), lay.k, lay.v, kernels.work_items(lay.offsets, 64), lay.tail_k,
                           lay.tail_v, 1, 0.125, impl="torch")
    assert rel(out.reshape(8, 1, 64), ref) < 1e-2
    assert cache.kept_entries() == 500 + 37 + 2048


def test_split_kv_rejects_unknown_impl():
    lay = ragged_layer([3])
    with pytest.raises(ValueError, match="impl='cuda'"):
        kernels.split_kv(torch.zeros(1, 1, 16), lay.k, lay.v, kernels.work_items(lay.offsets, 4), lay.tail_k,
                         lay.tail_v, 1, 1.0, impl="cuda")


def test_triton_tables_address_the_right_rows():
    """Item i's element offsets, relative to the packed K/V, land on its first key (prefix items) or on its
    segment's tail slot 0 (tail items); lengths and tail flags as the kernel reads them."""
    lay = ragged_layer([0, 5, 70, 3], d=16, cap=8)
    items = kernels.work_items(lay.offsets, 32)
    t = kernels.triton_tables(items, lay.k, lay.v, lay.tail_k, lay.tail_v)
    esz, base_k, base_v = lay.k.element_size(), t.k_base.data_ptr(), t.v_base.data_ptr()
    for s in range(4):
        a, c = int(t.seg_first[s]), int(t.seg_count[s])
        seg_rows = []
        for i in range(a, a + c):
            seg, ko, vo, n, tail = (int(x) for x in t.tab[:, i])
            assert seg == s
            if tail:
                assert n == 0 and base_k + ko * esz == lay.tail_k[s].data_ptr()
                assert base_v + vo * esz == lay.tail_v[s].data_ptr()
                assert i == a + c - 1  # the tail item comes last
            else:
                assert ko == vo and ko % 16 == 0
                seg_rows += list(range(ko // 16, ko // 16 + n))
        assert seg_rows == list(range(int(lay.offsets[s]), int(lay.offsets[s + 1])))


@given(lengths=st.lists(st.integers(0, 90), min_size=1, max_size=5), d=st.sampled_from([8, 12, 16, 64, 80]),
       cap=st.integers(1, 9), split=st.integers(1, 40), pad=st.integers(0, 7))
@settings(max_examples=60, deadline=None)
def test_triton_tables_alignment_divides_every_offset(lengths, d, cap, split, pad):
    """The alignment the kernel is told (`TritonTables.align`, a power of two ≤ 16) divides every K and V element
    offset of the tables, also when the tail tensors start at an odd element distance from the packed prefix."""
    lay = ragged_layer(lengths, d=d, cap=cap)
    store = torch.zeros(pad + 2 * len(lengths) * cap * d)  # tails at an arbitrary element offset `pad`
    tk = store[pad:pad + len(lengths) * cap * d].view(len(lengths), cap, d)
    tv = store[pad + len(lengths) * cap * d:].view(len(lengths), cap, d)
    t = kernels.triton_tables(kernels.work_items(lay.offsets, split), lay.k, lay.v, tk, tv)
    a = t.align
    assert 1 <= a <= 16 and a & (a - 1) == 0
    assert bool((t.tab[1] % a == 0).all()) and bool((t.tab[2] % a == 0).all())
    assert offset_alignment(0, 0) == 16 and offset_alignment(96, 40) == 8 and offset_alignment(128, 3) == 1


def test_combine_tile_fits_the_longest_segment_and_keeps_its_area():
    """The combine's tile: no more items than the longest segment has (a power of two ≥ 16), at most
    combine_items, and as many columns as keep the tile at combine_items × combine_cols (≤ the head dim)."""
    cfg = kernels.DEFAULT_CONFIG.replace(combine_items=256, combine_cols=32)
    assert combine_tile(cfg, 1000, 128) == (256, 32)  # a long segment: narrow programs
    assert combine_tile(cfg, 68, 128) == (128, 64)
    assert combine_tile(cfg, 2, 128) == (16, 128)  # a batch of short segments: one program per query row
    assert combine_tile(cfg, 2, 64) == (16, 64)
    for items in (1, 3, 17, 70, 200, 300, 5000):
        bi, dc = combine_tile(cfg, items, 128)
        assert bi <= 256 and (bi >= items or bi == 256) and bi * dc <= 256 * 32 and dc <= 128
        t = kernels.triton_tables(kernels.work_items(torch.tensor([0, 10 * items]), 10), torch.zeros(10 * items, 8),
                                  torch.zeros(10 * items, 8), torch.zeros(1, 4, 8), torch.zeros(1, 4, 8))
        assert t.max_items == items + 1  # the segment's prefix items and its tail item


@pytest.mark.skipif(os.environ.get("FLOWKV_TRITON_INTERPRET") != "1",
                    reason="opt-in: Triton's CPU interpreter (FLOWKV_TRITON_INTERPRET=1, triton installed)")
def test_triton_kernels_in_the_interpreter(monkeypatch):  # pragma: no cover - needs triton
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    lay = ragged_layer([0, 1, 130, 7], d=32, cap=8)
    items = kernels.work_items(lay.offsets, 3)
    q = torch.randn(4, 2, 32)
    a = kernels.split_kv_torch(q, lay.k, lay.v, items, lay.tail_k, lay.tail_v, 3, 0.2)
    try:
        b = kernels.split_kv(q, lay.k, lay.v, items, lay.tail_k, lay.tail_v, torch.tensor([3]), 0.2, impl="triton")
    except Exception as e:  # seen with triton 3.6 + NumPy 2: the interpreter cannot loop up to a loaded bound
        if "0-dimensional arrays" in str(e):
            pytest.xfail("this Triton interpreter cannot run `for s in range(0, n, BLOCK)` with n loaded from memory")
        raise
    assert rel(b, a) < 1e-5


@pytest.mark.skipif(os.environ.get("FLOWKV_TRITON_INTERPRET") != "1",
                    reason="opt-in: Triton's CPU interpreter (FLOWKV_TRITON_INTERPRET=1, triton installed)")
@pytest.mark.parametrize("G,r,d,w,m", [(2, 4, 16, 8, 92), (3, 3, 64, 5, 65), (4, 1, 32, 32, 1), (1, 2, 24, 3, 40)])
@pytest.mark.parametrize("vtype,precision", [(torch.float16, "split"), (torch.float32, "split"),
                                             (torch.bfloat16, "ieee")])
def test_flowkv_score_kernel_in_the_interpreter(monkeypatch, G, r, d, w, m, vtype, precision):  # pragma: no cover
    """The score kernel against the PyTorch Gram form. The interpreter's bf16 tl.dot is wrong (it multiplies the
    raw bits), so the bf16-piece path (bf16 values, 'split') is checked on the GPU only (`score_checks`)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from flowkv_utils.policies.flowkv import flowkv_scores, gram_blocks
    g = torch.Generator().manual_seed(G * 100 + m)
    n = m + w
    A = torch.softmax(torch.randn(G * r, w, n, generator=g), -1)
    v = torch.randn(G, n, d, generator=g).to(vtype)
    gram = gram_blocks(torch.randn(G * r, d, 3 * d, generator=g), G)
    cfg = kernels.ScoreConfig(precision=precision, tokens=16, cols=16)
    a = flowkv_scores(A, v, gram, m, impl="torch")
    b = flowkv_scores(A, v, gram, m, impl="triton", config=cfg)
    assert rel(b, a) < 1e-5


def test_bf16_split3_holds_float32():
    """Three bf16 pieces hold a float32 tensor to ≈ 2⁻²⁴ (the score kernel's operand), each piece exactly bf16."""
    from flowkv_utils.kernels.flowkv_score import bf16_split3
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * torch.logspace(-20, 20, 4096)
    p = bf16_split3(x)
    assert p.dtype == torch.bfloat16 and p.shape == (3, 4096)
    assert ((p.double().sum(0) - x.double()).abs() <= x.double().abs() * 2.0 ** -23).all()


def test_gram_operand_layout_and_cache():
    """The score kernel's operand: block p = (a, b), a ≤ b, piece s at rows s·d_pad.., columns p·d_pad..; built
    once per Gram tensor, rebuilt after an in-place change."""
    from flowkv_utils.kernels.flowkv_score import gram_operand
    from flowkv_utils.policies.flowkv import gram_blocks
    gram = gram_blocks(torch.randn(2 * 3, 24, 40, generator=torch.Generator().manual_seed(1)), 2)  # G 2, r 3, d 24
    op = gram_operand(gram, "tf32x2")
    assert op.shape == (2, 2 * 32, 6 * 32) and gram_operand(gram, "tf32x2") is op
    ia, ib = torch.triu_indices(3, 3)
    for p, (a, b) in enumerate(zip(ia.tolist(), ib.tolist(), strict=True)):
        blk = op[:, :32, p * 32: p * 32 + 24][:, :24] + op[:, 32:, p * 32: p * 32 + 24][:, :24]
        assert torch.equal(blk, gram[:, a, b])
    assert op[:, 24:32].abs().sum() == 0 and op[:, :, 24:32].abs().sum() == 0  # zero padding
    gram.mul_(2)
    assert gram_operand(gram, "tf32x2") is not op


def test_score_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="precision='bf16'.*split, tf32x3"):
        kernels.ScoreConfig(precision="bf16")
    with pytest.raises(ValueError, match="tokens=48.*power of two"):
        kernels.ScoreConfig(tokens=48)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flowkv_score_kernel_on_gpu():  # pragma: no cover - CPU CI
    from flowkv_utils import bench
    rec = bench.recorder(None, "pytest", echo=False)
    assert bench.score_checks(rec, "cuda")
    assert max(r["rel_err"] for r in rec.rows["check"]) < 1e-5


def test_ragged_attend_plugs_into_generate_decode(tiny):
    m, pf, res = tiny
    c_ref, c_fast = RaggedCache.from_prefill(pf, res, 8), RaggedCache.from_prefill(pf, res, 8)
    attend = fastdecode.SplitKVAttend()
    for t in (5, 17, 42):
        a = generate.decode(m, c_ref, torch.tensor([[t]]))[-1]
        b = generate.decode(m, c_fast, torch.tensor([[t]]), attend=attend)[-1]
        assert rel(b, a) < 1e-5
    # T > 1 (teacher forcing) falls back to the reference
    a = generate.decode(m, c_ref, torch.tensor([[1, 2, 3]]))
    b = generate.decode(m, c_fast, torch.tensor([[1, 2, 3]]), attend=attend)
    assert rel(b, a) < 1e-5


@pytest.mark.parametrize("fuse", [False, True])
def test_fast_decoder_matches_generate_decode(tiny, fuse):
    m, pf, res = tiny
    ref = RaggedCache.from_prefill(pf, res, 8)
    dec = fastdecode.FastDecoder(m, fastdecode.StaticRaggedCache.from_ragged([RaggedCache.from_prefill(pf, res, 8)], 8),
                              impl="torch", fuse=fuse, compile=False)
    for t in (5, 17, 42, 99):
        a = generate.decode(m, ref, torch.tensor([[t]]))[-1]
        assert rel(dec.step(torch.tensor([t]))[0], a) < 1e-5
    assert dec.label == "torch" + ("+fused" if fuse else "")


def test_fast_decoder_batch_of_different_caches(tiny):
    m, pf, res = tiny
    pf2 = capture.prefill(m, torch.randint(0, 100, (1, 70), generator=torch.Generator().manual_seed(3)), window=8)
    res2 = policies.get_policy("snapkv", window=8)(pf2, 20)
    refs = [RaggedCache.from_prefill(pf, res, 8), RaggedCache.from_prefill(pf2, res2, 8)]
    sc = fastdecode.StaticRaggedCache.from_ragged([RaggedCache.from_prefill(pf, res, 8), RaggedCache.from_prefill(pf2, res2, 8)], 8)
    dec = fastdecode.FastDecoder(m, sc, impl="torch", fuse=False)
    for t in (4, 8, 15):
        out = dec.step(torch.tensor([t, t + 1]))
        for b, c in enumerate(refs):
            assert rel(out[b], generate.decode(m, c, torch.tensor([[t + b]]))[-1]) < 1e-5
    sc.rewind()
    assert int(sc.used) == 0 and sc.pos.view(-1).tolist() == [pf.n, pf2.n]
    with pytest.raises(RuntimeError, match="capacity"):
        for _ in range(20):
            dec.step()


def test_static_cache_bytes_are_the_kept_bytes():
    lengths = torch.tensor([[[3, 0, 10]], [[7, 7, 1]]])  # (L=2, B=1, G=3)
    sc = fastdecode.StaticRaggedCache.from_lengths(lengths, head_dim=8, capacity=4, next_pos=50, dtype=torch.bfloat16)
    assert sc.kept_bytes() == int(lengths.sum()) * 8 * 2 * 2
    assert sc.kept_bytes() <= sc.allocated_bytes() <= 1.05 * sc.kept_bytes() + 8 * 4 * 2
    assert all(torch.isfinite(x.k.float()).all() and x.k.abs().sum() > 0 for x in sc.layers)  # random, never zeros


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_split_kv_on_gpu():  # pragma: no cover - CPU CI
    lay = ragged_layer([20000, 0, 1, 4097], d=128, dtype=torch.bfloat16)
    lay = RaggedLayer(*(x.cuda() if torch.is_tensor(x) and x.dim() > 1 else x for x in
                        (lay.k, lay.v, lay.offsets, lay.tail_k, lay.tail_v)))
    cache = RaggedCache([lay], next_pos=0)
    q = torch.randn(16, 1, 128, device="cuda", dtype=torch.bfloat16)
    assert rel(fastdecode.SplitKVAttend(impl="triton")(cache, 0, q, 1, 128 ** -0.5),
               cache.attend(0, q.double(), 1, 128 ** -0.5)) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lengths", [[20000, 0, 1, 4097], [160] * 8, [1, 2, 3, 5000, 0, 0, 7, 64]])
def test_fused_combine_gives_the_two_kernel_result_bit_for_bit_on_gpu(lengths):  # pragma: no cover - CPU CI
    """SplitKVConfig.fused_combine: the last item of a segment merges it (an atomic count per segment) in the same
    arithmetic order as the combine kernel, so the output is the same bits; replayed 50 times in a CUDA graph (a
    stale read of another item's partials would change them), and every count is back at zero after each call."""
    lay = ragged_layer(lengths, d=128, dtype=torch.bfloat16, seed=3)
    k, v, tk, tv = (x.cuda() for x in (lay.k, lay.v, lay.tail_k, lay.tail_v))
    items = kernels.work_items(lay.offsets, 64, "cuda")  # many items per long segment: the merge loops
    tables = kernels.triton_tables(items, k, v, tk, tv)
    G, r = len(lengths), 4
    q = torch.randn(G, r, 128, device="cuda", dtype=torch.bfloat16)
    nt = torch.tensor([3], device="cuda")
    two, one = (kernels.make_workspace(items, G, r, 128, q.dtype, "cuda") for _ in range(2))
    whole = kernels.DEFAULT_CONFIG.replace(combine_cols=128)  # the fused merge does every column in one program
    fused = whole.replace(fused_combine=True)
    ref = kernels.split_kv_triton(q, tables, nt, 128 ** -0.5, two, whole.replace(fused_combine=False))
    kernels.split_kv_triton(q, tables, nt, 128 ** -0.5, one, fused)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.split_kv_triton(q, tables, nt, 128 ** -0.5, one, fused)
    for _ in range(50):
        one.out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(one.out, ref) and int(one.done.abs().sum()) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("changes", [{"pdl": True}, {"pdl": False, "combine_cols": 32},
                                     {"pdl": True, "combine_cols": 32}])
def test_programmatic_dependent_launch_gives_the_same_bits_on_gpu(changes):  # pragma: no cover - CPU CI
    """SplitKVConfig.pdl (Hopper): each kernel starts while the one before it still runs and waits inside for its
    writes. In a CUDA graph of 6 calls that share one workspace, each after a copy that writes its q, every output
    is the plain launch's, bit for bit (a read of q, or of the workspace, before the previous kernel finished would
    change them). combine_cols spreads a segment's merge over programs of fewer columns: the same sums, reduced
    over a differently shaped tile, so equal to within one bf16 rounding of the output."""
    if changes.get("pdl") and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    lay = ragged_layer([20000, 0, 1, 4097, 160, 3000, 7, 900], d=128, dtype=torch.bfloat16, seed=4)
    k, v, tk, tv = (x.cuda() for x in (lay.k, lay.v, lay.tail_k, lay.tail_v))
    items = kernels.work_items(lay.offsets, 256, "cuda")
    tables = kernels.triton_tables(items, k, v, tk, tv)
    G, r = 8, 4
    qs = torch.randn(6, G, r, 128, device="cuda", dtype=torch.bfloat16)
    q = torch.empty_like(qs[0])
    nt = torch.tensor([5], device="cuda")
    ws = kernels.make_workspace(items, G, r, 128, q.dtype, "cuda")
    plain = kernels.DEFAULT_CONFIG.replace(pdl=False, combine_cols=128, combine_items=128)
    pdl = plain.replace(**changes)
    want = []
    for x in qs:
        q.copy_(x)
        want.append(kernels.split_kv_triton(q, tables, nt, 128 ** -0.5, ws, plain).clone())
    kernels.split_kv_triton(q, tables, nt, 128 ** -0.5, ws, pdl)  # compile outside the graph
    torch.cuda.synchronize()
    outs = torch.empty(6, G, r, 128, device="cuda", dtype=torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(6):
            q.copy_(qs[i])
            outs[i].copy_(kernels.split_kv_triton(q, tables, nt, 128 ** -0.5, ws, pdl))
    for _ in range(20):
        outs.zero_()
        graph.replay()
        torch.cuda.synchronize()
        for i in range(6):
            if set(changes) == {"pdl"}:
                assert torch.equal(outs[i], want[i])
            else:
                assert ((outs[i].float() - want[i].float()).abs() <= 2 ** -7 * want[i].float().abs() + 1e-6).all()
