"""Head-wise decomposition identities (method.md §1) on the real embedded model and random models of every family,
and the analysis helpers notebook 01 draws from."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowkv_utils import decomposition as dc
from flowkv_utils.capture import prefill
from flowkv_utils.models import random_model
from flowkv_utils.policies.flowkv import cached_gram, flowkv_scores

RTOL = 1e-5
FAMILIES = [
    ("llama", dict(heads=4, kv_heads=2)),
    ("llama", dict(heads=4, kv_heads=2, bias=True)),  # o_proj bias: b_O ≠ 0
    ("llama", dict(heads=4, kv_heads=4)),  # MHA, G = H
    ("mistral", dict(heads=4, kv_heads=2)),
    ("qwen2", dict(heads=6, kv_heads=2)),  # q/k/v biases
    ("qwen3", dict(heads=4, kv_heads=2)),  # q/k norms
]
FAMILY_IDS = [f"{f}-H{kw['heads']}G{kw['kv_heads']}{'-bias' if kw.get('bias') else ''}" for f, kw in FAMILIES]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-300))


def bias(pf, li):
    b = pf.b_o(li)
    return 0 if b is None else b.float()


@pytest.fixture(scope="module", params=FAMILIES, ids=FAMILY_IDS)
def family_prefill(request):
    family, kw = request.param
    model = random_model(family, layers=2, head_dim=16, vocab=128, seed=5, **kw)
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(6))
    return prefill(model, ids, window=8)


def check_identities(pf):
    """Every identity of notebook 01, on every layer."""
    m = pf.n - pf.window
    for li in range(pf.shape.layers):
        out = pf.layers[li].attn_out.float()
        C = dc.head_contributions(pf, li)
        assert rel(C.sum(0) + bias(pf, li), out) <= RTOL, f"layer {li}: Σ_h C_h + b_O = O"
        assert rel(dc.attention_output(pf, li), out) <= RTOL, f"layer {li}: concat route"
        X, Y = dc.mm_factors(pf, li)
        assert rel(X @ Y, out - bias(pf, li)) <= RTOL, f"layer {li}: X·Y = O − b_O"
        S = dc.kv_entry_contribution_norms(pf, li, m)
        F = flowkv_scores(pf.attn(li), pf.layers[li].v, cached_gram(pf, li), m)
        assert rel(F, S) <= RTOL, f"layer {li}: Gram form = direct score"


@pytest.mark.model
def test_identities_embedded_every_layer(small_prefill):
    check_identities(small_prefill)


def test_identities_random_families(family_prefill):
    check_identities(family_prefill)


def test_bias_is_present_where_expected(family_prefill):
    name = family_prefill.model.config._name_or_path
    has_bias = family_prefill.b_o(0) is not None
    assert has_bias == bool(getattr(family_prefill.model.config, "attention_bias", False)) or name != "random-llama"


def test_kv_entry_removal_changes_output_by_its_score(family_prefill):
    pf, s = family_prefill, family_prefill.shape
    for li in range(s.layers):
        X, Y = dc.mm_factors(pf, li)
        S = dc.kv_entry_contribution_norms(pf, li)
        for g, j in [(0, 0), (s.kv_heads - 1, pf.n - 1), divmod(int(S.argmax()), pf.n)]:
            mask = dc.kv_entry_inner_mask(s.heads, s.kv_heads, pf.n, g, j)
            assert int(mask.sum()) == s.group
            assert rel((X[:, mask] @ Y[mask]).norm(), S[g, j]) <= RTOL


def test_per_head_product_bounds_exact_score(family_prefill):
    pf, s = family_prefill, family_prefill.shape
    for li in range(s.layers):
        S, Pr = dc.kv_entry_contribution_norms(pf, li), dc.per_head_product_scores(pf, li)
        assert Pr.shape == S.shape == (s.kv_heads, pf.n)
        assert bool((S <= Pr * (1 + 1e-5) + 1e-7).all()), "triangle inequality"
        if s.group == 1:  # G = H: the exact score is DKM's column–row product
            assert rel(S, Pr) <= RTOL


def test_head_contribution_norms(family_prefill):
    pf = family_prefill
    N = dc.head_contribution_norms(pf)
    assert N.shape == (pf.shape.layers, pf.shape.heads)
    for li in range(pf.shape.layers):
        assert rel(N[li], dc.head_contributions(pf, li).flatten(1).norm(dim=1)) <= RTOL
    assert dc.head_contribution_norms(pf, [1]).shape == (1, pf.shape.heads)


def test_token_attention_and_contribution(family_prefill):
    pf = family_prefill
    A, P = pf.attn(1), dc.projected_values(pf, 1)
    att, con = dc.token_attention_and_contribution(pf, 1)
    assert att.shape == con.shape == (pf.n,)
    assert abs(float(att.sum()) - 1) < 1e-5 and abs(float(con.sum()) - 1) < 1e-5
    direct = torch.einsum("hwj,hjD->jwD", A, P).flatten(1).norm(dim=1)  # ‖Σ_h A_h[:, j] P_h[j]ᵀ‖_F
    assert rel(con, direct / direct.sum()) <= 1e-4
    assert rel(att, A.mean((0, 1))) <= RTOL


def test_renormalised_output(family_prefill):
    pf, s = family_prefill, family_prefill.shape
    out = pf.layers[0].attn_out.float()
    everything = torch.ones(s.heads, pf.n, dtype=torch.bool)
    assert rel(dc.renormalised_output(pf, 0, everything), out) <= RTOL
    keep = torch.rand(s.heads, pf.n, generator=torch.Generator().manual_seed(0)) < 0.5
    keep[:, -1] = True  # every head keeps at least one token
    a = dc.renormalised_output(pf, 0, keep)
    assert rel(dc.renormalised_output(pf, 0, keep, P=dc.projected_values(pf, 0)), a) <= 1e-6
    # direct transcription: softmax over the kept keys only
    A = pf.attn(0).masked_fill(~keep.unsqueeze(1), 0)
    want = torch.einsum("hwn,hnD->wD", A / A.sum(-1, keepdim=True), dc.projected_values(pf, 0)) + bias(pf, 0)
    assert rel(a, want) <= RTOL


def test_inner_selection_errors(family_prefill):
    pf = family_prefill
    fracs = [0.05, 0.3, 1.0]
    rows = dc.inner_selection_errors(pf, 1, fracs)
    assert len(rows) == len(dc.SELECTORS) * len(fracs)
    Hn = pf.shape.heads * pf.n
    for r in rows:
        assert r["kept"] == max(1, round(r["frac"] * Hn))
        assert r["drop_error"] <= r["bound"] * (1 + 1e-5) + 1e-9, "DKM bound"
        assert 0 <= r["kept_mass"] <= 1 + 1e-6 and 0 <= r["sink_kept"] <= 1
        if r["frac"] == 1.0:
            assert r["drop_error"] == 0 and r["bound"] == 0 and r["renorm_error"] < 1e-5
            assert abs(r["kept_mass"] - 1) < 1e-5
    by = {(r["selector"], r["frac"]): r for r in rows}
    for f in fracs:  # output-aware selection minimises the bound among subsets of that size
        assert by[("product", f)]["bound"] <= by[("attention", f)]["bound"] + 1e-7


@pytest.mark.parametrize("frac", [0.0, -0.1, 1.5])
def test_topk_mask_rejects_bad_fraction(frac):
    with pytest.raises(ValueError, match=f"frac={frac}"):
        dc.topk_mask(torch.rand(10), frac)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), frac=st.floats(0.01, 1.0), seed=st.integers(0, 10_000))
def test_topk_mask_property(n, frac, seed):
    x = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    mask = dc.topk_mask(x, frac)
    assert int(mask.sum()) == max(1, round(frac * n))
    if 0 < int(mask.sum()) < n:
        assert float(x[mask].min()) >= float(x[~mask].max())


@settings(max_examples=40, deadline=None)
@given(w=st.integers(1, 6), k=st.integers(1, 24), D=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_dkm_bound_property(w, k, D, seed):
    """‖Σ_{i∉S} X[:, i] Y[i, :]‖_F ≤ Σ_{i∉S} ‖X[:, i]‖ ‖Y[i, :]‖ for any subset S (method.md §1)."""
    g = torch.Generator().manual_seed(seed)
    X, Y = torch.randn(w, k, generator=g, dtype=torch.float64), torch.randn(k, D, generator=g, dtype=torch.float64)
    keep = torch.rand(k, generator=g) < 0.5
    err = X @ Y - dc.subset_output(X, Y, keep)
    bound = dc.inner_products(X, Y)[~keep].sum()
    assert float(err.norm()) <= float(bound) * (1 + 1e-12) + 1e-12
    assert dc.relative_error(dc.subset_output(X, Y, torch.ones(k, dtype=torch.bool)), X @ Y) < 1e-12
