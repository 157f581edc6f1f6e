"""The accuracy side of the analysis (sweep tables, `sweep.COLUMNS`): mean accuracy per (task, policy, budget) with
bootstrap intervals, FullKV's accuracy, the area under accuracy-vs-log-budget, the numbers behind docs/method.md's
claims 3 and 4, and the study's cells, solved tasks, best baseline and budget-to-match tables (notebook 03)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..budgets import FULL, parse_budget
from ..policies import BASELINES

FIDELITY = ("attn_rel_err", "attn_rel_err_heldout", "kl_next_token")  # = sweep.FIDELITY


IDENTITY = ["model", "model_sha", "instance_sha", "seed", "policy_params", "window", "settings"]  # a run's settings


BUDGET_UNITS = {int: "tokens per KV head", float: "kept fraction of the prompt"}


def budget_unit(budgets) -> str:
    """How budgets are given, for axis labels: "tokens per KV head" or "kept fraction of the prompt" (a run uses one
    kind; "full" aside). budgets: values or a table's budget column (text)."""
    kinds = {type(parse_budget(b)) for b in budgets} - {str}
    if len(kinds) > 1:
        raise ValueError(f"budgets {sorted(map(str, set(budgets)))} mix token counts and fractions of the prompt")
    return BUDGET_UNITS[kinds.pop()] if kinds else "budget"


def budget_value(b: str, full_at: float = math.inf) -> float:
    """Numeric budget of a budget label ("128" tokens, "0.05" fraction); "full" → full_at (e.g. a position right of
    the largest)."""
    return full_at if str(b) == FULL else float(b)


def _number(b: float) -> int | float:
    """A budget value as it was given: an int for token budgets, a float for fractions."""
    return int(b) if b >= 1 and float(b).is_integer() else float(b)


def check_single_run(df: pd.DataFrame) -> None:
    """Summaries never pool rows of different settings: each (task, instance, policy, budget, metric) must come
    from one run. Raises naming the settings that differ (select one run first, e.g. df[df.seed == 1])."""
    cells = ["task", "instance", "policy", "budget", "metric"]
    if not len(df) or not set(cells) <= set(df.columns):
        return
    dup = df.duplicated(cells, keep=False)
    if dup.any():
        rows = df[dup]
        differ = [c for c in IDENTITY if c in df.columns and rows.groupby(cells)[c].nunique().max() > 1]
        raise ValueError(f"the table holds {int(dup.sum())} rows of the same (task, instance, policy, budget, metric) "
                         f"from different runs (settings that differ: {', '.join(differ) or 'none recorded'}); "
                         "select one run before summarising, e.g. the rows `sweep.run_sweep` returns")
    kinds = {"fraction" if "." in str(b) else "tokens" for b in df.budget if str(b) != FULL}
    if len(kinds) > 1:
        raise ValueError("the table mixes token budgets and fractional budgets; summarise one kind at a time "
                         "(fractions are the labels with a decimal point, e.g. '0.05')")


