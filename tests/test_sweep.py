"""The resumable sweep: plan, tidy rows, FullKV at "full", resume keys (only rows of the same settings are reused),
`fresh` (moves aside, never deletes), foreign files refused untouched, one writer per table, determinism, crash
safety (kill -9 mid-sweep and resume; a property test interleaving kills, changed settings and concurrent starts),
and the notebook summaries. A random-weight model and tiny prompts keep it fast."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowkv_utils import analysis, sweep
from flowkv_utils.policies import STUDY
from flowkv_utils.results import TableError, TableFile

ROWS = 1 + len(sweep.FIDELITY)  # rows of one point with fidelity on: the task metric and each fidelity metric

SETUP = textwrap.dedent("""
    import torch
    from flowkv_utils.models import random_model
    from flowkv_utils.tasks import TaskInstance

    MODEL = random_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8, vocab=128, seed=0)
    g = torch.Generator().manual_seed(0)
    INSTANCES = []
    for i in range(3):
        ids = torch.randint(0, 128, (1, 40 + 8 * i), generator=g)
        INSTANCES.append(TaskInstance("tiny", f"i{i}", ids, [str(int(ids[0, 5]))], 4, "contains"))
    BUDGETS = [12, 24, "full"]
    """)
RUN = SETUP + textwrap.dedent("""
    import os, signal, sys
    from flowkv_utils import sweep
    torch.set_num_threads(1)  # as in this test module
    from flowkv_utils.policies import STUDY
    kill_after = int(sys.argv[2])
    rows = []
    def on_row(row):
        rows.append(row)
        if kill_after and len(rows) >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    sweep.run_sweep(MODEL, None, INSTANCES, STUDY, BUDGETS, sys.argv[1], seed=0, window=8, progress=False,
                    on_row=on_row)
    """)


def _ns():
    ns: dict = {}
    exec(SETUP, ns)
    return ns


# every sweep here (in this process and in the subprocesses) runs on one thread, so tables compare exactly
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(one_thread):
    return _ns()


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """An uninterrupted sweep of the tiny setup."""
    path = tmp_path_factory.mktemp("ref") / "ref.csv"
    df = sweep.run_sweep(tiny["MODEL"], None, tiny["INSTANCES"], STUDY, tiny["BUDGETS"], path, seed=0, window=8,
                         progress=False)
    return path, df


def _without_timing(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=sweep.TIMING).sort_values(sweep.KEY).reset_index(drop=True)


def test_plan_and_budget_errors():
    pts = sweep.plan(["fullkv", "snapkv"], [64, "full"])
    assert pts == [("fullkv", "full"), ("snapkv", 64), ("snapkv", "full")]
    assert sweep.plan(["snapkv"], [0.05, "128"]) == [("snapkv", 0.05), ("snapkv", 128)]  # one budget type
    with pytest.raises(ValueError, match="unknown policy"):
        sweep.plan(["nope"], [64])
    for bad in (0, -5, 1.5, "half", True):
        with pytest.raises(ValueError, match="budget"):
            sweep.plan(["snapkv"], [bad])
    with pytest.raises(TypeError, match="list of budgets"):
        sweep.plan(["snapkv"], "notalist")
    with pytest.raises(ValueError, match="twice"):
        sweep.plan(["snapkv"], [128, "128"])


def test_budgets_that_cannot_hold_the_window_fail_before_anything_runs(tiny, tmp_path):
    path = tmp_path / "w.csv"
    with pytest.raises(ValueError, match=r"instance tiny/i0 \(40 tokens\), budget 0.1: snapkv: budget of 4 tokens"):
        sweep.run_sweep(tiny["MODEL"], None, tiny["INSTANCES"], ["snapkv"], [0.5, 0.1], path, window=8,
                        progress=False)
    assert not path.exists()


def test_rows_are_tidy_and_consistent(tiny, reference):
    _, df = reference
    n_points = len(tiny["INSTANCES"]) * len(sweep.plan(STUDY, tiny["BUDGETS"]))
    assert list(df.columns) == sweep.COLUMNS
    assert len(df) == (1 + len(sweep.FIDELITY)) * n_points and not df.duplicated(sweep.KEY).any()
    assert set(df.metric) == {"contains", "attn_rel_err", "attn_rel_err_heldout", "kl_next_token"}
    assert set(df[df.policy == "fullkv"].budget) == {"full"}
    L, G, d = 2, 2, 8
    full = df[df.budget == "full"]
    assert (full.kept_entries == L * G * full.context_tokens).all() and (full.budget_fraction == 1.0).all()
    # at "full" every policy is FullKV: same prediction and score as the fullkv row
    acc = full[full.metric == "contains"].groupby("instance").agg(v=("value", "nunique"), p=("prediction", "nunique"))
    assert (acc.v == 1).all() and (acc.p == 1).all()
    part = df[df.budget != "full"]
    assert (part.kept_entries == part.budget.astype(int) * L * G).all()  # every policy spends the budget
    assert (df.budget_bytes == df.kept_entries * 2 * d * 4).all()  # K and V, float32
    assert (part[part.metric == "attn_rel_err"].value > 0).all()
    assert (part[part.metric == "attn_rel_err_heldout"].value > 0).all()
    assert (df.seed == 0).all() and df.versions.str.startswith("torch ").all()
    assert df.model_sha.nunique() == 1 and df.instance_sha.nunique() == 3 and (df.window == 8).all()
    c = analysis.claims(df)
    assert set(c["fidelity_leader"]) == set(sweep.FIDELITY) and len(c["fidelity_leader"]["kl_next_token"]) == 2


def test_rerun_skips_finished_points(tiny, reference, tmp_path):
    path = tmp_path / "r.csv"
    path.write_bytes(reference[0].read_bytes())
    calls = []
    sweep.run_sweep(tiny["MODEL"], None, tiny["INSTANCES"], STUDY, tiny["BUDGETS"], path, seed=0, window=8,
                    progress=False, on_row=calls.append)
    assert calls == [] and path.read_bytes() == reference[0].read_bytes()
    # a new budget only runs the new points
    sweep.run_sweep(tiny["MODEL"], None, tiny["INSTANCES"][:1], ["snapkv"], [16], path, seed=0, window=8,
                    progress=False, on_row=calls.append)
    assert len(calls) == 1 + len(sweep.FIDELITY) and {c["budget"] for c in calls} == {"16"}


def test_resume_key_includes_every_setting(tiny, reference, tmp_path):
    """A rerun with another seed, window, policy parameter, fidelity setting, model or instance computes new rows;
    the table then holds both runs, and run_sweep returns only the requested one."""
    path = tmp_path / "k.csv"
    path.write_bytes(reference[0].read_bytes())
    insts, model = tiny["INSTANCES"][:1], tiny["MODEL"]
    base = dict(seed=0, window=8, progress=False)
    n = lambda **kw: _count_rows(model, insts, path, **{**base, **kw})
    assert n() == 0
    assert n(seed=1) == ROWS * 2  # snapkv at 12 and "full" (fullkv is not in this run's policies)
    assert n(seed=1) == 0  # and reused next time
    assert n(window=4) == ROWS * 2
    assert n(policy_params={"snapkv": {"kernel": 3}}) == ROWS * 2
    assert n(kl_tokens=4) == ROWS * 2
    assert n(fidelity=False) == 2
    from flowkv_utils.models import random_model
    other = random_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8, vocab=128, seed=7)
    assert _count_rows(other, insts, path, **base) == ROWS * 2
    import torch

    from flowkv_utils.tasks import TaskInstance
    i0 = insts[0]
    changed = TaskInstance(i0.task, i0.instance, torch.roll(i0.prompt_ids, 1, -1), i0.references, 4, "contains")
    assert _count_rows(model, [changed], path, **base) == ROWS * 2  # same id, other prompt: other instance_sha
    df = sweep.run_sweep(model, None, insts, ["snapkv"], [12, "full"], path, seed=1, window=8, progress=False)
    assert (df.seed == 1).all() and len(df) == ROWS * 2  # the summary of the seed-1 run holds seed-1 rows only
    whole = sweep.load_results(path)
    assert set(whole.seed) == {0, 1}
    with pytest.raises(ValueError, match="different runs.*seed"):
        analysis.accuracy_table(whole[whole.policy == "snapkv"])
    analysis.accuracy_table(df)  # one run: fine


def _count_rows(model, insts, path, **kw) -> int:
    calls = []
    sweep.run_sweep(model, None, insts, ["snapkv"], [12, "full"], path, on_row=calls.append, **kw)
    return len(calls)


def test_fresh_moves_aside_and_is_a_real_boolean(tiny, reference, tmp_path, capsys):
    path = tmp_path / "f.csv"
    data = reference[0].read_bytes()
    path.write_bytes(data)
    for bad in ("nope", "true", 1):
        with pytest.raises(TypeError, match="fresh"):
            sweep.run_sweep(tiny["MODEL"], None, tiny["INSTANCES"][:1], ["snapkv"], [12], path, window=8,
                            progress=False, fresh=bad)
    assert path.read_bytes() == data  # nothing touched by a rejected request
    sweep.run_sweep(tiny["MODEL"], None, tiny["INSTANCES"][:1], ["snapkv"], [12], path, window=8, progress=False,
                    fresh=True)
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("f.") and p.name.endswith(".old.csv")]
    assert len(moved) == 1 and moved[0].read_bytes() == data and str(moved[0]) in capsys.readouterr().out
    assert len(sweep.load_results(path)) == ROWS


@pytest.mark.parametrize("content, match", [
    (b"just some text without a newline", "no complete header"),
    (b"a,b,c\n1,2,3\n4,5", "columns are"),
    (b"\xff\xfe\x00garbage\n", "not UTF-8"),
])
def test_foreign_file_is_refused_untouched(tiny, tmp_path, content, match):
    path = tmp_path / "foreign.csv"
    path.write_bytes(content)
    with pytest.raises(TableError, match=match) as e:
        sweep.run_sweep(tiny["MODEL"], None, tiny["INSTANCES"][:1], ["snapkv"], [12], path, window=8,
                        progress=False)
    assert str(path) in str(e.value) and path.read_bytes() == content
    assert not path.with_name(path.name + ".lock").exists()


def test_bad_values_name_file_line_and_column(reference, tmp_path):
    lines = reference[0].read_text().split("\n")
    cols = lines[0].split(",")
    path = tmp_path / "bad.csv"
    row = next(__import__("csv").reader([lines[3]]))
    row[cols.index("value")] = "zero"
    import csv
    import io
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(row)
    path.write_text("\n".join(lines[:3]) + "\n" + buf.getvalue())
    with pytest.raises(TableError, match=r"bad.csv, line 4, column 'value': 'zero' is not a number"):
        sweep.load_results(path)


def test_duplicate_keys_are_an_error_on_load(reference, tmp_path):
    lines = reference[0].read_text().split("\n")
    path = tmp_path / "dup.csv"
    path.write_text("\n".join(lines[:3] + [lines[2]]) + "\n")
    with pytest.raises(TableError, match="share a key.*two processes"):
        sweep.load_results(path)


def test_lock_one_writer_at_a_time(tiny, tmp_path):
    path = tmp_path / "l.csv"
    holder = TableFile(path, sweep.COLUMNS)
    try:
        with pytest.raises(TableError, match=f"another writer holds it \\(process {os.getpid()}"):
            sweep.run_sweep(tiny["MODEL"], None, tiny["INSTANCES"][:1], ["snapkv"], [12], path, window=8,
                            progress=False)
    finally:
        holder.close()
    # a lock left by a dead process is taken over, with a warning
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket
    path.with_name("l.csv.lock").write_text(f"{dead.stdout.strip()} {socket.gethostname()}\n")
    with pytest.warns(UserWarning, match="stale lock"):
        sweep.run_sweep(tiny["MODEL"], None, tiny["INSTANCES"][:1], ["snapkv"], [12], path, window=8,
                        progress=False)
    assert not path.with_name("l.csv.lock").exists() and len(sweep.load_results(path)) == ROWS


class _Killed(Exception):
    pass


PROP = (["fullkv", "snapkv", "flowkv"], [12, "full"])  # a smaller grid keeps the property test fast


@pytest.fixture(scope="module")
def prop_reference(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("propref") / "ref.csv"
    return sweep.run_sweep(tiny["MODEL"], None, tiny["INSTANCES"][:2], *PROP, path, seed=0, window=8, progress=False)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(st.tuples(st.sampled_from(["kill", "seed1", "concurrent", "run"]), st.integers(1, 12)),
                    min_size=1, max_size=4))
def test_interleaved_kills_reruns_and_concurrent_starts(tiny, prop_reference, tmp_path_factory, ops):
    """Any interleaving of killed runs (torn last line), reruns with changed settings and refused concurrent starts
    ends, after one final uninterrupted run, at the uninterrupted run's rows (the other settings' rows beside them)."""
    path = tmp_path_factory.mktemp("prop") / "p.csv"
    args = (tiny["MODEL"], None, tiny["INSTANCES"][:2], *PROP, path)
    for op, k in ops:
        if op == "kill":
            rows = []

            def on_row(r, rows=rows, k=k):
                rows.append(r)
                if len(rows) >= k:
                    raise _Killed
            try:
                sweep.run_sweep(*args, seed=0, window=8, progress=False, on_row=on_row)
            except _Killed:
                with open(path, "ab") as f:
                    f.write(b"random-llama,0123,tin")  # torn write
        elif op == "seed1":
            sweep.run_sweep(tiny["MODEL"], None, tiny["INSTANCES"][:1], ["snapkv"], [12], path, seed=1, window=8,
                            progress=False)
        elif op == "concurrent":
            holder = TableFile(path, sweep.COLUMNS)
            try:
                with pytest.raises(TableError, match="another writer"):
                    sweep.run_sweep(*args, seed=0, window=8, progress=False)
            finally:
                holder.close()
        else:
            sweep.run_sweep(*args, seed=0, window=8, progress=False)
    final = sweep.run_sweep(*args, seed=0, window=8, progress=False)
    pd.testing.assert_frame_equal(_without_timing(prop_reference), _without_timing(final))


def test_same_seed_same_table(tiny, reference, tmp_path):
    df2 = sweep.run_sweep(tiny["MODEL"], None, tiny["INSTANCES"], STUDY, tiny["BUDGETS"], tmp_path / "b.csv",
                          seed=0, window=8, progress=False)
    pd.testing.assert_frame_equal(_without_timing(reference[1]), _without_timing(df2))


def test_phase_timings_account_for_the_run(tiny, tmp_path):
    """`df.attrs["phases"]`: seconds per phase of this call's new points (all phases, none negative); a rerun that
    reuses every row spends nothing in any phase."""
    args = (tiny["MODEL"], None, tiny["INSTANCES"][:1], ["fullkv", "snapkv"], [12, "full"], tmp_path / "t.csv")
    first = sweep.run_sweep(*args, window=8, progress=False).attrs["phases"]
    assert list(first) == list(sweep.PHASES) and all(v >= 0 for v in first.values()) and first["prefill"] > 0
    again = sweep.run_sweep(*args, window=8, progress=False).attrs["phases"]
    assert all(v == 0 for v in again.values())


def test_partial_last_line_is_dropped(tiny, reference, tmp_path):
    path = tmp_path / "p.csv"
    data = reference[0].read_bytes()
    lines = data.split(b"\n")
    path.write_bytes(b"\n".join(lines[:10]) + b"\n" + lines[10][:25])  # a torn write
    assert len(sweep.load_results(path)) == 9
    sweep.run_sweep(tiny["MODEL"], None, tiny["INSTANCES"], STUDY, tiny["BUDGETS"], path, seed=0, window=8,
                    progress=False)
    pd.testing.assert_frame_equal(_without_timing(reference[1]), _without_timing(sweep.load_results(path)))
    assert sweep.load_results(tmp_path / "missing.csv").columns.tolist() == sweep.COLUMNS


def test_kill_and_resume(reference, tmp_path):
    """SIGKILL a sweep process after 40 rows were reported, tear its last line, resume: same table as an
    uninterrupted run. Rows are written an instance at a time, so the killed table holds whole instances."""
    script = tmp_path / "run.py"
    script.write_text(RUN)
    path = tmp_path / "k.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, str(script), str(path), "40"], env=env, capture_output=True, text=True)
    assert first.returncode == -9, first.stderr[-2000:]
    killed = sweep.load_results(path)
    per_instance = reference[1].groupby("instance", sort=False).size()
    assert len(killed) == per_instance.iloc[0] and len(killed) >= 40
    with open(path, "ab") as f:
        f.write(b"random-llama,tiny,i1,48,snap")  # as if killed in the middle of a write
    second = subprocess.run([sys.executable, str(script), str(path), "0"], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]  # the dead process's lock is stale: taken over
    resumed = sweep.load_results(path)
    pd.testing.assert_frame_equal(_without_timing(resumed.iloc[:len(killed)]), _without_timing(killed))
    pd.testing.assert_frame_equal(_without_timing(reference[1]), _without_timing(resumed))


# -------------------------------------------------------------------------------------------------- summaries


def _frame(acc: dict[str, dict], full: float = 1.0) -> pd.DataFrame:
    """A hand-made results table: acc[policy][budget] = score, one task, one instance."""
    rows = [dict(model="m", task="t", instance="0", context_tokens=1000, policy="fullkv", budget="full",
                 budget_fraction=1.0, kept_entries=1000, budget_bytes=4096, metric="contains", value=full)]
    for p, by in acc.items():
        for b, v in by.items():
            rows.append(dict(rows[0], policy=p, budget=str(b), kept_entries=b, budget_bytes=4 * b, value=v))
    return pd.DataFrame(rows)


def test_auc_and_accuracy_table_hand():
    df = _frame({"flowkv": {64: 0.0, 128: 1.0, 256: 1.0}, "snapkv": {64: 0.0, 128: 0.0, 256: 1.0}})
    auc = analysis.auc_table(df)
    # log2 budgets 6, 7, 8: trapezoids (0+1)/2 + (1+1)/2 over a range of 2 → 0.75; snapkv (0 + 0.5)/2 = 0.25
    assert auc.loc["flowkv", "t"] == pytest.approx(0.75) and auc.loc["snapkv", "average"] == pytest.approx(0.25)
    assert auc.loc["flowkv", "relative"] == pytest.approx(0.75)
    acc = analysis.accuracy_table(df)
    assert set(acc.task) == {"t", "average"} and math.isinf(acc[acc.policy == "fullkv"].budget.iloc[0])
    assert analysis.fullkv_accuracy(df).to_dict() == {"t": 1.0}


def test_claims_hand():
    df = _frame({"flowkv": {64: 0.5, 128: 1.0, 256: 1.0}, "snapkv": {64: 0.0, 128: 0.5, 256: 1.0},
                 "adakv": {64: 0.25, 128: 0.5, 256: 0.75}})
    c = analysis.claims(df)
    assert c["baselines"] == ["snapkv", "adakv"] and c["budgets"] == [64, 128, 256]
    assert c["advantage"] == pytest.approx([0.25, 0.5, 0.0])
    assert (c["wins"], c["ties"], c["losses"], c["cells"]) == (2, 1, 0, 3)
    assert c["fidelity_leader"] == {}
    assert c["loss_flowkv_smallest"] == pytest.approx(0.5) and c["loss_baseline_smallest"] == pytest.approx(0.75)
    assert c["loss_ratio_smallest"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="claims need"):
        analysis.claims(df, flowkv="flowkv_global")


def test_bootstrap_interval_properties():
    """Percentile bootstrap of the mean: contains the mean, zero width for constant data, ≈ the normal-theory width
    for many Bernoulli(0.5) values, stratified groups weigh each group's mean equally, reproducible."""
    assert analysis.bootstrap_mean_ci([np.ones(7)]) == (1.0, 1.0)
    x = np.random.default_rng(1).integers(0, 2, size=400).astype(float)
    lo, hi = analysis.bootstrap_mean_ci([x])
    assert lo < x.mean() < hi and (hi - lo) == pytest.approx(2 * 1.96 * 0.5 / np.sqrt(400), rel=0.15)
    assert analysis.bootstrap_mean_ci([x]) == (lo, hi)
    lo2, hi2 = analysis.bootstrap_mean_ci([np.zeros(3), np.ones(300)])  # two tasks: the average is 0.5 exactly
    assert (lo2, hi2) == (0.5, 0.5)
    with pytest.raises(ValueError, match="level"):
        analysis.bootstrap_mean_ci([x], level=95)


