"""Compression during prefill (`layerwise.py`) selects exactly what the one-shot policies select, packs the same
K/V, and holds a layer's dense K/V no longer than the next layer's hook."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode

from flowkv_utils import capture, models, policies
from flowkv_utils.cache import RaggedCache
from flowkv_utils.layerwise import LayerwiseCompressor, streaming_policies
from flowkv_utils.selection import with_window

W = 8


@pytest.fixture(scope="module")
def setup():
    m = models.random_model("llama", layers=4, heads=8, kv_heads=2, head_dim=16, hidden=64, vocab=100)
    ids = torch.randint(0, 100, (1, 120), generator=torch.Generator().manual_seed(0))
    return m, ids, capture.prefill(m, ids, window=W, all_queries=True)


@pytest.mark.parametrize("name", streaming_policies())
@pytest.mark.parametrize("chunk", [None, 32])
def test_layerwise_equals_one_shot(setup, name, chunk):
    m, ids, pf = setup
    pol = policies.get_policy(name) if name == "fullkv" else policies.get_policy(name, window=W)
    res = pol(pf, 30)
    comp = LayerwiseCompressor(m, ids, name, 30, window=W, also=("snapkv", "flowkv", "flowkv_global"),
                               keep_scores=True)
    out = capture.prefill(m, ids, window=W, chunk=chunk, on_layer=comp, **comp.prefill_options)
    comp.finish_counts()
    assert torch.equal(comp.keep_mask(), res.keep)
    assert all(c.k.numel() == 0 and c.v.numel() == 0 and c.queries is None for c in out.layers)  # no dense K/V kept
    ref = RaggedCache.from_prefill(pf, res, 8)
    got = comp.cache(8)
    for a, b in zip(got.layers, ref.layers, strict=True):
        assert torch.equal(a.offsets, b.offsets) and torch.allclose(a.k, b.k) and torch.allclose(a.v, b.v)
    assert set(comp.seconds) == {name, "snapkv", "flowkv", "flowkv_global"}
    for other in ("snapkv", "flowkv", "flowkv_global"):
        for budget in (30, 50):
            want = policies.get_policy(other, window=W)(pf, budget).keep.sum(-1)
            assert torch.equal(comp.kept_counts(other, budget), want)
        assert torch.equal(comp.counts[other], policies.get_policy(other, window=W)(pf, 30).keep.sum(-1))


@pytest.mark.parametrize("slack", [0.0, 0.3, 0.9])
def test_global_slack_bounds_held_entries_and_ends_exact(setup, slack):
    """Re-packing lazily (slack > 0) holds at most 1/(1 − slack) of the selection after every layer, and the
    final cache is the one-shot selection whatever the slack."""
    m, ids, pf = setup
    res = policies.get_policy("flowkv_global", window=W)(pf, 30)
    comp = LayerwiseCompressor(m, ids, "flowkv_global", 30, window=W, slack=slack)
    k = comp.cascades["flowkv_global"].k
    held = []

    def hook(li, cap):
        out = comp(li, cap)
        held.append(sum(comp.packed_prefix.values()))
        return out

    capture.prefill(m, ids, window=W, on_layer=hook)
    assert torch.equal(comp.keep_mask(), res.keep)
    assert torch.equal(comp.counts["flowkv_global"], res.keep.sum(-1))  # the counts the re-packs were sized by
    assert held[-1] == k and all(h <= k / (1 - slack) + 1e-9 for h in held)
    with pytest.raises(ValueError, match="slack"):
        LayerwiseCompressor(m, ids, "flowkv_global", 30, window=W, slack=1.0)


def held_mask(lay, k: torch.Tensor) -> torch.Tensor:
    """(G, n) bool: which of the dense keys k (G, n, d) a packed layer holds, found by matching its rows (random
    keys: every row matches one entry); each head's rows must be its entries in token order."""
    G, n, _ = k.shape
    out = torch.zeros(G, n, dtype=torch.bool)
    for g in range(G):
        a, b = int(lay.offsets[g]), int(lay.offsets[g + 1])
        match = (lay.k[a:b, None] == k[g][None]).all(-1)  # (rows, n)
        assert (match.sum(-1) == 1).all()
        j = match.float().argmax(-1)
        assert (j[1:] > j[:-1]).all()
        out[g, j] = True
    return out


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("slack", [0.0, 0.3])
@pytest.mark.parametrize("chunk", [None, 32])
def test_global_layers_hold_the_cascades_entries_bit_for_bit(setup, slack, chunk, overlap):
    """After every layer, each packed layer of FlowKV global holds the prefill's K and V rows, bit for bit, of what
    it held before less what the cascade dropped when it was re-packed (the layers due re-pack as one batch): at
    slack 0 exactly what the cascade selected after the merge its packing followed (with overlap the previous
    layer's, without the layer's own), otherwise a superset of it of at most 1/(1 − slack) of it; after the last
    layer the cache is the one-shot selection's, bit for bit (same chunking, same K/V), and nothing is held back."""
    m, ids, _ = setup
    pf = capture.prefill(m, ids, window=W, chunk=chunk)
    res = policies.get_policy("flowkv_global", window=W)(pf, 30)
    comp = LayerwiseCompressor(m, ids, "flowkv_global", 30, window=W, slack=slack, overlap=overlap)
    casc = comp.cascades["flowkv_global"]
    before = {}
    last = len(pf.layers) - 1

    def hook(li, cap):
        selected = casc.keep_masks()  # after the previous layer's merge
        out = comp(li, cap)
        if not overlap or li == last:
            selected = casc.keep_masks()
        assert all(comp.layers[lj] is None for lj in range(li + 1) if lj not in selected)  # packed: merged first
        for lj in selected:
            k, v = pf.layers[lj].k, pf.layers[lj].v
            lay, now = comp.layers[lj], with_window(selected[lj], W)
            held = held_mask(lay, k)
            assert torch.equal(lay.k, k[held]) and torch.equal(lay.v, v[held])
            assert torch.equal(lay.lengths, held.sum(-1))
            assert not (now & ~held).any() and not (held & ~before.get(lj, held)).any()
            assert torch.equal(held, now) if slack == 0.0 else (held & ~now).sum() <= slack * (held[:, :-W]).sum()
            before[lj] = held
        assert (comp.layers[li] is None) == (overlap and li < last)  # held back until the next layer's hook
        return out

    capture.prefill(m, ids, window=W, chunk=chunk, on_layer=hook)
    assert torch.equal(comp.keep_mask(), res.keep) and comp.repacks > 0 and comp._held is None
    ref = RaggedCache.from_prefill(pf, res, 8)
    for a, b in zip(comp.cache(8).layers, ref.layers, strict=True):
        assert torch.equal(a.offsets, b.offsets) and torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    assert not comp.rows  # the rows' cascade ids are dropped after the last layer: nothing re-packs again


