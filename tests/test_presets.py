"""Named settings (policies.KVPRESS) and CAKE's official allocation: they construct, they have the documented
properties, they leave the project's defaults (and stored result identities) alone; bad values are named.
The kvpress cross-check itself (tools/kvpress_crosscheck.py, `make kvpress-check`) needs kvpress and is not run
here; only its kvpress-free pieces are."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from flowkv_utils.budgets import even_excess_allocation, proportional_allocation
from flowkv_utils.capture import prefill
from flowkv_utils.models import random_model
from flowkv_utils.policies import KVPRESS, PRESETS, REGISTRY, get_policy
from flowkv_utils.policies.base import share_of
from flowkv_utils.policies.cake import layer_allocation, official_allocation
from flowkv_utils.sweep import policy_params_json

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def pf120():
    model = random_model("llama", layers=3, heads=4, kv_heads=2, head_dim=8, vocab=128, seed=3)
    return prefill(model, torch.randint(128, (1, 120), generator=torch.Generator().manual_seed(5)), window=8)


def test_kvpress_preset_constructs_with_documented_values():
    assert PRESETS["kvpress"] is KVPRESS
    assert set(KVPRESS) <= set(REGISTRY)
    assert set(KVPRESS) == {"streamingllm", "snapkv", "pyramidkv", "adakv", "criticalkv", "criticaladakv"}
    for name, params in KVPRESS.items():
        p = get_policy(name, **params)
        if name == "streamingllm":
            assert params == {} and p.sinks == 4  # kvpress's n_sink = 4: nothing to change
            continue
        assert (p.pool, p.kernel) == ("avg", 5), name  # SnapKVPress: F.avg_pool1d, kernel_size = 5
        if name in ("adakv", "criticalkv", "criticaladakv"):
            assert p.shares == "kept", name
        assert p.window == 32  # the project's window; kvpress's default 64 is not part of the preset


def test_defaults_stay_the_projects():
    assert (get_policy("snapkv").pool, get_policy("snapkv").kernel) == ("max", 7)
    for name in ("adakv", "criticalkv", "criticaladakv"):
        assert get_policy(name).shares == "selectable"
    assert get_policy("cake").allocation == "project"


def test_stored_result_identities_unchanged():
    """New parameters at their defaults are not written into policy_params (the stored rows keep their key)."""
    assert policy_params_json(get_policy("snapkv")) == '{"kernel": 7}'
    assert policy_params_json(get_policy("adakv")) == '{"alpha": 0.2, "kernel": 7}'
    assert policy_params_json(get_policy("criticaladakv")) == '{"alpha": 0.2, "first_stage": 0.5, "kernel": 7}'
    assert policy_params_json(get_policy("cake")) == '{"gamma": 200.0, "kernel": 5, "tau1": 1.0, "tau2": 1.0}'
    assert '"pool": "avg"' in policy_params_json(get_policy("snapkv", **KVPRESS["snapkv"]))
    assert '"shares": "kept"' in policy_params_json(get_policy("adakv", **KVPRESS["adakv"]))
    assert '"allocation": "official"' in policy_params_json(get_policy("cake", allocation="official"))
    for name in ("flowkv", "flowkv_global", "smoothevict"):  # FlowKV's score ablations form, p: only when set
        stored = policy_params_json(get_policy(name))
        assert '"form"' not in stored and '"p"' not in stored
    assert '"form": "per_head", ' in policy_params_json(get_policy("flowkv", form="per_head"))
    assert '"p": 1' in policy_params_json(get_policy("flowkv", p=1))
    assert '"form": "exact", ' in policy_params_json(get_policy("flowkv_l1"))  # new rows: every parameter
    assert '"p": 1' in policy_params_json(get_policy("flowkv_l1"))


@pytest.mark.parametrize("fraction, prefix, w, shares, want", [
    (0.2, 96, 32, "selectable", 19),  # project: ⌊0.2·(128 − 32)⌋
    (0.2, 96, 32, "kept", 0),  # kvpress: ⌊0.2·128⌋ = 25 < w, the window takes all of it
    (0.2, 608, 32, "kept", 96),  # B = 640: ⌊0.2·640⌋ − 32
    (0.5, 96, 32, "kept", 32),  # CriticalKV stage 1 at B = 128: ⌊0.5·128⌋ − 32
    (0.5, 96, 32, "selectable", 48),
])
def test_share_of(fraction, prefix, w, shares, want):
    assert share_of(fraction, prefix, w, shares) == want


def test_avg_pooling_commutes_with_the_group_mean():
    """kvpress pools each query head, then averages the group; the project averages first: same numbers."""
    pf = pf120()
    p = get_policy("snapkv", window=8, **KVPRESS["snapkv"])
    A = p.attn(pf, 1)[..., : pf.n - 8]
    per_head = torch.nn.functional.avg_pool1d(A.mean(1).unsqueeze(0), 5, stride=1, padding=2)[0]
    torch.testing.assert_close(p.layer_scores(pf, 1), per_head.view(2, 2, -1).mean(1))


def test_kvpress_adakv_safeguard_differs_from_the_projects():
    """At B = 16 (w = 8, α = 0.2) the project guarantees ⌊0.2·8⌋ = 1 prefix token per head, kvpress
    ⌊0.2·16⌋ − 8 < 0, i.e. none: on this prompt one head then keeps its window alone."""
    pf = pf120()
    proj = get_policy("adakv", window=8, alpha=0.2)(pf, 16)
    kvp = get_policy("adakv", window=8, alpha=0.2, shares="kept")(pf, 16)
    assert proj.total_kept == kvp.total_kept == proj.budget.total
    assert (proj.kept_per_head >= 8 + 1).all()
    assert (kvp.kept_per_head >= 8).all() and (kvp.kept_per_head == 8).any()


def test_even_excess_allocation_by_hand():
    """antgroup/cakekv adjust_budgets, worked by hand. Weights (10, 3, 1, 0), total 40, cap 15: int shares
    (28, 8, 2, 0); clip → excess 13 spread evenly over 3 layers (4 each, 1 to the first): (15, 13, 6, 4); the
    truncation shortfall 2 to the first two below cap: (15, 14, 7, 4). The project's rule gives (15, 15, 10, 0)."""
    w = torch.tensor([10.0, 3.0, 1.0, 0.0])
    assert even_excess_allocation(w, 40, 15).tolist() == [15, 14, 7, 4]
    assert proportional_allocation(w, 40, 15).tolist() == [15, 15, 10, 0]


