"""Every registered policy against its direct transcription (tests/reference_policies.py) and the invariants of
method.md §2-3, on tiny random models (2-3 layers, head_dim 8, n ≤ 200) through hypothesis; plus bad input."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import reference_policies as ref
import torch
from default_policies import ALL, DEFAULT_POLICIES, label
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowkv_utils.budgets import proportional_allocation
from flowkv_utils.cache import RaggedCache
from flowkv_utils.capture import prefill
from flowkv_utils.models import random_model
from flowkv_utils.policies import ABLATIONS, BASELINES, REGISTRY, STUDY, get_policy, names
from flowkv_utils.policies.cake import cascade_budgets, indicator, layer_allocation
from flowkv_utils.policies.flowkv import (
    FlowKV,
    FlowKVGlobal,
    ablation_scores,
    divided,
    exact_l1_scores,
    flowkv_scores,
    gram_blocks,
)
from flowkv_utils.selection import (
    GlobalCascade,
    best_in_order,
    kth_largest,
    shown,
    topk_per_row,
    true_positions,
)

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (family, layers, heads, kv_heads, head_dim): GQA r = 2, MHA (G == H, qwen3 q/k norms), r = 3 with biases, MQA
CONFIGS = [("llama", 2, 4, 2, 8), ("qwen3", 3, 4, 4, 8), ("qwen2", 2, 6, 2, 8), ("mistral", 3, 4, 1, 8)]
VOCAB = 128
# absolute score tolerance (× the largest score) where the default 1e-7 is below float32 rounding: a float32 cosine
# is good to ~1e-7 absolute only, so KeyDiff's 1 − cos has no relative accuracy where it nears 0
SCORE_ATOL = {"keydiff": 1e-6}


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def tiny(cfg: tuple) -> torch.nn.Module:
    family, L, H, G, d = cfg
    return random_model(family, layers=L, heads=H, kv_heads=G, head_dim=d, vocab=VOCAB, seed=len(family) + L)


class Case(tuple):
    """(pf, w, budget) with a short repr (model, n, seed) for hypothesis' failure reports."""

    def __repr__(self) -> str:
        pf, w, budget = self
        return f"Case({pf.model.config._name_or_path} {ref.geometry(pf)[:3]}, n={pf.n}, prefill window=" \
               f"{pf.window}, w={w}, budget={budget!r}, ids={pf.input_ids.tolist()})"


@st.composite
def cases(draw, configs=CONFIGS, max_n: int = 200):
    """(pf, w, budget): a prefill of a random prompt, the policy window w and a token or fraction budget.
    The prefill sometimes captures more window rows than w, so policies must slice to their own window."""
    cfg = draw(st.sampled_from(configs))
    w = draw(st.integers(2, 12))
    extra = draw(st.sampled_from([0, 0, 3]))
    n = draw(st.integers(w + extra + 1, max_n))
    seed = draw(st.integers(0, 2**31 - 1))
    ids = torch.randint(VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))
    pf = prefill(tiny(cfg), ids, window=w + extra, all_queries=True)  # every query: H2O's accumulated attention
    if draw(st.booleans()):
        budget = draw(st.integers(w, n + 3))
    else:
        budget = draw(st.floats(min(1.0, (w + 1) / n), 1.0))
    return Case((pf, w, budget))


def run(entry, pf, w, budget):
    name, params = entry
    return get_policy(name, window=w, **params)(pf, budget), ref.REFERENCES[name](pf, budget, window=w, **params)


