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


# ---- the stored H200 comparator, peer and scale runs (issues 14 and 15) ----
def test_comparison_table_of_the_stored_h200_run():
    res, peers = bench.load_results(results.REPO / "results/gpu_h200_cmp"), bench.load_results(results.REPO / "results/peers_h200")
    t = analysis.comparison_table(res, peers)
    kinds = t.groupby("kind").name.count()
    assert kinds["full"] == 1 and kinds["eviction"] >= 5 and kinds["block-sparse"] == 2 and kinds["peer"] == 2
    full = t[t.kind == "full"].kv_resident_gb.iloc[0]
    evict = t[t.kind == "eviction"].kv_resident_gb
    assert evict.nunique() == 1 and abs(evict.iloc[0] - 0.05 * full) < 1e-3 * full  # every policy keeps 5 %
    assert (t[t.kind == "block-sparse"].kv_resident_gb == full).all()  # block-sparse holds everything
    k = analysis.attention_kernels(res, peers)
    assert {"torch SDPA, full cache", "FlexAttention", "FlashInfer"} <= set(k.name)


def test_scale_tables_of_the_stored_h200_run():
    res = bench.load_results(results.REPO / "results/scale_h200")
    t = analysis.scale_tables(res)
    cap = res["meta"]["gpu_total_bytes"] / 1e9
    for _, f in t["frontier"].iterrows():
        assert f.first_oom > f.largest_context > 0
    g = t["decode"]
    assert (g[g.fits].peak_gb <= cap).all()
    per_token = 80 * 8 * 128 * 2 * 2  # bytes of KV per token of the Llama-3-70B shape, bf16
    flow = g[g.fits & (g.policy == "flowkv")]
    assert ((flow.kept_gb * 1e9 - flow.budget * flow.context * per_token).abs() <= 80 * 8 * 128 * 2 * 2).all()
    p = t["prefill"][t["prefill"].status == "ok"]
    assert ((p.seconds_extrapolated - p.seconds * 80 / p.layers_run).abs() < 1e-6 * p.seconds_extrapolated).all()
    assert set(t["fullkv_curve"].format) == {"fp8", "bf16"}


def test_prefill_flops_count_what_torch_counts():
    """The linear part (projections + the last token's LM head) equals FlopCounterMode's matmul count of a real
    chunked prefill; attention is the causal n(n+1)/2 pairs, quadratic in n."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from flowkv_utils.capture import prefill
    from flowkv_utils.models import random_model

    m = random_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=128, intermediate=96)
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as fc:
        prefill(m, ids, window=8, chunk=64)
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    f = analysis.prefill_flops(2, 4, 2, 16, 64, 96, 128, 200)
    assert f["linear"] == counts["aten.mm"]
    a1, a2 = (analysis.prefill_flops(2, 4, 2, 16, 64, 96, 128, n)["attention"] for n in (1000, 2000))
    assert abs(a2 / a1 - 2000 * 2001 / (1000 * 1001)) < 1e-12


def test_prefill_rates_of_the_stored_runs():
    res = bench.load_results(results.REPO / "results/gpu_h200_cmp")
    r = analysis.prefill_rates(res["prefill"], res["meta"]["shape"])
    assert (r.tflops > 0).all() and (r.attention_share > 0.5).all()  # at 200K attention dominates
    sc = bench.load_results(results.REPO / "results/scale_h200")
    r = analysis.prefill_rates(sc["scale_prefill"], sc["meta"]["shape"], seconds="seconds", layers_run="layers_run")
    assert len(r) == 6 and (r.tflops > 0).all()


def test_profile_groups_of_the_stored_h200_profile():
    """Per budget the groups and the gaps add up to the step exactly, shares sum to 1, and the floors are the ones the
    profile stored: matmul's the same at both budgets (the weights), attention's 5 % of FullKV's (the kept KV)."""
    res = bench.load_results(results.REPO / "results/gpu_h200_profile")
    t = analysis.profile_groups(res["profile"])
    for (_, _), g in t.groupby(["policy", "budget"], dropna=False):
        assert abs(g.us.sum() - 1e3 * g.step_ms.iloc[0]) < 1e-6 * g.us.sum()
        assert abs(g.share.sum() - 1.0) < 1e-9 and g.group.iloc[-1] == analysis.GAPS and g.us.iloc[-1] > 0
    fl = t.dropna(subset=["floor_us"]).pivot_table(index="group", columns="policy", values="floor_us")
    assert abs(fl.loc["matmul", "fullkv"] - fl.loc["matmul", "uniform"]) < 1e-6 * fl.loc["matmul", "fullkv"]
    ratio = fl.loc["attention (split-KV)", "uniform"] / fl.loc["attention (split-KV)", "fullkv"]
    assert abs(ratio - 0.05) < 1e-3


def test_h200_bars_read_the_stored_rows_they_judge():
    """Each of issue 14's H200 bars is the stored row it names against its target; a context the run lacks gives
    NaN and no verdict instead of a silent pass."""
    res = bench.load_results(results.REPO / "results/gpu_h200")
    t = analysis.H200_TARGETS
    b = analysis.h200_bars(res).set_index("bar")
    d = res["decode"]
    n = int(d[d.status == "ok"].context.max())
    full = d[(d.sweep == "context") & (d.context == n) & (d.batch == 1) & (d.policy == "fullkv")].iloc[0]
    row = b.loc[f"decode step / floor, fullkv, n={n}, batch 1"]
    assert row.value == full.floor_ratio and row.reached == (full.floor_ratio <= t.floor_ratio)
    sc = res["scoring"]
    got = sc[(sc.policy == "flowkv_global") & (sc.context == 32768)].fraction.iloc[0]
    assert b.loc["flowkv_global scoring+selection / prefill, n=32768"].value == got
    assert len(b) == 2 + 2 + 2 * len(t.scoring_contexts)
    missing = analysis.h200_bars(res, targets=analysis.H200Targets(scoring_contexts=(12345,))).set_index("bar")
    assert missing.loc["flowkv scoring+selection / prefill, n=12345"].isna().value
    assert missing.loc["flowkv scoring+selection / prefill, n=12345"].reached is None
