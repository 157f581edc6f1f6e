"""The benchmark harness: tidy rows with every column and the run's metadata, CSV files, the floor arithmetic,
structured columns (old stored tables load with them derived), and small end-to-end sweeps on CPU. Timings are
measured and printed, never asserted."""

from __future__ import annotations

import csv
import json

import pandas as pd
import pytest
import torch

from flowkv_utils import analysis, bench, models, results, sweep


def test_row_has_every_column_and_rejects_unknown_ones():
    rec = bench.recorder(None, "pytest", echo=False)
    r = rec.row("decode", policy="fullkv", decode_ms=1.0)
    assert list(r) == results.META + bench.SCHEMAS["decode"]
    assert r["command"] == "pytest" and r["torch"] == torch.__version__ and r["decode_ms"] == 1.0
    assert r["floor_ms"] is None
    with pytest.raises(ValueError, match="unknown column.*decode_msec"):
        rec.row("decode", decode_msec=1.0)
    with pytest.raises(ValueError, match="table='speed'"):
        rec.row("speed")


def test_recorder_writes_tidy_csv_and_meta(tmp_path):
    rec = bench.recorder(tmp_path, "pytest", echo=False)
    rec.add("load", what="warm", seconds=0.5)
    rec.add("load", what="cold", seconds=20.0, note="x")
    rec.save_meta(extra=1)
    rec.save_meta(more=2)
    rec.close()
    rows = list(csv.DictReader(open(tmp_path / "load.csv")))
    assert [r["what"] for r in rows] == ["warm", "cold"] and list(rows[0]) == results.META + bench.SCHEMAS["load"]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["extra"] == 1 and meta["more"] == 2 and meta["command"] == "pytest"
    assert len(rec.frame("load")) == 2
    assert list(bench.load_results(tmp_path)["load"].seconds) == [0.5, 20.0]


def test_weight_bytes_skip_the_untied_input_embedding():
    m = models.random_model("llama", layers=1, heads=2, kv_heads=1, head_dim=8, hidden=16, vocab=50)
    total = sum(p.numel() * p.element_size() for p in m.parameters())
    assert bench.weight_bytes(m) == total - 50 * 16 * 4
    m.lm_head.weight = m.model.embed_tokens.weight  # tied: read once, as the LM head
    assert bench.weight_bytes(m) == sum(p.numel() * p.element_size() for p in m.parameters())


def test_copy_bandwidth_is_positive():
    bw = bench.copy_bandwidth("cpu", nbytes=1 << 20, reps=2)
    assert bw["GBps"] > 0 and bw["bytes"] == 2 << 20


def test_context_sweep_rows_are_complete():
    m = models.random_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=64)
    rec = bench.context_sweep(m, [160], budget=48, steps=2, warmup=1, window=16, weights=bench.RANDOM_WEIGHTS,
                              reference_steps=1, bw={"bytes": 1, "ms": 1.0, "GBps": 10.0})
    dec, pre, sco = rec.frame("decode"), rec.frame("prefill"), rec.frame("scoring")
    assert list(dec.columns) == results.META + bench.SCHEMAS["decode"]
    assert set(dec.policy) == {"fullkv", "snapkv", "flowkv", "flowkv_global"}
    ctx = dec[dec.sweep == "context"]
    for col in ("decode_ms", "tokens_per_s", "kept_bytes", "allocated_bytes", "weight_bytes", "floor_ms",
                "floor_ratio", "bound_speedup", "device", "date", "decoder", "attention", "fused", "graph"):
        assert ctx[col].notna().all(), col
    assert set(ctx.decoder) == {"fast"} and set(ctx.attention) == {"torch"} and not ctx.graph.any()
    s = models.shape_of(m)
    full = ctx[ctx.policy == "fullkv"].iloc[0]
    assert full.kept_bytes == s.kv_bytes_per_token(4) * 160 == full.full_kv_bytes
    kept = ctx[ctx.policy != "fullkv"]
    assert (kept.kept_bytes == 48 * s.layers * s.kv_heads * s.head_dim * 2 * 4).all()  # every policy: same bytes
    assert (kept.allocated_bytes <= 1.05 * kept.kept_bytes).all()
    assert (ctx.floor_ms - 1e3 * (ctx.weight_bytes + ctx.kept_bytes) / 10e9).abs().max() < 1e-9
    assert set(sco.policy) == {"snapkv", "flowkv", "flowkv_global"} and (sco.fraction > 0).all()
    assert pre.iloc[0].policy == "flowkv_global" and pre.iloc[0].prefill_s > 0
    ref = dec[dec.impl == "reference-eager"]
    assert len(ref) == 1 and ref.iloc[0].decoder == "eager" and ref.iloc[0].attention == "reference"