def task_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of the task metrics (not the fidelity ones), with a numeric `budget` column (inf for "full")."""
    d = df[~df.metric.isin(FIDELITY)].copy()
    check_single_run(df)
    d["budget"] = d.budget.map(budget_value)
    return d


CI_LEVEL = 0.95  # confidence level of every interval the notebooks draw and state
CI_RESAMPLES = 4000  # bootstrap resamples (percentile intervals; the seed is fixed, so intervals are reproducible)


def bootstrap_mean_ci(groups: Sequence[np.ndarray], level: float = CI_LEVEL, resamples: int = CI_RESAMPLES,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the unweighted mean over groups of the group means (one group: the plain
    mean). Each group (e.g. a task's instances) is resampled on its own (stratified), so a task's weight in an
    average never depends on the draw. For a paired difference pass per-instance differences. A group of one
    value gives a zero-width interval (nothing to resample: say n next to it)."""
    if not 0 < level < 1:
        raise ValueError(f"level={level!r}: must lie in (0, 1), e.g. 0.95")
    groups = [np.asarray(g, dtype=float) for g in groups if len(g)]
    if not groups:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for g in groups:
        means += g[rng.integers(0, len(g), size=(resamples, len(g)))].mean(axis=1)
    means /= len(groups)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def accuracy_table(df: pd.DataFrame, metric: str | None = None, ci: bool = False) -> pd.DataFrame:
    """Mean score per (task, policy, budget); metric: a fidelity metric name instead of the task metrics.
    Adds task "average" = unweighted mean over tasks (as LongBench averages datasets). ci: also `low`, `high`, the
    95 % bootstrap interval over instances (`bootstrap_mean_ci`; for "average" resampled within each task)."""
    check_single_run(df)
    d = task_rows(df) if metric is None else df[df.metric == metric].assign(
        budget=lambda x: x.budget.map(budget_value))
    per = d.groupby(["task", "policy", "budget"], as_index=False).agg(value=("value", "mean"),
                                                                       n=("value", "size"),
                                                                       kib=("budget_bytes", "mean"))
    per["kib"] = per["kib"] / 1024
    avg = per.groupby(["policy", "budget"], as_index=False).agg(value=("value", "mean"), n=("n", "sum"),
                                                                 kib=("kib", "mean"))
    avg["task"] = "average"
    out = pd.concat([per, avg[per.columns]], ignore_index=True)
    if ci:
        values = {k: g.to_numpy() for k, g in d.groupby(["task", "policy", "budget"]).value}
        tasks = sorted(set(d.task))
        bounds = [bootstrap_mean_ci([values.get((t, r.policy, r.budget), []) for t in tasks]) if r.task == "average"
                  else bootstrap_mean_ci([values[(r.task, r.policy, r.budget)]]) for r in out.itertuples()]
        out["low"], out["high"] = [b[0] for b in bounds], [b[1] for b in bounds]
    return out


def paired_difference(df: pd.DataFrame, policy: str, other: str | Sequence[str], budget: float,
                      task: str = "average") -> dict:
    """Mean of `policy` − `other` at one budget, paired over instances, with its 95 % bootstrap interval (stratified
    by task for "average"). other: a policy, or several — then per budget the one of highest mean accuracy (chosen
    on the whole sample, as a claim names it). Returns {"other", "diff", "low", "high", "n"}."""
    return _paired(task_rows(df), policy, other, budget, task)


def _paired(d: pd.DataFrame, policy: str, other: str | Sequence[str], budget: float, task: str) -> dict:
    """`paired_difference` on task rows `d` (`task_rows`: checked once, budgets numeric)."""
    d = d[d.budget == budget] if task == "average" else d[(d.budget == budget) & (d.task == task)]
    others = [other] if isinstance(other, str) else list(other)
    others = [o for o in others if o in set(d.policy)]
    if policy not in set(d.policy) or not others:
        raise ValueError(f"paired_difference: policy {policy!r} or {other!r} not in the table at budget {budget}")
    best = max(others, key=lambda o: d[d.policy == o].groupby("task").value.mean().mean())
    piv = d[d.policy.isin([policy, best])].pivot_table(index=["task", "instance"], columns="policy", values="value")
    diff = (piv[policy] - piv[best]).dropna()
    groups = [g.to_numpy() for _, g in diff.groupby(level="task")]
    low, high = bootstrap_mean_ci(groups)
    mean = float(np.mean([g.mean() for g in groups]))
    return {"other": best, "diff": mean, "low": low, "high": high, "n": int(len(diff))}