# ---------------------------------------------------------------------------------------------------- all policies
@pytest.mark.parametrize("entry", ALL, ids=label)
@PROPERTY
@given(case=cases())
def test_policy_matches_reference(entry, case):
    """Exact total, window kept, cache packing, and keep mask/scores equal to the transcription of method.md."""
    pf, w, budget = case
    res, want = run(entry, pf, w, budget)
    L, H, G, d, D, n = ref.geometry(pf)
    total = n * L * G if entry[0] == "fullkv" else ref.model_total(budget, n, L, G)  # FullKV ignores the budget
    assert res.budget.total == total and res.total_kept == total  # exact budget, token or fraction
    assert res.keep.shape == (L, G, n) and res.keep.dtype == torch.bool
    cache = RaggedCache.from_prefill(pf, res, capacity=1)  # packed indices: one entry per kept (ℓ, g, j), in range
    assert cache.kept_entries() == total
    assert all(torch.equal(lay.lengths, res.kept_per_head[li]) for li, lay in enumerate(cache.layers))
    full = total >= n * L * G
    if REGISTRY[entry[0]].uses_window and not full:
        assert res.keep[..., n - w:].all(), "the observation window must be kept in every head"
    if want.scores is not None and not full:
        got = res.scores.double()
        assert torch.equal(got.isnan(), want.scores.isnan()), "scores: NaN (kept-by-rule) pattern differs"
        fin = ~want.scores.isnan()
        if fin.any():
            scale = float(want.scores[fin].abs().max())
            atol = SCORE_ATOL.get(entry[0], 1e-7) * scale
            torch.testing.assert_close(got[fin], want.scores[fin], rtol=1e-4, atol=atol)
    clear = ~want.ambiguous  # rows without a near-tie at a top-k boundary (float32 vs float64)
    assert torch.equal(res.keep[clear], want.keep[clear]), f"{label(entry)}: keep differs from the reference"
    if "layer_budgets" in want.info and not want.ambiguous.any():
        assert list(res.info["layer_budgets"]) == list(want.info["layer_budgets"])
    if entry[0] == "smoothevict" and not full:
        for li, (v_got, v_want) in enumerate(zip(res.values, want.info["values"], strict=True)):
            ok = ~(want.ambiguous[li] | want.info["merge_ambiguous"][li])
            torch.testing.assert_close(v_got[ok].double(), v_want[ok], rtol=1e-4, atol=1e-5)


@FEW
@given(case=cases(max_n=120), other=st.floats(0.05, 1.0))
def test_budgets_share_a_prefill(case, other):
    """Budget-independent pieces are computed once per prompt (`Prefill.memo`): every policy, called at several
    budgets on one prefill — after all the others — keeps exactly what it keeps on a fresh prefill."""
    pf, w, budget = case
    fresh = lambda: prefill(pf.model, pf.input_ids, window=pf.window)
    shared = fresh()
    for b in (other, budget):
        for entry in ALL:
            name, params = entry
            try:
                got = get_policy(name, window=w, **params)(shared, b)
            except ValueError:  # this budget does not fit the window: nothing to compare
                continue
            want = get_policy(name, window=w, **params)(fresh(), b)
            assert torch.equal(got.keep, want.keep), f"{label(entry)} at {b!r}: the shared prefill changed the keep-set"
            if want.values is not None:
                assert all(torch.equal(a, c) for a, c in zip(got.values, want.values, strict=True))


@pytest.mark.parametrize("entry", [e for e in ALL if REGISTRY[e[0]].scope == "layer"
                                   and REGISTRY[e[0]].role != "reference"], ids=label)
@FEW
@given(case=cases(max_n=120))
def test_batched_selection_equals_one_layer_at_a_time(entry, case):
    """`select` runs `keep_layers` on every layer at once; the layer-wise compressor calls `keep_layer` one layer at
    a time (on a fresh prefill, so nothing memoised is shared): both give the same keep-set and shown scores."""
    pf, w, budget = case
    name, params = entry
    pol = get_policy(name, window=w, **params)
    try:
        res = pol(pf, budget)
    except ValueError:  # this budget does not fit the window
        return
    if res.budget.full:
        return
    one = prefill(pf.model, pf.input_ids, window=pf.window, all_queries=True)
    slots = pol.allocate(one, res.budget)[0]
    m = pf.n - pol.kept_window
    for li in range(pf.shape.layers):
        mask, s = pol.keep_layer(one, li, pol.scores(one, li), slots[li])
        assert torch.equal(res.keep[li, :, :m], mask), f"{label(entry)}: layer {li} keep differs"
        torch.testing.assert_close(res.scores[li, :, :m], shown(s), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(REGISTRY))
