"""DefensiveKV, Layer-DefensiveKV and LAVa beyond the registry-wide tests (test_policies.py compares them with their
transcriptions in reference_policies.py): the properties their budgets promise, the layer-wise compressor's counts,
and bad parameters."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_policies import CONFIGS, cases, tiny

from flowkv_utils import capture
from flowkv_utils.layerwise import LayerwiseCompressor
from flowkv_utils.policies import get_policy
from flowkv_utils.policies.cake import layer_allocation
from flowkv_utils.policies.defensivekv import defensive_attention, mass_stage
from flowkv_utils.policies.lava import head_budgets

FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
pytestmark = pytest.mark.usefixtures("one_thread")


@FEW
@given(case=cases())
def test_defensive_score_is_a_worst_case_above_the_mean(case):
    """D_g[j] ≥ the mean of the pooled attention over the group's heads and window rows (a max is ≥ a mean), and
    ≥ the head's mean of M (the floor)."""
    pf, w, _ = case
    G = pf.shape.kv_heads
    A = pf.attn(0)[:, -w:]
    D = defensive_attention(A, G, w, kernel=1)  # no pooling: R = A on the prefix
    m = pf.n - w
    P = A[:, :, :m].reshape(G, -1, m)  # (G, heads of g × window rows, m)
    assert (D >= P.mean(1) - 1e-7).all()  # the worst case is at least the average case
    assert (D.min(-1).values >= P.amax(1).mean(-1) - 1e-7).all()  # nothing below the head's mean of M


@FEW
@given(case=cases())
def test_defensivekv_keeps_its_first_stage(case):
    """Stage-1 tokens (mean-attention share below the threshold, at most the head's slot) score the layer maximum,
    so they are kept unless the layer's budget is all spent on entries at that maximum (a token reaching it by
    itself ties with them, as in the official code)."""
    pf, w, budget = case
    res = get_policy("defensivekv", window=w)(pf, budget)
    if res.budget.full:
        return
    slots = res.budget.per_slot() - w
    m = pf.n - w
    for li in range(len(pf.layers)):
        first = mass_stage(pf.attn(li)[:, -w:], pf.shape.kv_heads, w, 0.9, int(slots[li].min()))
        assert (first.sum(-1) <= slots[li]).all()
        s, kept = res.scores[li, :, :m], res.keep[li, :, :m]
        assert (s[first] == s.max()).all()
        if not (kept | ~first).all():
            assert (s[kept] == s.max()).all(), "a stage-1 token was evicted for a lower score"


@FEW
@given(case=cases(), alpha=st.sampled_from([0.0, 0.2, 1.0]))
def test_lava_budgets(case, alpha):
    """Layer totals follow CAKE's capped split of the sparsities; head budgets sum to the layer total; α = 1 splits a
    layer evenly over its heads, α = 0 keeps the layer's flattened top-T."""
    pf, w, budget = case
    pol = get_policy("lava", window=w, alpha=alpha)
    res = pol(pf, budget)
    if res.budget.full:
        return
    G, m = pf.shape.kv_heads, pf.n - w
    sig = torch.tensor(res.info["sparsity"], dtype=torch.float64)
    slots = layer_allocation(sig, pol.selectable(res.budget), G, m)
    assert res.info["layer_budgets"] == (slots.sum(1) + G * w).tolist() == res.kept_per_layer.tolist()
    for li in range(len(pf.layers)):
        T = int(slots[li].sum())
        k = head_budgets(pol.layer_scores(pf, li), T, alpha)
        assert int(k.sum()) == T and torch.equal(res.kept_per_head[li] - w, k)
        if alpha == 1.0:
            assert int(k.max() - k.min()) <= 1
    if alpha == 0.0:
        lay = get_policy("flowkv", window=w)  # the same flattened top-T, on LAVa's scores
        for li in range(len(pf.layers)):
            s = pol.layer_scores(pf, li)
            assert torch.equal(res.keep[li, :, :m], lay.keep_layer(pf, li, s, slots[li])[0])


def test_layerwise_counts_only_at_the_compressors_budget():
    """DefensiveKV's keep-set needs each layer's attention again: the compressor gives its counts at its own budget
    (equal to the one-shot ones) and refuses another budget instead of guessing."""
    m = tiny(CONFIGS[0])
    ids = torch.randint(0, 128, (1, 90), generator=torch.Generator().manual_seed(3))
    pf = capture.prefill(m, ids, window=8)
    names = ("defensivekv", "layer_defensivekv")
    comp = LayerwiseCompressor(m, ids, "snapkv", 30, window=8, also=names, keep_scores=True)
    capture.prefill(m, ids, window=8, on_layer=comp)
    comp.finish_counts()
    for name in names:
        want = get_policy(name, window=8)(pf, 30).keep.sum(-1)
        assert torch.equal(comp.kept_counts(name, 30), want) and torch.equal(comp.counts[name], want)
        with pytest.raises(ValueError, match=rf"kept_counts\('{name}', 50\).*budget_free_scores"):
            comp.kept_counts(name, 50)


@pytest.mark.parametrize("name, params, match", [
    ("defensivekv", {"kernel": 4}, r"kernel=4.*odd"), ("defensivekv", {"threshold": 1.5}, r"threshold=1\.5.*\[0, 1\]"),
    ("layer_defensivekv", {"threshold": -0.1}, r"threshold=-0\.1"), ("defensivekv", {"threshold": True}, "threshold"),
    ("lava", {"alpha": 2}, r"alpha=2.*\[0, 1\]"), ("lava", {"kernel": 0}, r"kernel=0"),
    ("lava", {"alpha": False}, "alpha"),
])
def test_bad_params(name, params, match):
    with pytest.raises(ValueError, match=match):
        get_policy(name, **params)