def head_to_head(df: pd.DataFrame, policy: str, others: Sequence[str] = BASELINES) -> pd.DataFrame:
    """`policy` against each of `others` (those in the table) at every finite budget, one row per (other, budget):
    the paired mean difference over instances with its 95 % interval (`paired_difference`, task "average") and the
    verdict "above" / "below" (the interval excludes 0) or "tie". Columns: policy, other, budget, diff, low, high,
    n, verdict."""
    d = task_rows(df)
    budgets = sorted(b for b in set(d[d.policy == policy].budget) if math.isfinite(b))
    present = [o for o in others if o != policy and o in set(d.policy)]
    if not budgets or not present:
        raise ValueError(f"head_to_head: policy {policy!r} at a finite budget and one of {list(others)} are needed; "
                         f"the table has {sorted(set(d.policy))}")
    rows = []
    for o in present:
        for b in budgets:
            if not ((d.policy == o) & (d.budget == b)).any():
                continue
            c = _paired(d, policy, o, b, "average")  # task_rows checked the table once, above
            verdict = "above" if c["low"] > 0 else "below" if c["high"] < 0 else "tie"
            rows.append(dict(policy=policy, other=o, budget=_number(b), diff=c["diff"], low=c["low"], high=c["high"],
                             n=c["n"], verdict=verdict))
    return pd.DataFrame(rows, columns=["policy", "other", "budget", "diff", "low", "high", "n", "verdict"])


def fullkv_accuracy(df: pd.DataFrame) -> pd.Series:
    """FullKV's mean score per task (policy fullkv at budget "full")."""
    return fullkv_rows(df).groupby("task").value.mean()


def fullkv_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The task-metric rows of FullKV (policy fullkv at budget "full"), budget numeric (`task_rows`)."""
    d = task_rows(df)
    return d[(d.policy == "fullkv") & ~d.budget.map(math.isfinite)]


def auc_table(df: pd.DataFrame) -> pd.DataFrame:
    """Area under accuracy-vs-log2(budget) over the finite budgets, divided by the log2 range: the mean accuracy
    over log-spaced budgets, in [0, 1]. Rows: policies (no fullkv); columns: tasks and "average"; plus
    "relative" = average AUC / FullKV's average accuracy."""
    acc = accuracy_table(df)
    acc = acc[(acc.policy != "fullkv") & acc.budget.map(math.isfinite)]
    rows = {}
    for (task, policy), g in acc.groupby(["task", "policy"]):
        g = g.sort_values("budget")
        x = g.budget.map(math.log2).to_numpy()
        y = g.value.to_numpy()
        rows.setdefault(policy, {})[task] = float(y[0]) if len(x) == 1 else float(
            ((y[1:] + y[:-1]) / 2 * (x[1:] - x[:-1])).sum() / (x[-1] - x[0]))
    out = pd.DataFrame(rows).T
    full = fullkv_accuracy(df)
    if len(full):
        out["relative"] = out["average"] / full.mean()
    return out.sort_values("average", ascending=False)