@FEW
@given(case=cases(max_n=80), over=st.integers(0, 5))
def test_budget_at_least_n_keeps_everything(name, case, over):
    pf, w, _ = case
    for budget in (pf.n + over, 1.0):
        res = get_policy(name, window=w)(pf, budget)
        assert res.keep.all() and res.budget.full


# ---------------------------------------------------------------------------------------------------- FlowKV
@PROPERTY
@given(case=cases(), layer=st.integers(0, 2))
def test_flowkv_gram_form_equals_frobenius_norm(case, layer):
    """s_g[j] via the d×d Gram blocks == ‖Σ_{h∈g} A_h[:, j] P_h[j]ᵀ‖_F built explicitly; == DKM when G == H."""
    pf, w, _ = case
    layer = layer % len(pf.layers)
    m = pf.n - w
    got = flowkv_scores(pf.attn(layer)[:, -w:], pf.layers[layer].v, gram_blocks(pf.w_o(layer), pf.shape.kv_heads), m)
    want = ref.flowkv_direct(pf, layer, w)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    if pf.shape.kv_heads == pf.shape.heads:
        torch.testing.assert_close(want, ref.dkm_products(pf, layer, w), rtol=1e-10, atol=1e-12)


FORMS = [("no_cross", 2), ("per_head", 2), ("exact", 1), ("per_head", 1)]  # every ablation of the exact/L2 score


def form_scores(pf, layer: int, w: int) -> dict[tuple[str, int], torch.Tensor]:
    """{(form, p): (G, n − w) scores} of one layer, every form (through the policy, so through its memo)."""
    return {fp: FlowKV(window=w, form=fp[0], p=fp[1]).scores(pf, layer) for fp in [("exact", 2), *FORMS]}


@PROPERTY
@given(case=cases(), layer=st.integers(0, 2), form=st.sampled_from(FORMS))
def test_flowkv_ablation_forms_equal_their_direct_transcription(case, layer, form):
    """no_cross, per_head and the L1 forms == the norms of the explicit per-token contribution matrices."""
    pf, w, _ = case
    layer = layer % len(pf.layers)
    m = pf.n - w
    A, v, G = pf.attn(layer)[:, -w:], pf.layers[layer].v, pf.shape.kv_heads
    got = ablation_scores(A, v, *form, m, gram=gram_blocks(pf.w_o(layer), G), w_o=pf.w_o(layer))
    want = ref.flowkv_ablation_direct(pf, layer, w, *form)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


@FEW
@given(case=cases(max_n=120), layer=st.integers(0, 2))
def test_flowkv_exact_l2_is_unchanged(case, layer):
    """form="exact", p=2 (the default) is the Gram-block score itself, bit for bit; the direct transcription of
    the ablations at exact/L2 is the original one."""
    pf, w, _ = case
    layer = layer % len(pf.layers)
    m = pf.n - w
    want = flowkv_scores(pf.attn(layer)[:, -w:], pf.layers[layer].v, gram_blocks(pf.w_o(layer), pf.shape.kv_heads), m)
    for pol in (FlowKV(window=w), FlowKV(window=w, form="exact", p=2), FlowKVGlobal(window=w)):
        assert torch.equal(pol.layer_scores(pf, layer), want)
    torch.testing.assert_close(ref.flowkv_ablation_direct(pf, layer, w, "exact", 2), ref.flowkv_direct(pf, layer, w),
                               rtol=1e-10, atol=1e-14)


