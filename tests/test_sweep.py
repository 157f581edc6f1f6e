"""The resumable sweep: plan, tidy rows, FullKV at "full", skipping finished keys, determinism, crash safety
(kill -9 mid-sweep and resume), and the notebook summaries. A random-weight model and tiny prompts keep it fast."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from flowkv_utils import sweep
from flowkv_utils.policies import STUDY

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
    with pytest.raises(ValueError, match="unknown policy"):
        sweep.plan(["nope"], [64])
    for bad in (0, -5, 0.5, "half", True):
        with pytest.raises(ValueError, match="budget"):
            sweep.plan(["snapkv"], [bad])


def test_rows_are_tidy_and_consistent(tiny, reference):
    _, df = reference
    n_points = len(tiny["INSTANCES"]) * len(sweep.plan(STUDY, tiny["BUDGETS"]))
    assert list(df.columns) == sweep.COLUMNS
    assert len(df) == 3 * n_points and not df.duplicated(sweep.KEY).any()
    assert set(df.metric) == {"contains", "attn_rel_err", "kl_next_token"}
    assert set(df[df.policy == "fullkv"].budget_tokens) == {"full"}
    L, G, d = 2, 2, 8
    full = df[df.budget_tokens == "full"]
    assert (full.kept_entries == L * G * full.context_tokens).all() and (full.budget_fraction == 1.0).all()
    # at "full" every policy is FullKV: same prediction and score as the fullkv row
    acc = full[full.metric == "contains"].groupby("instance").agg(v=("value", "nunique"), p=("prediction", "nunique"))
    assert (acc.v == 1).all() and (acc.p == 1).all()
    part = df[df.budget_tokens != "full"]
    assert (part.kept_entries == part.budget_tokens.astype(int) * L * G).all()  # every policy spends the budget
    assert (df.budget_bytes == df.kept_entries * 2 * d * 4).all()  # K and V, float32
    assert (part[part.metric == "attn_rel_err"].value > 0).all()
    assert (df.seed == 0).all() and df.versions.str.startswith("torch ").all()
    c = sweep.claims(df)
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
    assert len(calls) == 3 and {c["budget_tokens"] for c in calls} == {"16"}


def test_same_seed_same_table(tiny, reference, tmp_path):
    df2 = sweep.run_sweep(tiny["MODEL"], None, tiny["INSTANCES"], STUDY, tiny["BUDGETS"], tmp_path / "b.csv",
                          seed=0, window=8, progress=False)
    pd.testing.assert_frame_equal(_without_timing(reference[1]), _without_timing(df2))


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
    """SIGKILL a sweep process after 40 rows, tear its last line, resume: same table as an uninterrupted run."""
    script = tmp_path / "run.py"
    script.write_text(RUN)
    path = tmp_path / "k.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, str(script), str(path), "40"], env=env, capture_output=True, text=True)
    assert first.returncode == -9, first.stderr[-2000:]
    killed = sweep.load_results(path)
    assert len(killed) == 40
    with open(path, "ab") as f:
        f.write(b"random-llama,tiny,i1,48,snap")  # as if killed in the middle of a write
    second = subprocess.run([sys.executable, str(script), str(path), "0"], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    resumed = sweep.load_results(path)
    pd.testing.assert_frame_equal(_without_timing(resumed.iloc[:40]), _without_timing(killed))
    pd.testing.assert_frame_equal(_without_timing(reference[1]), _without_timing(resumed))


def test_wrong_header_is_an_error(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="columns"):
        sweep.ResultsFile(p)


# -------------------------------------------------------------------------------------------------- summaries


def _frame(acc: dict[str, dict], full: float = 1.0) -> pd.DataFrame:
    """A hand-made results table: acc[policy][budget] = score, one task, one instance."""
    rows = [dict(model="m", task="t", instance="0", context_tokens=1000, policy="fullkv", budget_tokens="full",
                 budget_fraction=1.0, kept_entries=1000, budget_bytes=4096, metric="contains", value=full)]
    for p, by in acc.items():
        for b, v in by.items():
            rows.append(dict(rows[0], policy=p, budget_tokens=str(b), kept_entries=b, budget_bytes=4 * b, value=v))
    return pd.DataFrame(rows)


def test_auc_and_accuracy_table_hand():
    df = _frame({"flowkv": {64: 0.0, 128: 1.0, 256: 1.0}, "snapkv": {64: 0.0, 128: 0.0, 256: 1.0}})
    auc = sweep.auc_table(df)
    # log2 budgets 6, 7, 8: trapezoids (0+1)/2 + (1+1)/2 over a range of 2 → 0.75; snapkv (0 + 0.5)/2 = 0.25
    assert auc.loc["flowkv", "t"] == pytest.approx(0.75) and auc.loc["snapkv", "average"] == pytest.approx(0.25)
    assert auc.loc["flowkv", "relative"] == pytest.approx(0.75)
    acc = sweep.accuracy_table(df)
    assert set(acc.task) == {"t", "average"} and math.isinf(acc[acc.policy == "fullkv"].budget.iloc[0])
    assert sweep.fullkv_accuracy(df).to_dict() == {"t": 1.0}


def test_claims_hand():
    df = _frame({"flowkv": {64: 0.5, 128: 1.0, 256: 1.0}, "snapkv": {64: 0.0, 128: 0.5, 256: 1.0},
                 "adakv": {64: 0.25, 128: 0.5, 256: 0.75}})
    c = sweep.claims(df)
    assert c["baselines"] == ["snapkv", "adakv"] and c["budgets"] == [64, 128, 256]
    assert c["advantage"] == pytest.approx([0.25, 0.5, 0.0])
    assert (c["wins"], c["ties"], c["losses"], c["cells"]) == (2, 1, 0, 3)
    assert c["fidelity_leader"] == {}
    assert c["loss_flowkv_smallest"] == pytest.approx(0.5) and c["loss_baseline_smallest"] == pytest.approx(0.75)
    assert c["loss_ratio_smallest"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="claims need"):
        sweep.claims(df, flowkv="flowkv_global")