def test_even_excess_allocation_keeps_the_total_where_the_official_code_loses_it():
    """Weights (10, 5, 1), total 30, cap 11: (18, 9, 1) → clip, excess 7 → (11, 13, 4): layer 1 passes the cap
    (the official code clips it when evicting: 28 of 30 spent). [proj] spread again: (11, 11, 8)."""
    assert even_excess_allocation(torch.tensor([10.0, 5.0, 1.0]), 30, 11).tolist() == [11, 11, 8]
    with pytest.raises(ValueError, match=r"total=40 exceeds 3 × cap 11"):
        even_excess_allocation(torch.ones(3), 40, 11)


def test_cake_official_heads_uniform_and_exact():
    prefs = torch.tensor([9.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    got = official_allocation(prefs, 4 * 2 * 30, 2, 50)  # (L, G) = (4, 2), cap n − w = 50
    assert int(got.sum()) == 240 and (got <= 50).all()
    assert (got[:, 0] == got[:, 1]).all()  # every head of a layer the same count
    proj = layer_allocation(prefs, 240, 2, 50)
    assert int(proj.sum()) == 240 and not torch.equal(got, proj)  # layer 0 clipped: the rules part
    odd = official_allocation(prefs, 241, 2, 50)  # a fractional budget's odd entry: one slot, bottom first
    assert int(odd.sum()) == 241 and (odd - got).abs().sum() == 1


def test_cake_official_clipping_on_a_model():
    """Peaked preferences (τ small) clip layers: the official allocation then differs from the project's, both
    spend the budget exactly and keep every window."""
    pf = pf120()
    a = get_policy("cake", window=8, tau1=0.2, tau2=0.2)(pf, 30)
    b = get_policy("cake", window=8, tau1=0.2, tau2=0.2, allocation="official")(pf, 30)
    assert a.total_kept == b.total_kept == a.budget.total
    assert b.keep[..., -8:].all()
    assert (b.kept_per_head == b.kept_per_head[:, :1]).all()


@pytest.mark.parametrize("name, params, match", [
    ("snapkv", {"pool": "mean"}, r"snapkv: pool='mean' is invalid; allowed: 'max'.*'avg'"),
    ("pyramidkv", {"pool": None}, r"pool=None"),
    ("adakv", {"shares": "window"}, r"adakv: shares='window' is invalid; allowed: 'selectable'.*'kept'"),
    ("criticalkv", {"shares": 1}, r"criticalkv: shares=1"),
    ("criticaladakv", {"shares": "Kept"}, r"shares='Kept'"),
    ("cake", {"allocation": "cakekv"}, r"cake: allocation='cakekv' is invalid; allowed: 'project'.*'official'"),
    ("snapkv", {"pool": "avg", "kernel": 4}, r"kernel=4.*avg-pooling"),
])
def test_bad_setting_values(name, params, match):
    with pytest.raises(ValueError, match=match):
        get_policy(name, **params)


# ---------------------------------------------------------------------------------------------------- the harness
def _tool():
    path = Path(__file__).resolve().parents[1] / "tools" / "kvpress_crosscheck.py"
    spec = importlib.util.spec_from_file_location("kvpress_crosscheck", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("kvpress_crosscheck", mod)
    spec.loader.exec_module(mod)
    return mod


def test_crosscheck_harness_without_kvpress():
    """The harness imports without kvpress; its ratio gives kvpress's kept count exactly; Jaccard is right."""
    import numpy as np

    tool = _tool()
    assert "kvpress" not in sys.modules
    for budget in (128, 640):
        for n in (2042, 4063, 1000):
            r = tool.ratio_for(budget, n)
            assert int(n * (1 - r)) == budget  # kvpress compute_n_kept / StreamingLLM's int(k_len·(1 − ratio))
            assert int((1 - r) * n * 0.5) == budget // 2  # CriticalKVPress's stage-1 count
    a = np.zeros((2, 1, 4), bool)
    b = np.zeros((2, 1, 4), bool)
    a[0, 0, :2] = b[0, 0, 1:3] = True  # {0, 1} vs {1, 2}: 1/3
    a[1, 0, :] = b[1, 0, :] = True
    assert tool.jaccard_per_layer(a, b).tolist() == [pytest.approx(1 / 3), 1.0]
    for policy in tool.CASES:
        assert policy in REGISTRY or policy in ("tova", "keydiff"), policy