def test_repacks_fall_as_the_slack_grows(setup):
    """`repacks` counts the re-packs of packed layers: with slack 0 every layer that lost entries is re-packed at
    once, so a larger slack never re-packs more (and the final cache is the same, as tested above)."""
    m, ids, _ = setup
    counts = []
    for slack in (0.0, 0.3, 0.9):
        comp = LayerwiseCompressor(m, ids, "flowkv_global", 30, window=W, slack=slack)
        capture.prefill(m, ids, window=W, on_layer=comp)
        counts.append(comp.repacks)
    assert counts[0] > 0 and counts == sorted(counts, reverse=True)


def test_unknown_policy_is_rejected(setup):
    m, ids, _ = setup
    with pytest.raises(ValueError, match="cake.*allowed are"):
        LayerwiseCompressor(m, ids, "cake", 30, window=W)
    with pytest.raises(ValueError, match="smaller than the window"):
        LayerwiseCompressor(m, ids, "flowkv_global", 6, window=W)  # a budget that cannot hold the window
    comp = LayerwiseCompressor(m, ids, "snapkv", 30, window=W)
    with pytest.raises(ValueError, match="kept_counts"):
        comp.kept_counts("flowkv", 30)


def test_h2o_needs_every_query_from_the_prefill(setup):
    """H2O accumulates the attention of every prompt query: the compressor says which prefill option it needs,
    and a prefill without it fails naming the option."""
    m, ids, _ = setup
    comp = LayerwiseCompressor(m, ids, "h2o", 30, window=W)
    assert comp.prefill_options == {"all_queries": True}
    assert LayerwiseCompressor(m, ids, "snapkv", 30, window=W, also=("tova", "keydiff")).prefill_options == {}
    with pytest.raises(ValueError, match=r"h2o: .*all_queries=True"):
        capture.prefill(m, ids, window=W, on_layer=comp)


