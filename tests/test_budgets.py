"""Budgets (method.md §3): exact totals for token and fraction budgets, the PyramidKV schedule, CAKE's
proportional allocation — against direct transcriptions (tests/reference_policies.py) — and clear errors."""

from __future__ import annotations

import pytest
import reference_policies as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowkv_utils.budgets import (
    check_window,
    fill_to_total,
    proportional_allocation,
    proportional_shares,
    pyramid_layer_budgets,
    resolve_budget,
    split_evenly,
)

PROPERTY = settings(max_examples=200, deadline=None)

budgets = st.one_of(st.integers(1, 600), st.floats(1e-3, 1.0))


@PROPERTY
@given(budget=budgets, n=st.integers(1, 500), L=st.integers(1, 6), G=st.integers(1, 4))
def test_resolve_budget_exact_totals(budget, n, L, G):
    b = resolve_budget(budget, n, L, G)
    assert b.total == ref.model_total(budget, n, L, G)
    slots = b.per_slot()
    assert slots.shape == (L, G) and int(slots.sum()) == b.total
    assert int(slots.max() - slots.min()) <= 1
    assert slots.flatten().tolist() == [x for row in ref.slot_budgets(b.total, L, G) for x in row]
    assert torch.equal(b.per_layer(), slots.sum(1)) and int(b.per_layer().sum()) == b.total
    assert b.full == (b.total == n * L * G) and (slots <= n).all()
    assert b.per_head == pytest.approx(b.total / (L * G))


@PROPERTY
@given(n=st.integers(1, 300), over=st.integers(0, 100), L=st.integers(1, 4), G=st.integers(1, 4))
def test_budget_at_least_n_is_full(n, over, L, G):
    assert resolve_budget(n + over, n, L, G).full and resolve_budget(1.0, n, L, G).full


@PROPERTY
@given(total=st.integers(0, 10_000), parts=st.integers(1, 64))
def test_split_evenly(total, parts):
    s = split_evenly(total, parts)
    assert int(s.sum()) == total and int(s.max() - s.min()) <= 1 and torch.equal(s, s.sort(descending=True).values)


@pytest.mark.parametrize("budget, err, match", [
    (0, ValueError, r"budget=0: must be a positive token count per KV head \(int, e\.g\. 128\), a fraction of the prompt in \(0, 1\]"),
    (-5, ValueError, r"budget=-5"), (0.0, ValueError, r"budget=0\.0: a fractional budget must lie in \(0, 1\]"),
    (1.01, ValueError, r"budget=1\.01"), (-0.5, ValueError, r"budget=-0\.5"), (float("nan"), ValueError, "budget=nan"),
    (True, TypeError, r"budget=True"), ("half", ValueError, r"budget='half'"), (None, TypeError, r"budget=None"),
    ([64], TypeError, r"budget=\[64\]"),
])
def test_bad_budgets(budget, err, match):
    with pytest.raises(err, match=match):
        resolve_budget(budget, 100, 2, 2)


def test_one_budget_type():
    """Tokens, fractions and "full", as values or as the text tables and command lines carry."""
    from flowkv_utils.budgets import FULL, budget_label, parse_budget
    assert [parse_budget(b) for b in (128, "128", 0.05, "0.05", "full", "FULL")] == [128, 128, 0.05, 0.05, FULL, FULL]
    assert [budget_label(b) for b in (128, 0.05, "full", "0.5")] == ["128", "0.05", "full", "0.5"]
    assert resolve_budget("full", 100, 2, 2).full and resolve_budget(1.0, 100, 2, 2).full
    assert resolve_budget("64", 100, 2, 2) == resolve_budget(64, 100, 2, 2)


def test_check_window_errors():
    with pytest.raises(ValueError, match=r"snapkv: window=32 ≥ prompt length n=32"):
        check_window(32, 32, 40, "snapkv")
    with pytest.raises(ValueError, match=r"budget of 16 tokens per KV head is smaller than the window=32"):
        check_window(100, 32, 16, "snapkv")
    check_window(100, 32, 32, "snapkv")  # budget == window: nothing selectable, but valid


# ---------------------------------------------------------------------------------------------------- PyramidKV
@PROPERTY
@given(Bp=st.integers(0, 300), L=st.integers(1, 40), n=st.integers(2, 2000), w=st.integers(1, 64),
       beta=st.integers(1, 30))
def test_pyramid_schedule_matches_transcription(Bp, L, n, w, beta):
    if w >= n or Bp > n - w:
        return
    got = pyramid_layer_budgets(Bp, L, n - w, beta, window=w)
    assert got.tolist() == ref.pyramid_schedule(Bp, L, n, w, beta)
    assert int(got.sum()) == L * Bp  # the model total is exact
    assert (got >= 0).all() and (got <= n - w).all()
    assert (got[:-1] >= got[1:]).all(), "the pyramid must not grow with depth"