@PROPERTY
@given(case=cases(), layer=st.integers(0, 2))
def test_flowkv_ablation_identities(case, layer):
    """per_head ≥ exact (triangle inequality, for L2 and L1) and per_head ≥ no_cross (‖x‖₂ ≤ ‖x‖₁ over heads);
    the entrywise L1 norm ≥ the Frobenius norm; with one query head per KV head (G = H) the forms coincide.
    (no_cross vs exact has no order: the cross terms reinforce or cancel.)"""
    pf, w, _ = case
    layer = layer % len(pf.layers)
    s = form_scores(pf, layer, w)
    tol = 1e-5 * float(s[("per_head", 1)].max()) + 1e-30

    def at_least(big, small):
        assert (s[big] >= s[small] * (1 - 1e-5) - tol).all(), f"{big} < {small}"

    at_least(("per_head", 2), ("exact", 2))
    at_least(("per_head", 2), ("no_cross", 2))
    at_least(("per_head", 1), ("exact", 1))
    at_least(("exact", 1), ("exact", 2))
    at_least(("per_head", 1), ("per_head", 2))
    if pf.shape.kv_heads == pf.shape.heads:
        for p, forms in ((2, ("exact", "no_cross", "per_head")), (1, ("exact", "per_head"))):
            for f in forms[1:]:
                torch.testing.assert_close(s[(f, p)], s[(forms[0], p)], rtol=1e-4, atol=tol)


def test_flowkv_forms_are_memoised_apart(pf40):
    """The memo key holds form and p: each form, asked on one shared prefill, keeps its own scores."""
    s = form_scores(pf40, 1, 8)
    fresh = prefill(pf40.model, pf40.input_ids, window=pf40.window)
    for (f, p), got in s.items():
        assert torch.equal(got, FlowKV(window=8, form=f, p=p).layer_scores(fresh, 1))
    assert not torch.equal(s[("exact", 2)], s[("per_head", 2)]) and not torch.equal(s[("exact", 2)], s[("exact", 1)])


def test_exact_l1_chunks_do_not_change_the_scores(pf40):
    """The chunked L1 form gives the same scores with one token per chunk as with all tokens in one chunk."""
    A, v, w_o = pf40.attn(0), pf40.layers[0].v, pf40.w_o(0)
    one = exact_l1_scores(A, v, w_o, 30, max_floats=1)
    torch.testing.assert_close(one, exact_l1_scores(A, v, w_o, 30), rtol=1e-6, atol=0)


def test_ablations_are_registered_variants():
    """Each ablation is FlowKV or FlowKV global with exactly one default changed, role "ablation", outside the
    study, the baselines and the derived policies, listed after flowkv_global and before smoothevict."""
    assert ABLATIONS == names(role="ablation") == [
        "flowkv_pool7", "flowkv_no_cross", "flowkv_per_head", "flowkv_l1", "flowkv_sinks4", "flowkv_global_n0",
        "flowkv_global_n1", "flowkv_global_n3", "flowkv_global_floor4"]
    order = list(REGISTRY)
    assert order[order.index("flowkv_global") + 1: order.index("smoothevict")] == ABLATIONS
    assert not set(ABLATIONS) & (set(STUDY) | set(BASELINES) | set(names(role="derived")))
    for name in ABLATIONS:
        cls = REGISTRY[name]
        parent = FlowKVGlobal if issubclass(cls, FlowKVGlobal) else FlowKV
        assert issubclass(cls, parent) and cls.name == name and cls.__doc__.count("\n") == 0
        assert [f.name for f in dataclasses.fields(cls)] == [f.name for f in dataclasses.fields(parent)]
        changed = [f.name for f, g in zip(dataclasses.fields(cls), dataclasses.fields(parent), strict=True)
                   if f.default != g.default]
        assert len(changed) == 1, f"{name} changes {changed}"
        assert {k: getattr(cls, k) for k in ("head_adaptive", "layer_adaptive", "output_aware", "scope", "streams")} \
            == {k: getattr(parent, k) for k in ("head_adaptive", "layer_adaptive", "output_aware", "scope", "streams")}