def test_paired_difference_and_claim_intervals():
    """Paired over instances: a constant per-instance advantage has a zero-width interval; noise around a positive
    advantage gives an interval above 0 that the claims count as a significant cell."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        base = float(rng.integers(0, 2))
        for p, v in (("flowkv", min(1.0, base + 0.5)), ("snapkv", base), ("adakv", base * 0.5)):
            rows.append(dict(model="m", task="t", instance=str(i), context_tokens=1000, policy=p, budget="64",
                             budget_fraction=0.1, kept_entries=64, budget_bytes=256, metric="contains", value=v))
        rows.append(dict(rows[-1], policy="fullkv", budget="full", value=1.0))
    df = pd.DataFrame(rows)
    d = analysis.paired_difference(df, "flowkv", ["snapkv", "adakv"], 64)
    assert d["other"] == "snapkv" and d["n"] == 60 and d["low"] > 0 and d["low"] <= d["diff"] <= d["high"]
    c = analysis.claims(df)
    assert c["advantage_low"][0] == pytest.approx(d["low"]) and c["cells_significantly_above"] == 1
    acc = analysis.accuracy_table(df, ci=True)
    row = acc[(acc.task == "t") & (acc.policy == "snapkv")].iloc[0]
    assert row.low <= row.value <= row.high


def test_head_to_head_is_paired_difference_per_baseline_and_budget():
    """One row per (baseline, budget) with paired_difference's numbers; swapping the two policies negates the
    difference and mirrors the interval; the verdict follows the interval; an absent policy raises naming it."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(40):
        base = float(rng.integers(0, 2))
        for b, frac in (("64", 0.1), ("128", 0.2)):
            for p, v in (("flowkv", min(1.0, base + 0.5)), ("snapkv", base), ("adakv", 1.0 - base)):
                rows.append(dict(model="m", task="t", instance=str(i), context_tokens=1000, policy=p, budget=b,
                                 budget_fraction=frac, kept_entries=int(b), budget_bytes=4 * int(b),
                                 metric="contains", value=v))
        rows.append(dict(rows[-1], policy="fullkv", budget="full", value=1.0))
    df = pd.DataFrame(rows)
    h = analysis.head_to_head(df, "flowkv", ["snapkv", "adakv", "tova"])
    assert list(zip(h.other, h.budget, strict=True)) == [("snapkv", 64), ("snapkv", 128), ("adakv", 64), ("adakv", 128)]
    for r in h.itertuples():
        d = analysis.paired_difference(df, "flowkv", r.other, r.budget)
        assert (r.diff, r.low, r.high, r.n) == pytest.approx((d["diff"], d["low"], d["high"], d["n"]))
        assert r.verdict == ("above" if r.low > 0 else "below" if r.high < 0 else "tie")
    assert set(h[h.other == "snapkv"].verdict) == {"above"}
    back = analysis.head_to_head(df, "snapkv", ["flowkv"])
    assert back["diff"].to_numpy() == pytest.approx(-h[h.other == "snapkv"]["diff"].to_numpy())
    with pytest.raises(ValueError, match="'pyramidkv'"):
        analysis.head_to_head(df, "pyramidkv")