@pytest.mark.model
def test_cli_policies_on_the_embedded_model(tmp_path, embedded):
    assert bench.main(["policies", "--n", "160", "--budget", "48", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "scoring.csv")))
    from flowkv_utils.policies import STUDY
    assert [r["policy"] for r in rows] == STUDY and {r["budget"] for r in rows} == {"48"}
    assert all(float(r["alloc_over_kept"]) <= 1.05 for r in rows)
    assert json.loads((tmp_path / "meta.json").read_text())["command"] == \
        f"python -m flowkv_utils.bench policies --n 160 --budget 48 --out {tmp_path}"


def test_stored_gpu_results_load_and_give_every_bar():
    res = bench.load_results(results.REPO / "results" / "gpu")
    for table in ("decode", "prefill", "scoring", "check", "bandwidth", "parts", "kernel"):
        assert list(res[table].columns) == results.META + bench.SCHEMAS[table], table
    assert res["meta"]["weights"] == bench.RANDOM_WEIGHTS and res["meta"]["bandwidth"]["GBps"] > 0
    b = analysis.bars(res)
    assert len(b) == 10 and b.value.notna().all()
    assert set(b.target) >= {f"≤ {analysis.THROUGHPUT_TARGETS.scoring_share:g}"}
    front = analysis.oom_frontier(res["prefill"], res["meta"]["gpu_total_bytes"])
    assert set(front) == {"fullkv", "flowkv_global"} and front["flowkv_global"] > front["fullkv"] > 204800
    assert all(res["check"].ok.isin(["True", "info"]))  # every judged check passed


def test_stored_gpu_results_written_before_the_structured_columns_get_them_derived():
    """The stored run predates the id/boolean columns; they are derived from its labels of that time."""
    res = bench.load_results(results.REPO / "results" / "gpu")
    parts = res["parts"]
    tuning = parts[parts.variant]
    assert tuning.part.str.startswith("score kernel ").sum() == 3 and tuning.best.sum() >= 1
    steps = parts[~parts.variant]
    assert not steps.part.str.contains("fastest settings").any() and steps.best.isna().all()
    assert set(steps[~steps.on_path].part) == {"flowkv score, PyTorch path"}
    ch = res["check"]
    assert set(ch.kind) == {"score_kernel", "split_kv", "decode_parity", "chunked_prefill"}
    assert set(ch[ch.kind == "split_kv"].impl) == {"torch", "triton"}
    d = res["decode"][res["decode"].status == "ok"]
    ref = d[(d.decoder == "eager") & (d.attention == "reference")]
    assert list(ref.impl) == ["reference-eager"]
    fast = d[d.decoder == "fast"]
    assert (fast.graph == fast.impl.str.endswith("+graph")).all() and fast.graph.any() and not fast.graph.all()


def test_load_results_names_the_command_when_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="bench gpu --out"):
        bench.load_results(tmp_path)