@PROPERTY
@given(case=cases(), norm=st.sampled_from(["N0", "N1", "N2", "N3"]), floor=st.integers(0, 3))
def test_flowkv_global_conserves_the_model_total(case, norm, floor):
    pf, w, budget = case
    res = get_policy("flowkv_global", window=w, norm=norm, head_floor=floor)(pf, budget)
    assert res.total_kept == res.budget.total
    if not res.budget.full:
        per_layer = res.keep.sum((1, 2))
        assert res.info["layer_budgets"] == per_layer.tolist() and sum(res.info["layer_budgets"]) == res.budget.total
        assert (res.kept_per_head >= w + min(floor, (res.budget.total - w * res.keep[..., 0].numel())
                                              // res.keep[..., 0].numel())).all()


@PROPERTY
@given(case=cases(), norm=st.sampled_from(["N0", "N2", "N3"]))
def test_global_cascade_equals_one_shot(case, norm):
    """Layer-by-layer cascading top-k ends at the one-shot global selection; nothing evicted comes back and
    the running selection never exceeds k."""
    pf, w, budget = case
    pol = FlowKVGlobal(window=w, norm=norm)
    res = pol(pf, budget)
    if res.budget.full:
        return
    k = pol.selectable(res.budget)
    c, before = GlobalCascade(k), {}
    for li in range(len(pf.layers)):
        c.add(li, pol.normalised_scores(pf, li))
        now = c.keep_masks()
        for layer, mask in before.items():
            assert not (now[layer] & ~mask).any(), "an evicted entry came back"
        assert c.vals.numel() <= k and sum(int(x) for x in c.kept_counts().values()) == min(k, c.alive.numel())
        before = now
    final = c.keep_masks()
    for li in range(len(pf.layers)):
        assert torch.equal(final[li], res.keep[li, :, : pf.n - w])


@PROPERTY
@given(L=st.integers(1, 5), G=st.integers(1, 3), m=st.integers(1, 12), data=st.data())
def test_global_cascade_ties_follow_flat_order(L, G, m, data):
    """With many exact ties (small integer scores) the cascade breaks them like the one-shot flat top-k."""
    scores = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=L * G * m, max_size=L * G * m)),
                          dtype=torch.float32).view(L, G, m)
    k = data.draw(st.integers(0, L * G * m))
    c = GlobalCascade(k)
    for li in range(L):
        c.add(li, scores[li])
    order = sorted(range(L * G * m), key=lambda i: (-float(scores.flatten()[i]), i))[:k]
    want = torch.zeros(L * G * m, dtype=torch.bool)
    want[order] = True
    got = torch.stack([c.keep_masks().get(li, torch.zeros(G, m, dtype=torch.bool)) for li in range(L)])
    assert torch.equal(got.flatten(), want)
    assert {li: int(v) for li, v in c.kept_counts().items()} == {li: int(got[li].sum()) for li in range(L)}


@PROPERTY
@given(vals=st.lists(st.sampled_from([0.0, -0.0, 1.0, 2.5, -3.0, float("inf"), float("-inf")]), min_size=1,
                     max_size=60), data=st.data())
def test_best_in_order_is_the_stable_top_k(vals, data):
    """The cascade's sort-free selection keeps the same entries as the one top-k (ties, ±0 and ±inf included),
    in increasing position."""
    v = torch.tensor(vals, dtype=torch.float32)
    k = data.draw(st.integers(0, len(vals) + 2))
    got = best_in_order(v, k)
    want = topk_per_row(v.view(1, -1), min(k, len(vals)))[0].nonzero().view(-1)
    assert torch.equal(got, want)


@PROPERTY
@given(bits=st.lists(st.booleans(), max_size=80))
def test_true_positions_is_nonzero(bits):
    """The positions of a mask's True entries from their known count (no host read) are `nonzero`'s."""
    mask = torch.tensor(bits, dtype=torch.bool)
    assert torch.equal(true_positions(mask, int(mask.sum())), mask.nonzero().view(-1))


