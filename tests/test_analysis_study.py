"""The study's summaries on hand-made tables: (task, length) cells, the cells FullKV solves, the budget each policy
needs to stay within 5 % of FullKV."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from flowkv_utils import analysis


def _table(values: dict[tuple[str, str, str], list[float]], kib: float = 1.0) -> pd.DataFrame:
    """{(task, policy, budget): per-instance scores} → tidy rows (instance ids len<N>_<i> for tasks named @N)."""
    rows = []
    for (task, policy, budget), vals in values.items():
        name, _, length = task.partition("@")
        for i, v in enumerate(vals):
            inst = f"len{length}_{i:02d}" if length else f"d{i}"
            mult = 1.0 if budget == "full" else float(budget)
            rows.append({"task": name, "instance": inst, "policy": policy, "budget": budget, "metric": "contains",
                         "value": v, "budget_bytes": kib * 1024 * mult})
    return pd.DataFrame(rows)


def test_cells_by_length_splits_ruler_tasks_only():
    df = _table({("ruler_vt@4000", "fullkv", "full"): [1, 1], ("ruler_vt@8000", "fullkv", "full"): [1, 0],
                 ("niah", "fullkv", "full"): [1]})
    cells = analysis.cells_by_length(df)
    assert sorted(set(cells.task)) == ["niah", "ruler_vt @4000", "ruler_vt @8000"]
    assert list(df.task.unique()) == ["ruler_vt", "niah"]  # the input is not changed


def test_solved_cells_use_the_threshold_and_carry_intervals():
    df = analysis.cells_by_length(_table({("ruler_vt@4000", "fullkv", "full"): [1] * 9 + [0],
                                          ("ruler_vt@8000", "fullkv", "full"): [1, 0, 0, 1]}))
    s = analysis.solved_cells(df).set_index("task")
    assert s.loc["ruler_vt @4000", "fullkv"] == pytest.approx(0.9) and s.loc["ruler_vt @4000", "solved"]
    assert not s.loc["ruler_vt @8000", "solved"] and s.loc["ruler_vt @8000", "n"] == 4
    assert s.loc["ruler_vt @4000", "low"] <= 0.9 <= s.loc["ruler_vt @4000", "high"]
    with pytest.raises(ValueError, match="threshold=1.5"):
        analysis.solved_cells(df, threshold=1.5)


def test_budget_to_match_is_the_start_of_the_good_suffix():
    full = [1.0, 1.0]
    df = _table({("t", "fullkv", "full"): full,
                 ("t", "a", "0.01"): [1.0, 1.0], ("t", "a", "0.1"): [0.0, 1.0], ("t", "a", "0.5"): [1.0, 1.0],
                 ("t", "b", "0.01"): [0.0, 0.0], ("t", "b", "0.1"): [1.0, 1.0], ("t", "b", "0.5"): [1.0, 0.0]})
    need = analysis.budget_to_match(df).set_index("policy")
    assert need.loc["a", "budget"] == 0.5  # 0.01 is good, but 0.1 is not: a lucky small budget does not count
    assert need.loc["a", "mib"] == pytest.approx(0.5 / 1024)
    assert math.isnan(need.loc["b", "budget"])  # its largest budget falls short
    assert "fullkv" not in need.index
    with pytest.raises(ValueError, match="within=1"):
        analysis.budget_to_match(df, within=1)


def test_solved_rows_keep_only_the_solved_cells_and_label_the_run():
    df = _table({("ruler_vt@4000", "fullkv", "full"): [1, 1], ("ruler_vt@4000", "a", "0.1"): [0, 1],
                 ("ruler_vt@8000", "fullkv", "full"): [0, 0], ("ruler_vt@8000", "a", "0.1"): [0, 0]})
    df["model"], df["settings"] = "SmolLM2-135M-Instruct.Q4_1.gguf (GGUF)", '{"question": "agnostic"}'
    solved, rows = analysis.solved_rows(df)
    assert list(solved.task[solved.solved]) == ["ruler_vt @4000"] and set(rows.task) == {"ruler_vt @4000"}
    assert len(rows) == 4
    assert analysis.run_label(df) == "SmolLM2-135M-Instruct · question-agnostic · fractions"
    df["model"] = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf (GGUF, dequantised to float32)"
    assert analysis.run_label(df).startswith("qwen2.5-coder-0.5b-instruct · ")


def test_solved_rows_leave_out_solved_cells_only_fullkv_screened():
    df = _table({("ruler_vt@4000", "fullkv", "full"): [1, 1], ("ruler_vt@4000", "a", "0.1"): [0, 1],
                 ("ruler_vt@8000", "fullkv", "full"): [1, 1]})  # solved, but no policy ran there
    solved, rows = analysis.solved_rows(df)
    s = solved.set_index("task")
    assert s.solved.all() and list(s.swept) == [True, False] and list(s.claims) == [True, False]
    assert set(rows.task) == {"ruler_vt @4000"}


def test_fidelity_accuracy_correlation_ranks_policies_per_budget():
    vals = {("t", "fullkv", "full"): [1.0, 1.0]}
    for i, p in enumerate(["a", "b", "c"]):
        vals[("t", p, "0.1")] = [i / 2, i / 2]
    df = _table(vals)
    err = df[df.budget != "full"].assign(metric="attn_rel_err", value=lambda x: 1 - x.value)  # lower error, better
    kl = df[df.budget != "full"].assign(metric="kl_next_token", value=lambda x: x.value)  # the opposite
    corr = analysis.fidelity_accuracy_correlation(pd.concat([df, err, kl], ignore_index=True))
    assert corr.loc[0.1, "attn_rel_err"] == pytest.approx(-1.0) and corr.loc[0.1, "kl_next_token"] == pytest.approx(1.0)
    assert "attn_rel_err_heldout" not in corr and corr.loc[0.1, "policies"] == 3


def test_cell_length_sorts_cells_by_their_prompt_length():
    cells = ["ruler_vt @16000", "niah", "ruler_vt @8000", "ruler_vt @32000"]
    assert sorted(cells, key=analysis.cell_length) == ["niah", "ruler_vt @8000", "ruler_vt @16000", "ruler_vt @32000"]


def test_best_baseline_is_the_highest_mean_over_finite_budgets():
    df = _table({("t", "fullkv", "full"): [1, 1], ("t", "snapkv", "0.1"): [1, 1], ("t", "snapkv", "0.5"): [0, 1],
                 ("t", "adakv", "0.1"): [1, 0], ("t", "adakv", "0.5"): [1, 0], ("t", "flowkv", "0.1"): [1, 1],
                 ("t", "flowkv", "0.5"): [1, 1]})
    assert analysis.best_baseline(df) == "snapkv"  # 0.75 vs 0.5; FlowKV (1.0) is not a baseline
    assert analysis.best_baseline(df, baselines=["adakv"]) == "adakv"
    with pytest.raises(ValueError, match="no rows of a baseline"):
        analysis.best_baseline(df, baselines=["h2o"])
    tie = _table({("t", "fullkv", "full"): [1], ("t", "snapkv", "0.1"): [1], ("t", "adakv", "0.1"): [1]})
    assert analysis.best_baseline(tie, ["snapkv", "adakv"]) == "snapkv"  # a tie: the earlier in `baselines`
    assert analysis.best_baseline(tie, ["adakv", "snapkv"]) == "adakv"


def test_kv_layout_from_fullkv_rows():
    df = _table({("t", "fullkv", "full"): [1, 1], ("t", "a", "0.1"): [1, 0]})
    df["context_tokens"], df["kept_entries"] = 100, 100 * 48  # 24 layers × 2 KV heads
    df["budget_bytes"] = df.kept_entries * 2 * 64 * 4  # K and V, d 64, float32
    kv = analysis.kv_layout(df)
    assert kv == {"bytes_per_token": 48 * 512, "entries_per_token": 48, "bytes_per_entry": 512}
    with pytest.raises(ValueError, match="no FullKV rows"):
        analysis.kv_layout(df[df.policy != "fullkv"])


def test_a_sweep_stopped_part_way_enters_the_claims_on_its_complete_instances_only():
    # instance 2 has FullKV and policy a only, instance 3 FullKV only: a resumable sweep cut off by the device's time
    df = _table({("ruler_vt@4000", "fullkv", "full"): [1, 1, 1, 1], ("ruler_vt@4000", "a", "0.1"): [0, 1, 1],
                 ("ruler_vt@4000", "b", "0.1"): [1, 1]})
    kept = analysis.complete_instances(analysis.cells_by_length(df))
    assert sorted(set(kept.instance)) == ["len4000_00", "len4000_01"]
    solved, rows = analysis.solved_rows(df)
    s = solved.set_index("task").loc["ruler_vt @4000"]
    assert s.n == 4 and s.paired == 2  # FullKV's gate uses all four; the comparison the two complete ones
    acc = analysis.accuracy_table(rows).set_index(["task", "policy"]).value
    assert acc[("ruler_vt @4000", "a")] == pytest.approx(0.5) and acc[("ruler_vt @4000", "b")] == 1.0