def test_cli_scoring_parts_and_slack_prefills_on_cpu(tmp_path):
    """`bench scoring` on the tiny shape: one row per scoring step, and one whole prefill per re-packing slack
    whose FlowKV global row carries that slack and keeps the same bytes whatever the slack."""
    assert bench.main(["scoring", "--shape", "tiny", "--contexts", "2048", "--slacks", "0", "0.5",
                       "--device", "cpu", "--out", str(tmp_path)]) == 0
    res = bench.load_results(tmp_path)
    parts = res["parts"]
    assert {"window attention (H, w, n), float32", "flowkv score, PyTorch path",
            "global cascade add + counts"} <= set(parts.part)
    assert (parts.ms_per_layer > 0).all() and not parts.variant.any()
    assert set(parts[~parts.on_path].part) == {"flowkv score, PyTorch path"}
    rows = res["scoring"][res["scoring"].policy == "flowkv_global"]
    assert list(rows.slack) == [0.0, 0.5] and rows.kept_bytes.nunique() == 1
    assert res["meta"]["score_config"] == {"tokens": 128, "cols": 128, "num_warps": 8, "num_stages": 2,
                                           "precision": "split"}


def test_cli_scoring_profile_names_the_compressor_ranges(tmp_path):
    """`bench scoring --profile N`: one profiled compressing prefill, its text beside the tables with the time of
    every named range of the compressor (selection per policy, the cascade, the re-packing, the packing)."""
    assert bench.main(["scoring", "--shape", "tiny", "--contexts", "1024", "--slacks", "--profile", "1024",
                       "--device", "cpu", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "profile_1024.txt").read_text()
    for name in ("flowkv select flowkv_global", "flowkv select snapkv", "flowkv cascade add",
                 "flowkv re-pack earlier layers", "flowkv pack layer"):
        ranges = [ln for ln in text.splitlines() if ln.lstrip().startswith(name + " ") and " host " in ln]
        assert len(ranges) == 1, name  # one line per range: host and device time together
    assert "n = 1024" in text and "scoring + selection, s: flowkv_global" in text
    assert "re-packs of earlier layers: " in text


def test_cli_profile_counts_every_projection_and_names_each_group(tmp_path):
    """`bench profile --device cpu` on the tiny shape (2 Llama layers): per budget one row per profiled name, the
    matmul group holding 7 projections per layer plus the LM head per step, its floor the weights over the copy
    bandwidth; the text beside the tables; a bad budget is refused naming what is allowed."""
    assert bench.main(["profile", "--shape", "tiny", "--context", "512", "--budgets", "full", "0.25", "--steps",
                       "2", "--device", "cpu", "--out", str(tmp_path)]) == 0
    res = bench.load_results(tmp_path)
    p = res["profile"]
    tiny = bench.shape_model("tiny", "cpu", 512, torch.float32)
    assert set(p.policy) == {"fullkv", "uniform"} and set(p["mode"]) == {"cpu"}
    bw = float(res["bandwidth"].GBps.iloc[0])
    for _, g in p.groupby("policy"):
        lin = g[g.kernel == "aten::linear"]
        assert len(lin) == 1 and lin.calls_per_step.iloc[0] == 2 * 7 + 1
        assert lin.group.iloc[0] == "matmul"
        assert lin.group_floor_us.iloc[0] == pytest.approx(1e6 * bench.weight_bytes(tiny) / (bw * 1e9), rel=1e-6)
        assert set(g.group) <= {name for name, _ in bench.timing.KERNEL_GROUPS} | {"other"}
    text = (tmp_path / "profile_decode.txt").read_text()
    assert "FullKV: step" in text and "every head 0.25 of the prompt: step" in text and "matmul" in text
    with pytest.raises(SystemExit):
        bench.main(["profile", "--budgets", "1.5", "--device", "cpu", "--out", str(tmp_path / "bad")])


def test_kernel_groups_of_typical_decode_kernels():
    """The names a CUDA decode step's kernels carry fall into their parts of the step."""
    g = bench.timing.kernel_group
    assert g("split_kernel") == g("combine_kernel") == "attention (split-KV)"
    assert g("nvjet_tst_64x8_64x16_4x1_v_bz_TNT") == g("void cutlass::Kernel2<cutlass_80_wmma>") == "matmul"
    assert g("triton_poi_fused_add_mul_0") == "compiled elementwise"
    assert g("Memcpy DtoD (Device -> Device)") == "copies and fills"
    assert g("void at::native::vectorized_elementwise_kernel<4>") == "other"
    # the batch-1 projection kernels (kernels.gemv) are products, whatever else they fuse in
    assert g("qkv_rope_kernel") == g("gate_up_silu_kernel") == g("residual_kernel") == "matmul"


def test_cli_gemv_refuses_a_device_without_triton_kernels(tmp_path):
    """`bench gemv` times Triton kernels on CUDA: on the CPU it stops at once, naming the device."""
    with pytest.raises(SystemExit, match="needs CUDA and triton.*'cpu'"):
        bench.main(["gemv", "--device", "cpu", "--out", str(tmp_path)])


def test_gpu_dry_run_on_cpu(tmp_path):
    """`bench gpu --device cpu` on the tiny shape: every sweep, the structured columns filled, the launch settings
    in meta.json, and the tables load back."""
    assert bench.main(["gpu", "--device", "cpu", "--shape", "tiny", "--contexts", "1024", "--budgets", "0.05",
                       "0.1", "--steps", "2", "--max-batch", "2", "--out", str(tmp_path)]) == 0
    res = bench.load_results(tmp_path)
    d = res["decode"]
    assert {"real", "context", "budget", "impl", "layout", "batch", "maxbatch"} <= set(d.sweep)
    assert d.decoder.isin(["fast", "eager"]).all() and d.fused.notna().all() and d.graph.notna().all()
    assert set(d[d.decoder == "eager"].attention) == {"reference", "torch"}
    assert res["check"].ok.isin(["True"]).all() and set(res["check"].kind) == {"split_kv", "decode_parity",
                                                                                "chunked_prefill"}
    assert res["meta"]["kernel_config"]["block"] > 0 and res["meta"]["score_config"]["tokens"] > 0
    assert set(res["prefill"].policy) == {"fullkv", "flowkv_global"}


def test_cli_eval_on_cpu_agrees_with_the_reference_path(tmp_path, embedded):
    """`bench eval` on a short prompt: the fast batched path and the reference path give the same predictions on
    the check sample (float32), and the rows say where the time went."""
    assert bench.main(["eval", "--model-path", "embedded", "--device", "cpu", "--dtype", "float32", "--context", "160",
                       "--instances", "1", "--budgets", "0.5", "--policies", "fullkv", "snapkv", "criticalkv", "lava",
                       "smoothevict", "--out", str(tmp_path), "--table",
                       str(tmp_path / "sweep.csv")]) == 0
    rows = pd.read_csv(tmp_path / "eval.csv")
    fast = rows[rows.path == "fast"].iloc[0]
    assert fast.points == fast.check_points and fast.check_same_predictions == fast.check_points
    assert pd.isna(fast.check_differs) or fast.check_differs == ""
    assert {"prefill_s", "select_s", "decode_s", "fidelity_s"} <= set(rows.columns)
    assert len(sweep.load_results(tmp_path / "sweep.csv")) > 0


def test_greedy_margins_are_the_reference_answers_top2_gaps(embedded):
    """The near-tie diagnostic of `bench eval`: the smallest top-2 logit gap along the reference path's own answer."""
    from flowkv_utils.bench.evaluation import greedy_margins
    from flowkv_utils.tasks import niah

    model, tok = embedded
    inst = niah.niah(tok, [160], [0.5], seed=0)[0]
    (m, i), = greedy_margins(model, tok, inst, [("snapkv", "0.5")])
    assert m >= 0 and 0 <= i <= inst.max_new_tokens
    assert greedy_margins(model, tok, inst, []) == []


def test_gpu_dry_run_decodes_the_chosen_policies_at_equal_bytes(tmp_path):
    """`bench gpu --policies`: each chosen policy gets decode rows, and at one budget every compressing policy
    keeps exactly the same bytes (only which entries differ)."""
    pol = ["fullkv", "streamingllm", "adakv", "flowkv_global"]
    assert bench.main(["gpu", "--device", "cpu", "--shape", "tiny", "--contexts", "1024", "--budgets", "0.05",
                       "--steps", "2", "--quick", "--no-checks", "--policies", *pol, "--out", str(tmp_path)]) == 0
    d = bench.load_results(tmp_path)["decode"]
    ctx = d[(d.sweep == "context") & (d.status == "ok")]
    assert set(ctx.policy) == {*pol, "quest"}
    kept = ctx[~ctx.policy.isin(["fullkv", "quest"])].kept_bytes
    full, quest = (ctx[ctx.policy == p].iloc[0] for p in ("fullkv", "quest"))
    assert kept.nunique() == 1 and kept.iloc[0] < full.kept_bytes
    # block-sparse holds the whole cache but reads less of it: its floor is below FullKV's, its memory is not
    assert quest.kept_bytes == full.kept_bytes and quest.floor_ms < full.floor_ms
    assert quest.layout == "pages16" and quest.impl.endswith("+pages16")


def test_git_metadata_can_be_given_where_the_checkout_cannot_say(monkeypatch):
    monkeypatch.setenv("FLOWKV_GIT", "abc1234")
    assert results.environment("cmd")["git"] == "abc1234"
    monkeypatch.delenv("FLOWKV_GIT")
    assert results.environment("cmd")["git"] != "abc1234"


def test_gpu_sweep_refuses_a_bad_page_size_before_measuring(tmp_path):
    with pytest.raises(ValueError, match="page=0"):
        bench.gpu_sweep(tmp_path, shape="tiny", contexts=(256,), device="cpu", pages=(16, 0))
    assert not (tmp_path / "decode.csv").exists()


def test_matmul_rate_is_positive_and_recorded_by_every_gpu_sweep(tmp_path):
    r = bench.timing.matmul_rate("cpu", n=128)
    assert r["TFLOPs"] > 0 and r["n"] == 128 and r["dtype"] == "float32"
    bench.scale.scale_sweep(tmp_path, shape="tiny", weights=("bf16",), contexts=(256,), budgets=(0.1,),
                            prefill_contexts=(), steps=1, warmup=1, frontier_start=256, max_batch=1,
                            parts=("decode",), device="cpu").close()
    c = bench.load_results(tmp_path)["compute"]
    assert len(c) == 1 and c.TFLOPs.iloc[0] > 0


def test_prefill_warmup_records_only_the_last_prefill():
    """`prefill_context(warmup=1)` runs the same compressing prefill twice and records the second alone, saying so;
    its cache and counts are the ones a single prefill gives."""
    from flowkv_utils.bench.prefill import prefill_context
    tiny = bench.shape_model("tiny", "cpu", 512, torch.float32)
    rec = bench.recorder(None, "pytest", echo=False)
    one = prefill_context(rec, tiny, 256, weights=bench.RANDOM_WEIGHTS, budget=0.25, chunk=None)
    two = prefill_context(rec, tiny, 256, weights=bench.RANDOM_WEIGHTS, budget=0.25, chunk=None, warmup=1)
    rows = rec.rows["prefill"]
    assert len(rows) == 2 and "untimed" not in rows[0]["note"] and "after 1 untimed prefill" in rows[1]["note"]
    assert len(rec.rows["scoring"]) == 2 * len(one.names)
    assert torch.equal(one.counts["flowkv_global"], two.counts["flowkv_global"])
    for a, b in zip(one.cache(4).layers, two.cache(4).layers, strict=True):
        assert torch.equal(a.offsets, b.offsets) and torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