def test_cascade_counts_per_head_sum_to_its_masks():
    """`kept_per_head` counts each layer's kept mask per head (one reduction for layers of one shape, one per
    layer otherwise), `kept_counts` is their sum, and `kept_table` is the per-head counts of layers of one shape
    stacked in add order (layers of different shapes: an error naming them)."""
    g = torch.Generator().manual_seed(0)
    for shapes in ([(2, 7)] * 4, [(2, 7), (3, 5), (2, 7)]):
        c = GlobalCascade(9)
        for li, (G, m) in enumerate(shapes):
            c.add(li, torch.randn(G, m, generator=g))
        heads, totals, masks = c.kept_per_head(), c.kept_counts(), c.keep_masks()
        assert list(heads) == list(masks) == list(range(len(shapes)))
        for li, mask in masks.items():
            assert torch.equal(heads[li], mask.sum(-1)) and int(totals[li]) == int(mask.sum())
        if len(set(shapes)) == 1:
            assert torch.equal(c.kept_table(), torch.stack([mask.sum(-1) for mask in masks.values()]))
        else:
            with pytest.raises(ValueError, match=r"kept_table: the layers have shapes \[\(2, 7\), \(3, 5\)\]"):
                c.kept_table()


def test_cascade_kept_at_reads_its_masks_by_flat_id():
    """`kept_at(ids)`: entry offset[ℓ] + g·m + j is kept exactly when keep_mask(ℓ)[g, j] is, after every add
    (entries only leave), and a negative id reads True; the held entries are exactly the alive ones."""
    g = torch.Generator().manual_seed(1)
    c = GlobalCascade(11)
    for li in range(5):
        c.add(li, torch.randint(0, 4, (2, 6), generator=g).float())  # many ties
        flat = torch.cat([mask.reshape(-1) for mask in c.keep_masks().values()])
        ids = torch.randperm(flat.numel(), generator=g)
        assert torch.equal(c.kept_at(ids), flat[ids]) and torch.equal(c.ids, flat.nonzero().view(-1))
        assert torch.equal(c.kept_at(torch.tensor([-1, 0, -(1 << 62)])), torch.tensor([True, bool(flat[0]), True]))
        assert c.kept_at(torch.empty(0, dtype=torch.long)).shape == (0,)