def test_counts_of_the_policies_not_applied_are_read_once_and_equal_one_shot(setup):
    """The policies timed but not applied keep their per-layer counts on the device until `counts` is read; then
    they are the one-shot counts (no finish_counts needed for layer-scope policies)."""
    m, ids, pf = setup
    comp = LayerwiseCompressor(m, ids, "flowkv_global", 30, window=W, also=("snapkv", "flowkv"))
    capture.prefill(m, ids, window=W, on_layer=comp)
    assert all(len(comp._unread[name]) == len(pf.layers) for name in ("snapkv", "flowkv"))
    for name in ("flowkv_global", "snapkv", "flowkv"):
        assert torch.equal(comp.counts[name], policies.get_policy(name, window=W)(pf, 30).keep.sum(-1)), name
    assert not any(comp._unread.values())


class DeviceReads(TorchFunctionMode):
    """Counts host reads of tensors that would live on the GPU, in a CPU run: a tensor is "on the device" when it
    is a model weight or capture tensor, is made with an explicit device=, or is computed from one; reading one
    (int/float/bool, item, tolist, cpu, nonzero, boolean-mask indexing) is what makes Python wait for a GPU."""

    READS = {"__int__", "__float__", "__bool__", "__index__", "item", "tolist", "cpu", "nonzero", "masked_select",
             "unique", "repeat_interleave"}

    def __init__(self, tensors):
        super().__init__()
        self.reads = 0
        self._dev: dict[int, weakref.ref] = {}
        for t in tensors:
            self.mark(t)

    def mark(self, t) -> None:
        if isinstance(t, torch.Tensor):
            self._dev[id(t)] = weakref.ref(t)

    def on_device(self, t) -> bool:
        ref = self._dev.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        flat = [*args, *kwargs.values()]
        ins = [t for a in flat for t in (a if isinstance(a, (list, tuple)) else [a])]
        dev = any(self.on_device(t) for t in ins)
        to_host = name == "cpu" or (name == "to" and "cpu" in flat[1:])
        index = args[1] if name in ("__getitem__", "__setitem__") else None
        by_mask = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                      for i in (index if isinstance(index, tuple) else (index,)))
        self.reads += dev and (name in self.READS or to_host or by_mask)
        out = func(*args, **kwargs)
        if to_host and out is args[0]:
            out = out.clone()  # a device → host copy is a new tensor
        elif (dev and name not in self.READS) or (name in ("zeros", "ones", "empty", "full", "arange")
                                                  and "device" in kwargs):
            for t in out if isinstance(out, (list, tuple)) else [out]:
                self.mark(t)
        return out


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("name", ["flowkv_global", "flowkv"])
def test_the_hook_reads_the_device_once_per_layer(name, overlap):
    """Each host read stalls Python until the GPU has drained its queue: the applied policy's path reads once per
    layer (its kept counts per head, for FlowKV global with every packed layer's, which size the re-packs), with
    re-packs, and the counts of the policies timed alongside are read once at the end. With overlap, layer ℓ's
    counts are copied to the host in hook ℓ without waiting (on CUDA, to pinned memory behind an event) and used in
    hook ℓ + 1, so only the last hook, which packs its own layer at once, reads the device
    (tests/test_gpu.py: on CUDA no hook synchronises)."""
    m = models.random_model("llama", layers=6, heads=8, kv_heads=2, head_dim=16, hidden=64, vocab=100)
    ids = torch.randint(0, 100, (1, 400), generator=torch.Generator().manual_seed(1))
    comp = LayerwiseCompressor(m, ids, name, 0.05, window=W, also=("snapkv", "flowkv", "flowkv_global"), slack=0.0,
                               overlap=overlap)
    reads = []

    def hook(li, cap):
        with DeviceReads([*m.parameters(), cap.q, cap.k, cap.v, cap.attn_out, cap.resid]) as mode:
            out = comp(li, cap)
        reads.append(mode.reads)
        return out

    capture.prefill(m, ids, window=W, on_layer=hook)
    assert reads == ([0] * 5 + [1] if overlap else [1] * 6) and (comp.repacks > 0 or name != "flowkv_global")