def claims(df: pd.DataFrame, flowkv: str = "flowkv", baselines: Sequence[str] = BASELINES) -> dict:
    """Numbers behind method.md §5 claims 3 and 4, computed from the table (finite budgets only).

    Claim 3 (FlowKV beats the head-wise baselines): over the (task, budget) `cells`, how often FlowKV's mean
    accuracy is above (`wins`), equal to (`ties`) or below (`losses`) the best baseline's; mean accuracy over
    budgets of FlowKV vs the best baseline. `fidelity_leader`: per fidelity metric in the table, the policy (of
    FlowKV and the baselines) with the lowest task-averaged value at each budget.
    Claim 4 (the gap widens as the budget shrinks): on the task-averaged curve, the advantage
    adv(B) = acc_FlowKV(B) − max_baseline acc(B) per budget (smallest first), its Spearman correlation with
    the budget (negative = widens as the budget shrinks), and at the smallest budget the accuracy losses
    (FullKV − accuracy) of FlowKV and of the best baseline, and their ratio (> 1: FlowKV loses less).
    Intervals: `advantage_low`/`advantage_high`, the 95 % paired bootstrap interval of adv(B) over instances
    (stratified by task), and the cells where the paired interval lies above / below 0."""
    acc = accuracy_table(df)
    acc = acc[acc.budget.map(math.isfinite)]
    base = [b for b in baselines if b in set(acc.policy)]
    if flowkv not in set(acc.policy) or not base:
        raise ValueError(f"claims need policy {flowkv!r} and at least one of {', '.join(baselines)} in the table")
    piv = acc.pivot_table(index=["task", "budget"], columns="policy", values="value")
    cells = piv[piv.index.get_level_values("task") != "average"]
    diff = cells[flowkv] - cells[base].max(axis=1)
    wins, ties = int((diff > 1e-12).sum()), int((diff.abs() <= 1e-12).sum())
    avg = piv.loc["average"].sort_index()
    best_base = avg[base].max(axis=1)
    adv = (avg[flowkv] - best_base)
    full = float(fullkv_accuracy(df).mean())
    loss_f, loss_b = full - avg[flowkv], full - best_base
    smallest = float(avg.index.min())
    mean_acc = avg[[flowkv] + base].mean()
    x = pd.Series(avg.index.values, dtype=float).rank()
    rho = float(pd.Series(adv.values).rank().corr(x)) if len(adv) > 1 else float("nan")  # Spearman
    paired = [paired_difference(df, flowkv, base, b) for b in avg.index]  # the average curve, with intervals
    above = below = 0  # cells where the paired interval of FlowKV − best baseline excludes 0
    for task, b in cells.index:
        c = paired_difference(df, flowkv, base, b, task=task)
        above, below = above + (c["low"] > 0), below + (c["high"] < 0)
    leaders = {}
    for m in FIDELITY:
        fid = accuracy_table(df, metric=m) if (df.metric == m).any() else None
        if fid is not None:
            fid = fid[(fid.task == "average") & fid.budget.map(math.isfinite) & fid.policy.isin([flowkv] + base)]
            leaders[m] = [str(g.loc[g.value.idxmin(), "policy"]) for _, g in fid.groupby("budget")]
    return {
        "flowkv": flowkv, "baselines": base, "fullkv": full, "fidelity_leader": leaders,
        "budgets": [_number(b) for b in avg.index], "advantage": [float(a) for a in adv.values],
        "best_baseline_per_budget": [str(avg.loc[b, base].astype(float).idxmax()) for b in avg.index],
        "wins": wins, "ties": ties, "losses": int(len(cells)) - wins - ties, "cells": int(len(cells)),
        "mean_flowkv": float(mean_acc[flowkv]), "best_baseline": best_baseline(df, base),
        "mean_best_baseline": float(mean_acc[base].max()),
        "smallest_budget": _number(smallest), "loss_flowkv_smallest": float(loss_f.loc[smallest]),
        "loss_baseline_smallest": float(loss_b.loc[smallest]),
        "loss_ratio_smallest": float(loss_b.loc[smallest] / loss_f.loc[smallest]) if loss_f.loc[smallest] > 0
        else float("inf") if loss_b.loc[smallest] > 0 else 1.0,
        "spearman_adv_vs_log_budget": rho,
        "advantage_low": [c["low"] for c in paired], "advantage_high": [c["high"] for c in paired],
        "cells_significantly_above": int(above), "cells_significantly_below": int(below),
        "ci_level": CI_LEVEL,
    }


# ---- the study: (task, length) cells, the tasks FullKV solves, the budget each policy needs ----
LENGTH_ID = re.compile(r"^len(\d+)_")  # RULER instance ids: len<prompt length>_<index>
SOLVED = 0.8  # a (task, length) cell enters the claims when FullKV's accuracy there is at least this


def cells_by_length(df: pd.DataFrame) -> pd.DataFrame:
    """The table with every task split by the prompt length its instances were built for: task becomes
    "<task> @<length>" (from RULER instance ids, len<N>_<i>; other tasks keep their name), so that every summary
    of this module treats a (task, length) cell as a task — averages then weight the cells equally."""
    out = df.copy()
    out["task"] = [cell_of(t, i) for t, i in zip(df.task, df.instance, strict=True)]
    return out


def cell_of(task: str, instance: str) -> str:
    """The (task, length) cell of one instance: "<task> @<length>" for RULER ids len<N>_<i>, else the task."""
    m = LENGTH_ID.match(str(instance))
    return f"{task} @{m.group(1)}" if m else str(task)


