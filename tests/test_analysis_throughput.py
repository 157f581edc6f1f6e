"""analysis.targets_table: the throughput bars as notebook 04 states them, consistent with analysis.bars."""

from __future__ import annotations

from dataclasses import fields

from flowkv_utils import analysis, bench, results


def test_targets_table_lists_every_target_with_its_value():
    t = analysis.targets_table()
    assert list(t.name) == [f.name for f in fields(analysis.ThroughputTargets)]
    for row in t.itertuples():
        assert row.value == getattr(analysis.THROUGHPUT_TARGETS, row.name)
        assert row.target == f"{row.sense} {row.value:g}" and row.sense in ("≤", "≥")
    scoring = t.set_index("name").judged_on["scoring_share"]
    assert f"n = {analysis.SCORING_CONTEXT} " in scoring


def test_targets_table_follows_other_targets_and_context():
    other = analysis.ThroughputTargets(floor_ratio=1.5, batch_gain=4.0)
    t = analysis.targets_table(other, scoring_context=65536).set_index("name")
    assert t.target["floor_ratio"] == "≤ 1.5" and t.target["batch_gain"] == "≥ 4"
    assert "n = 65536 " in t.judged_on["scoring_share"]


def test_targets_table_says_what_bars_compares():
    """Every target string `bars` prints on the stored run is one of the table's, and each of the table's is used."""
    res = bench.load_results(results.REPO / "results" / "gpu")
    other = analysis.ThroughputTargets(floor_ratio=1.25, bound_fraction=0.75, batch_gain=12.0, scoring_share=0.04,
                                       alloc_over_kept=1.01)  # distinct values: each string names one target
    used = set(analysis.bars(res, targets=other).target)
    assert used == set(analysis.targets_table(other).target)