def test_divided_is_the_division_by_the_host_value():
    """FlowKV global's layer normalisation stays on the device (`divided` by a 0-d tensor) and gives the scores of
    the division by the factor read back as a Python float, bit for bit (CUDA's form: tests/test_gpu.py)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.rand(4096, generator=g).mul(30).exp()
    x[:3] = torch.tensor([float("inf"), 0.0, -0.0])
    for e in range(-12, 13, 3):
        d = torch.rand((), generator=g) * 10.0 ** e
        assert torch.equal(divided(x, d.clamp_min(1e-30)), x / max(float(d), 1e-30))


@PROPERTY
@given(vals=st.lists(st.sampled_from([0.0, 1.0, 2.5, -3.0, float("inf"), float("-inf")]), min_size=1, max_size=60),
       data=st.data())
def test_kth_largest_is_the_sorted_value(vals, data):
    """The merge's threshold: the k-th largest value, ties and ±inf included (the CPU's `kthvalue` branch here; the
    CUDA branch, a sort, is checked against the CPU in tests/test_gpu.py)."""
    v = torch.tensor(vals, dtype=torch.float32)
    k = data.draw(st.integers(1, len(vals)))
    assert float(kth_largest(v, k)) == sorted(vals, reverse=True)[k - 1]


# ---------------------------------------------------------------------------------------------------- CAKE
@PROPERTY
@given(prefs=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=8), G=st.integers(1, 4), m=st.integers(1, 40),
       data=st.data())
def test_cake_cascade_budgets_never_grow(prefs, G, m, data):
    p = torch.tensor(prefs, dtype=torch.float64)
    S = data.draw(st.integers(0, len(prefs) * G * m))
    steps = cascade_budgets(p, S, G, m)
    for before, after in zip(steps[:-1], steps[1:], strict=False):
        assert (after[: before.shape[0]] <= before).all(), "a layer's budget grew in the cascade"
    assert torch.equal(steps[-1], layer_allocation(p, S, G, m))
    assert int(steps[-1].sum()) == S and (steps[-1] <= m).all()


def test_cake_cascade_regression_rounding():
    """Largest-remainder rounding at every step once gave a layer a token back (1 → 2) in the cascade."""
    found = 0
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        L, G, m = 5, 2, 30
        p = torch.rand(L, generator=gen, dtype=torch.float64) ** 3
        S = int(torch.randint(0, L * G * m + 1, (1,), generator=gen))
        old = [layer_allocation(p[: i + 1], S, G, m) for i in range(L)]  # the old cascade
        found += any((b[: a.shape[0]] > a).any() for a, b in zip(old[:-1], old[1:], strict=False))
        new = cascade_budgets(p, S, G, m)
        assert all((b[: a.shape[0]] <= a).all() for a, b in zip(new[:-1], new[1:], strict=False))
    assert found > 0  # the rounding hazard is real, so the test above is not vacuous


@FEW
@given(case=cases())
def test_cake_cascaded_keep_equals_one_shot(case):
    """Evict every finished layer to its current budget (top of its indicator), step after step: the final
    keep-set is the one-shot CAKE keep-set."""
    pf, w, budget = case
    pol = get_policy("cake", window=w)
    res = pol(pf, budget)
    if res.budget.full:
        return
    G, m = pf.shape.kv_heads, pf.n - w
    prefs = torch.tensor(res.info["preferences"], dtype=torch.float64)
    inds = [indicator(pol.attn(pf, li)[..., :m], G, pol.gamma, pol.kernel) for li in range(len(pf.layers))]
    keeps: dict[int, torch.Tensor] = {}
    for budgets in cascade_budgets(prefs, pol.selectable(res.budget), G, m):
        for li, b in enumerate(budgets):
            order = torch.sort(inds[li], dim=-1, descending=True, stable=True).indices
            top = torch.zeros(G, m, dtype=torch.bool).scatter_(-1, order, torch.arange(m).expand(G, m) < b[:, None])
            keeps[li] = top if li not in keeps else keeps[li] & top
            assert torch.equal(keeps[li], top), "a cascade step would need an evicted token back"
    for li in range(len(pf.layers)):
        assert torch.equal(keeps[li], res.keep[li, :, :m])


def test_proportional_allocation_handles_zero_weights():
    got = proportional_allocation(torch.tensor([1.0, 0.0, 0.0]), 25, 10)
    assert got.tolist() == [10, 8, 7]


# ---------------------------------------------------------------------------------------------------- TOVA
@FEW
@given(case=cases())
def test_tova_heads_of_a_layer_keep_one_token_set(case):
    """One score per layer, so its KV heads keep the same tokens (nested where the split gives a head one more)."""
    pf, w, budget = case
    res = get_policy("tova", window=w)(pf, budget)
    for layer in res.keep:  # (G, n)
        for a in layer:
            for b in layer:
                small, big = (a, b) if a.sum() <= b.sum() else (b, a)
                assert not (small & ~big).any()


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def pf40():
    return prefill(tiny(CONFIGS[0]), torch.randint(VOCAB, (1, 40), generator=torch.Generator().manual_seed(1)),
                   window=8, all_queries=True)


@pytest.mark.parametrize("name", list(REGISTRY))
@pytest.mark.parametrize("budget, match", [(0, r"budget=0\b"), (-3, r"budget=-3"), (0.0, r"budget=0\.0"),
                                           (1.5, r"budget=1\.5.*\(0, 1\]"), (-0.2, r"budget=-0\.2")])
def test_bad_budget(pf40, name, budget, match):
    with pytest.raises(ValueError, match=match):
        get_policy(name, window=8)(pf40, budget)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_budget_of_wrong_type(pf40, name):
    with pytest.raises(TypeError, match=r"budget=\[64\]"):
        get_policy(name, window=8)(pf40, [64])
    with pytest.raises(ValueError, match="budget='half'"):
        get_policy(name, window=8)(pf40, "half")
    a, b = get_policy(name, window=8)(pf40, "16"), get_policy(name, window=8)(pf40, 16)  # text budgets parse
    assert torch.equal(a.keep, b.keep)


@pytest.mark.parametrize("name", [n for n, c in REGISTRY.items() if c.uses_window])
def test_window_errors(pf40, name):
    with pytest.raises(ValueError, match=r"window=40 ≥ prompt length n=40"):
        get_policy(name, window=40)(pf40, 16)
    with pytest.raises(ValueError, match=r"budget of 6 tokens per KV head is smaller than the window=8"):
        get_policy(name, window=8)(pf40, 6)
    with pytest.raises(ValueError, match=r"window=16 but the prefill captured only 8"):
        get_policy(name, window=16)(pf40, 20)


def test_unknown_policy_lists_the_registry():
    with pytest.raises(ValueError, match="unknown policy 'h2o_v9': registered are " + ", ".join(REGISTRY)):
        get_policy("h2o_v9")


@pytest.mark.parametrize("name, params, match", [
    ("snapkv", {"window": 0}, r"window=0"), ("snapkv", {"kernel": 4}, r"kernel=4.*odd"),
    ("pyramidkv", {"beta": 0}, r"beta=0"), ("adakv", {"alpha": 1.5}, r"alpha=1\.5.*\[0, 1\]"),
    ("criticalkv", {"first_stage": -0.1}, r"first_stage=-0\.1"), ("criticaladakv", {"alpha": -1}, r"alpha=-1"),
    ("cake", {"tau1": 0}, r"tau1=0"), ("cake", {"gamma": -1.0}, r"gamma=-1\.0"), ("cake", {"window": 1}, r"window=1"),
    ("cake", {"kernel": 2}, r"kernel=2"), ("flowkv", {"sinks": -1}, r"sinks=-1"),
    ("flowkv_global", {"norm": "N9"}, r"norm='N9'.*N0, N1, N2, N3"),
    ("flowkv_global", {"head_floor": -2}, r"head_floor=-2"), ("streamingllm", {"sinks": 1.5}, r"sinks=1\.5"),
    ("smoothevict", {"kernel": 0}, r"kernel=0"), ("h2o", {"normalise": 1}, r"normalise=1"),
    ("flowkv", {"form": "cross"}, r"form='cross' is invalid.*'exact'.*'no_cross'.*'per_head'"),
    ("flowkv", {"p": 3}, r"p=3 is invalid.*2 \(Frobenius norm\) or 1 \(entrywise L1 norm\)"),
    ("flowkv", {"p": True}, r"p=True is invalid"), ("flowkv", {"p": "1"}, r"p='1' is invalid"),
    ("flowkv_global", {"form": 2}, r"form=2 is invalid"),
    ("flowkv", {"form": "no_cross", "p": 1}, r"form='no_cross' with p=1 is invalid.*L2 identity"),
    ("flowkv_no_cross", {"p": 1}, r"flowkv_no_cross: form='no_cross' with p=1"),
    ("flowkv_l1", {"form": "no_cross"}, r"flowkv_l1: form='no_cross' with p=1"),
    ("flowkv_pool7", {"kernel": 4}, r"flowkv_pool7: kernel=4"),
    ("flowkv_global_n3", {"norm": "N4"}, r"flowkv_global_n3: norm='N4'"),
])
def test_bad_params(name, params, match):
    with pytest.raises(ValueError, match=match):
        get_policy(name, **params)


def test_unknown_param_names_the_policy():
    with pytest.raises(TypeError, match=r"policy 'snapkv':.*'alpha'"):
        get_policy("snapkv", alpha=0.3)


def test_every_registered_policy_has_a_reference_and_a_default():
    assert set(ref.REFERENCES) == set(REGISTRY) == {n for n, _ in DEFAULT_POLICIES}