def solved_cells(df: pd.DataFrame, threshold: float = SOLVED) -> pd.DataFrame:
    """FullKV's accuracy per task (a `cells_by_length` table: per cell) with its 95 % bootstrap interval and the
    number of instances; `solved` = accuracy ≥ threshold, the cells a claim about eviction can use (a cell FullKV
    fails says nothing about what eviction loses)."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold={threshold!r}: an accuracy in [0, 1]")
    rows = []
    for task, g in fullkv_rows(df).groupby("task"):
        low, high = bootstrap_mean_ci([g.value.to_numpy()])
        rows.append({"task": task, "fullkv": float(g.value.mean()), "low": low, "high": high, "n": len(g),
                     "solved": bool(g.value.mean() >= threshold)})
    return pd.DataFrame(rows, columns=["task", "fullkv", "low", "high", "n", "solved"])


def complete_instances(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the instances that every (policy, budget) of their task holds a task-metric row for: what a
    comparison of policies may use, so that every policy's mean and every paired difference rest on the same
    instances. A sweep stopped part-way (a device session's time ran out; `sweep_cli` resumes it) leaves instances
    that only FullKV, or only some policies, have reached: they are dropped here, not averaged unevenly."""
    d = task_rows(df)
    pairs = d.groupby("task")[["policy", "budget"]].apply(lambda g: len(g.drop_duplicates()))
    have = d.drop_duplicates(["task", "instance", "policy", "budget"]).groupby(["task", "instance"]).size()
    full = {key for key, count in have.items() if count == pairs[key[0]]}
    keep = [(t, i) in full for t, i in zip(df.task, df.instance, strict=True)]
    return df[keep]