def test_a_gzipped_table_loads_the_same_and_is_read_only(reference, tmp_path):
    """Stored study tables are kept gzip-compressed in the repository: they load like the CSV; writing to one, or
    loading a .gz that is not gzip, fails naming the file."""
    import gzip

    src, df = reference
    gz = tmp_path / "r.csv.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    pd.testing.assert_frame_equal(sweep.load_results(gz), sweep.load_results(src))
    with pytest.raises(TableError, match="r.csv.gz: a compressed table is a read-only archive"):
        TableFile(gz, sweep.COLUMNS)
    bad = tmp_path / "bad.csv.gz"
    bad.write_bytes(src.read_bytes())
    with pytest.raises(TableError, match="bad.csv.gz: not a gzip-compressed table"):
        sweep.load_results(bad)


def test_a_table_from_before_the_heldout_metric_resumes_as_it_is(tiny, reference, tmp_path):
    """Stored tables predating `attn_rel_err_heldout` (sweep.ADDED_LATER) resume without recomputing their points;
    a point missing one of the older metrics is recomputed."""
    src, df = reference
    old = df[df.metric != "attn_rel_err_heldout"]
    path = tmp_path / "old.csv"
    _write(path, old)
    calls = []
    sweep.run_sweep(tiny["MODEL"], None, tiny["INSTANCES"], STUDY, tiny["BUDGETS"], path, seed=0, window=8,
                    progress=False, on_row=calls.append)
    assert calls == [] and len(sweep.load_results(path)) == len(old)
    gone = old[~((old.policy == "snapkv") & (old.budget == "12") & (old.metric == "kl_next_token"))]
    path2 = tmp_path / "gone.csv"
    _write(path2, gone)
    sweep.run_sweep(tiny["MODEL"], None, tiny["INSTANCES"], STUDY, tiny["BUDGETS"], path2, seed=0, window=8,
                    progress=False, on_row=calls.append)
    assert {(c["policy"], c["budget"]) for c in calls} == {("snapkv", "12")}


def _write(path, rows: pd.DataFrame) -> None:
    out = TableFile(path, sweep.COLUMNS)
    try:
        out.write_many(rows.to_dict("records"))
    finally:
        out.close()