def test_pyramid_uses_n_not_n_minus_w():
    """Official condition q_len < 2·(B − w): with n − w < 2B' ≤ n the schedule is still a pyramid."""
    Bp, w = 100, 32
    n = 2 * Bp + 10  # n ≥ 2B' but n − w < 2B'
    got = pyramid_layer_budgets(Bp, 4, n - w, 20, window=w)
    assert got[0] == n - w and got[0] > got[-1] and int(got.sum()) == 4 * Bp
    assert pyramid_layer_budgets(Bp, 4, 2 * Bp - 1 - w, 20, window=w).tolist() == [Bp] * 4  # n < 2B': SnapKV


def test_pyramid_literature_example():
    """B' = 128, L = 32, β = 20, long prompt: min = 6, max = 250, step = ⌊244/31⌋ = 7, so the [lit] schedule
    250 − 7ℓ sums to 4528 > 32·128 = 4096 (the official code overspends by 432 entries). [proj] the 432 are taken
    back 13 from every layer and one more from the top 16, keeping the pyramid non-increasing."""
    got = pyramid_layer_budgets(128, 32, 10_000, 20, window=32)
    raw = torch.tensor([250 - 7 * i for i in range(32)])
    assert int(raw.sum()) - 32 * 128 == 432 and int(got.sum()) == 32 * 128
    assert torch.equal(raw - got, 13 + (torch.arange(32) >= 16).long())


# ---------------------------------------------------------------------------------------------------- fill / CAKE
@PROPERTY
@given(alloc=st.lists(st.integers(0, 50), min_size=1, max_size=12), cap=st.integers(0, 60), data=st.data())
def test_fill_to_total(alloc, cap, data):
    a = torch.tensor(alloc).clamp(max=cap)
    total = data.draw(st.integers(0, len(alloc) * cap))
    out = fill_to_total(a, total, cap)
    assert int(out.sum()) == total and (out >= 0).all() and (out <= cap).all()
    assert (out >= a).all() if total >= int(a.sum()) else (out <= a).all()  # moves one way only


def test_fill_to_total_impossible():
    with pytest.raises(ValueError, match=r"cannot place total=7 into 2 slots capped at 3"):
        fill_to_total(torch.tensor([1, 1]), 7, 3)


@PROPERTY
@given(w=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=10), cap=st.integers(1, 100), data=st.data())
def test_proportional_allocation_matches_transcription(w, cap, data):
    weights = torch.tensor(w, dtype=torch.float64)
    total = data.draw(st.integers(0, len(w) * cap))
    got = proportional_allocation(weights, total, cap)
    want, ambiguous = ref.cake_layer_totals(w, total, cap)
    assert int(got.sum()) == total and (got <= cap).all() and (got >= 0).all()
    if not ambiguous:
        assert got.tolist() == want
    shares = proportional_shares(weights, total, cap)
    assert float(shares.sum()) == pytest.approx(total) and (shares <= cap + 1e-9).all()
    assert ((got - shares).abs() < 1 + 1e-9).all()  # rounding moves each entry by less than one


@PROPERTY
@given(w=st.lists(st.floats(0.0, 10.0), min_size=2, max_size=8), cap=st.integers(1, 50), data=st.data())
def test_proportional_shares_shrink_when_entries_join(w, cap, data):
    """Water-filling monotonicity, which CAKE's cascade relies on."""
    weights = torch.tensor(w, dtype=torch.float64)
    total = data.draw(st.integers(0, cap))
    prev = None
    for m in range(1, len(w) + 1):
        s = proportional_shares(weights[:m], total, cap)
        if prev is not None:
            assert (s[: m - 1] <= prev + 1e-9).all()
        prev = s


def test_proportional_allocation_over_capacity():
    with pytest.raises(ValueError, match=r"total=31 exceeds 3 × cap 10"):
        proportional_allocation(torch.ones(3), 31, 10)


def test_budget_argument_is_parse_budget_for_argparse():
    """Same values as `parse_budget`; a bad one raises argparse's error carrying parse_budget's message (the value
    and what is allowed), so a command line reports it in words."""
    import argparse

    from flowkv_utils.budgets import budget_argument, parse_budget

    for text in ("128", "0.05", "full", "FULL"):
        assert budget_argument(text) == parse_budget(text)
    for bad, named in (("0", "budget=0"), ("1.5", "budget=1.5"), ("lots", "'lots'")):
        with pytest.raises(argparse.ArgumentTypeError, match=named):
            budget_argument(bad)