def solved_rows(df: pd.DataFrame, threshold: float = SOLVED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(`solved_cells` of the table split by length, the table's rows of the cells that enter a study's claims):
    the cells FullKV solves *and* where compressing policies ran, restricted to their `complete_instances`. The
    solved table gains `swept` (a compressing policy has rows in the cell; False: a FullKV screen only, e.g. a
    solved cell left out to save device time), `claims` (solved and swept) and `paired` (the cell's complete
    instances, every policy at every budget: what its claims rest on; 0 for a cell outside the claims). The rows'
    task column names the cell ("<task> @<length>")."""
    cells = cells_by_length(df)
    solved = solved_cells(cells, threshold)
    swept = set(cells.task[cells.policy != "fullkv"])
    solved["swept"] = solved.task.isin(swept)
    solved["claims"] = solved.solved & solved.swept
    rows = complete_instances(cells[cells.task.isin(set(solved.task[solved.claims]))])
    counts = rows.groupby("task").instance.nunique()  # the claim cells only: 0 for every other cell
    solved["paired"] = [int(counts.get(t, 0)) for t in solved.task]
    return solved, rows


def cell_length(cell: str) -> int:
    """The prompt length of a "<task> @<length>" cell (`cell_of`); 0 for a cell without one (sorts first)."""
    _, _, length = str(cell).rpartition(" @")
    return int(length) if length.isdigit() else 0


def best_baseline(df: pd.DataFrame, baselines: Sequence[str] = BASELINES) -> str:
    """The head-wise baseline of the table with the highest task-averaged accuracy, mean over its finite budgets
    (ties to the earlier one in `baselines`); `claims` reports it as "best_baseline"."""
    acc = accuracy_table(df)
    acc = acc[(acc.task == "average") & acc.budget.map(math.isfinite)]
    means = acc.groupby("policy").value.mean()
    present = [b for b in baselines if b in means.index]
    if not present:
        raise ValueError(f"no rows of a baseline ({', '.join(baselines)}) at a finite budget in the table")
    return str(means[present].idxmax())


def kv_layout(df: pd.DataFrame) -> dict:
    """What one token's KV costs in the table's model, from FullKV's rows: bytes per token, KV heads × layers
    (entries per token) and the bytes of one entry (K and V of one head: 2·d numbers)."""
    full = fullkv_rows(df)
    if full.empty or not (full.kept_entries > 0).all():
        raise ValueError("no FullKV rows with kept entries in the table: its KV layout is unknown")
    entries = full.kept_entries / full.context_tokens
    return {"bytes_per_token": float((full.budget_bytes / full.context_tokens).mean()),
            "entries_per_token": float(entries.mean()),
            "bytes_per_entry": float((full.budget_bytes / full.kept_entries).mean())}


def fidelity_accuracy_correlation(df: pd.DataFrame, policies: Sequence[str] | None = None) -> pd.DataFrame:
    """Does better output fidelity go with better answers? Per finite budget, the Spearman rank correlation over
    policies between each fidelity metric of the table and the task-averaged accuracy (a negative ρ: lower error,
    higher accuracy). Rows: budgets; columns: the fidelity metrics; plus `policies`, how many were ranked."""
    acc = accuracy_table(df)
    acc = acc[(acc.task == "average") & acc.budget.map(math.isfinite) & (acc.policy != "fullkv")]
    if policies is not None:
        acc = acc[acc.policy.isin(policies)]
    a = acc.pivot_table(index="budget", columns="policy", values="value")
    out = pd.DataFrame(index=a.index)
    for m in FIDELITY:
        if not (df.metric == m).any():
            continue
        f = accuracy_table(df, metric=m)
        f = f[f.task == "average"].pivot_table(index="budget", columns="policy", values="value")
        out[m] = [a.loc[b].rank().corr(f.loc[b, a.columns].rank()) if b in f.index else float("nan")
                  for b in a.index]
    out["policies"] = a.notna().sum(axis=1)
    return out


def run_label(df: pd.DataFrame) -> str:
    """A short name of a run for titles: model (up to its first space, without a GGUF file's quantisation and
    extension), question mode, budget kind."""
    model = re.sub(r"([.-][Qq]\d\w*)?\.gguf$", "", str(df.model.iloc[0]).split(" ")[0]) if len(df) else "?"
    modes = {json.loads(s).get("question", "aware") for s in df.settings.unique()} if "settings" in df else {"aware"}
    kinds = {"fractions" if "." in str(b) else "tokens" for b in df.budget.unique() if str(b) != FULL}
    return f"{model} · question-{'/'.join(sorted(modes))} · {'/'.join(sorted(kinds))}"


def budget_to_match(df: pd.DataFrame, within: float = 0.05) -> pd.DataFrame:
    """Per policy, the smallest finite budget from which on (it and every larger budget of the table) its
    task-averaged accuracy stays within `within` (relative) of FullKV's, acc ≥ (1 − within)·FullKV, and the KV
    memory kept there (MiB, mean over instances); NaN where even its largest budget falls short. Rows in the
    table's policy order; FullKV left out."""
    if not 0 <= within < 1:
        raise ValueError(f"within={within!r}: a relative accuracy loss in [0, 1), e.g. 0.05")
    acc = accuracy_table(df)
    avg = acc[(acc.task == "average")]
    full = float(fullkv_accuracy(df).mean())
    rows = []
    for policy in dict.fromkeys(df.policy):
        if policy == "fullkv":
            continue
        g = avg[(avg.policy == policy) & avg.budget.map(math.isfinite)].sort_values("budget")
        good = (g.value >= (1 - within) * full).to_numpy()
        tail = len(good) - int(np.argmin(good[::-1])) if not good.all() else 0  # start of the all-good suffix
        first = g.iloc[tail] if tail < len(good) else None
        rows.append({"policy": policy, "budget": _number(first.budget) if first is not None else float("nan"),
                     "mib": float(first.kib) / 1024 if first is not None else float("nan"),
                     "accuracy": float(first.value) if first is not None else float("nan"), "fullkv": full})
    return pd.DataFrame(rows, columns=["policy", "budget", "mib", "accuracy", "fullkv"])
