"""`bench scale` (what one GPU holds of a large shape): the search, the uniform budgets, the layer cut, and a dry
run on the CPU whose rows must say exactly what was kept and how it was extrapolated."""

from __future__ import annotations

import pytest
import torch

from flowkv_utils.bench import gpu, largest_that_fits, load_results, scale, shape_model
from flowkv_utils.budgets import resolve_budget
from flowkv_utils.models import shape_of


@pytest.mark.parametrize("threshold", [0, 1, 2, 3, 5, 8, 13, 64, 100, 1000])
def test_largest_that_fits_finds_the_threshold_of_a_monotone_test(threshold):
    calls = []

    def fits(x):
        calls.append(x)
        return x <= threshold

    got = largest_that_fits(fits, 1, 100)
    assert got == min(threshold, 100)
    assert len(calls) <= 2 * 8 + 2  # doubling then bisection: logarithmic
    assert all(1 <= x <= 100 for x in calls)


@pytest.mark.parametrize("threshold", [8191, 8192, 20000, 131072, 200000, 10**7])
def test_largest_that_fits_at_a_resolution_stays_on_its_grid(threshold):
    seen = []

    def fits(n):
        seen.append(n)
        return n <= threshold

    got = largest_that_fits(fits, 8192, 1 << 20, resolution=4096)
    assert got <= threshold and all(n % 4096 == 0 for n in seen)
    assert got == (0 if threshold < 8192 else min(threshold // 4096 * 4096, 1 << 20))


def test_largest_that_fits_rejects_bad_arguments():
    with pytest.raises(ValueError, match="start=0"):
        largest_that_fits(lambda x: True, 0, 10)
    with pytest.raises(ValueError, match="limit=3"):
        largest_that_fits(lambda x: True, 5, 3)


@pytest.mark.parametrize("budget", [0.01, 0.05, 0.1, 7])
def test_uniform_counts_keep_exactly_the_budget(budget):
    c = scale.uniform_counts(budget, 5000, 80, 8)
    assert c.shape == (80, 8) and int(c.sum()) == resolve_budget(budget, 5000, 80, 8).total
    assert int(c.max() - c.min()) <= 1
    assert (scale.uniform_counts(None, 5000, 3, 2) == 5000).all()


def test_first_layers_cuts_and_restores_the_model():
    model = shape_model("tiny", "cpu", 256, dtype=torch.float32, layers=3)
    layers = list(model.model.layers)
    with scale.first_layers(model, 1) as m:
        assert len(m.model.layers) == 1 and shape_of(m).layers == 1 and m.model.layers[0] is layers[0]
    assert list(model.model.layers) == layers and shape_of(model).layers == 3
    with pytest.raises(ValueError, match="prefill_layers=4"), scale.first_layers(model, 4):
        pass


def test_scale_sweep_rejects_unknown_weight_formats(tmp_path):
    with pytest.raises(ValueError, match="weights 'int4'"):
        scale.scale_sweep(tmp_path, weights=("int4",), device="cpu")


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_scale_dry_run_on_cpu(tmp_path, fmt):
    """Every row a real measurement of the tiny shape: kept bytes exact, extrapolations × L / k."""
    rec = scale.scale_sweep(tmp_path, shape="tiny", weights=(fmt,), contexts=(256, 512), budgets=(0.05,),
                            prefill_contexts=(512,), prefill_layers=1, chunk=128, steps=2, warmup=1,
                            frontier_start=256, frontier_resolution=256, max_batch=2, device="cpu")
    rec.close()
    t = load_results(tmp_path)
    d, p = t["decode"], t["scale_prefill"]
    assert set(d["sweep"]) == {"scale", "batch", "maxbatch", "frontier"} and (d["status"] == "ok").all()
    assert d["weights"].str.contains("random weights").all() and d["weights"].str.contains(fmt).all()
    s = gpu.SHAPES["tiny"]
    per_token_entry = s["head_dim"] * 2 * 4  # K and V of one (layer, head, token), float32
    for _, r in d[d["sweep"] == "scale"].iterrows():
        b = None if pd_na(r["budget"]) else r["budget"]
        want = scale.uniform_counts(b, int(r["context"]), s["layers"], s["kv_heads"]).sum() * per_token_entry
        assert r["kept_bytes"] == want
    # frontier: every doubling fitted on the CPU up to the limit (4 × the longest context)
    assert d[d["sweep"] == "frontier"]["context"].max() == 4 * 512
    full = p[p["policy"] == "fullkv"].iloc[0]
    assert full["kept_bytes"] == 1 * s["kv_heads"] * 512 * per_token_entry
    for _, r in p.iterrows():
        assert r["layers_run"] == 1 and r["seconds_extrapolated"] == pytest.approx(r["seconds"] * s["layers"])
        assert r["kept_bytes_extrapolated"] == pytest.approx(r["kept_bytes"] * s["layers"])
    flow = p[p["policy"] == "flowkv"].iloc[0]
    assert flow["kept_bytes"] < full["kept_bytes"] / 5


def pd_na(x) -> bool:
    return x is None or x != x


def test_fp8_shape_model_holds_fp8_layers_and_decodes():
    from flowkv_utils.bench.timing import weight_bytes
    from flowkv_utils.quant import Fp8Linear, weight_format

    dense = shape_model("tiny", "cpu", 256, dtype=torch.float32, layers=3)
    fp8 = shape_model("tiny", "cpu", 256, dtype=torch.float32, layers=3, weights="fp8")
    assert weight_format(fp8) == "fp8-e4m3 per-channel" and len(fp8.model.layers) == 3
    for layer in fp8.model.layers:
        assert isinstance(layer.self_attn.q_proj, Fp8Linear) and isinstance(layer.mlp.down_proj, Fp8Linear)
    # each projection entry: 4 bytes → 1, plus one float32 scale per output row
    cfg = gpu.SHAPES["tiny"]
    d, D, H, G, inter = cfg["head_dim"], cfg["hidden"], cfg["heads"], cfg["kv_heads"], cfg["intermediate"]
    entries = D * H * d * 2 + D * G * d * 2 + 3 * D * inter
    rows = H * d + 2 * G * d + D + 2 * inter + D
    assert weight_bytes(dense) - weight_bytes(fp8) == 3 * (entries * 3 - rows * 4)
    with pytest.raises(ValueError, match="weights='int4'"):
        shape_model("tiny", "cpu", 256, weights="int4")


def test_decode_or_oom_records_an_oom_row_and_says_it_did_not_fit(monkeypatch, tmp_path):
    from flowkv_utils.bench import recorder

    def no_memory(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gpu, "synthetic_cache", no_memory)
    model = shape_model("tiny", "cpu", 256, dtype=torch.float32)
    rec = recorder(tmp_path, echo=False)
    bw = {"GBps": 10.0}
    ok = gpu.decode_or_oom(rec, model, scale.uniform_counts(None, 256, 2, 2), "fullkv", None, 256, bw=bw, cap=4,
                           steps=1, warmup=1, sweep="scale", batch=3, layout="pages16")
    rec.save_meta()
    rec.close()
    assert ok is False
    row = load_results(tmp_path)["decode"].iloc[0]
    assert (row.status, row.batch, row.layout, row.context) == ("oom", 3, "pages16", 256) and "simulated" in row.note


def test_start_run_refuses_cuda_where_there_is_none():
    from flowkv_utils.bench.timing import start_run

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="bench scale needs a CUDA device"):
        start_run("scale", None, None, "cuda", None)


@pytest.mark.parametrize("budget, n, want", [(0.05, 10000, 32), (0.01, 1000, 5), (1, 500, 1), ("full", 40, 20)])
def test_default_window_is_32_or_half_the_smallest_slot(budget, n, want):
    b = resolve_budget(budget, n, 3, 2)
    assert b.default_window() == want
