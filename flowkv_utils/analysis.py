"""Analysis: the numbers notebooks state, computed from tidy result tables (notebooks only format them).

Accuracy side (sweep tables, `sweep.COLUMNS`): mean accuracy per (task, policy, budget), FullKV's accuracy, the
area under accuracy-vs-log-budget, and the numbers behind docs/method.md's claims 3 and 4.
Throughput side (bench tables, `bench.load_results`): the throughput bars against named targets
(`ThroughputTargets`) and the prefill out-of-memory frontier.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .budgets import FULL, parse_budget
from .policies import BASELINES

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
    d = task_rows(df)
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


def solved_rows(df: pd.DataFrame, threshold: float = SOLVED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(`solved_cells` of the table split by length, the table's rows of the cells that enter a study's claims):
    the cells FullKV solves *and* where compressing policies ran. The solved table gains `swept` (a compressing
    policy has rows in the cell; False: a FullKV screen only, e.g. a solved cell left out to save device time) and
    `claims` (solved and swept). The rows' task column names the cell ("<task> @<length>")."""
    cells = cells_by_length(df)
    solved = solved_cells(cells, threshold)
    swept = set(cells.task[cells.policy != "fullkv"])
    solved["swept"] = solved.task.isin(swept)
    solved["claims"] = solved.solved & solved.swept
    return solved, cells[cells.task.isin(set(solved.task[solved.claims]))]


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


# ---- throughput side (bench tables) ----
@dataclass(frozen=True)
class ThroughputTargets:
    """The project's throughput bars: the targets `bars` reports against (printed, never asserted).

    floor_ratio: a decode step (batch 1, longest context) takes at most this many times its byte floor
    (W + KV_kept) / BW; bound_fraction: FlowKV's measured speed-up over FullKV reaches at least this fraction of
    the bytes-ratio bound (W + KV_full) / (W + KV_kept); batch_gain: at the longest context, tokens/s at FlowKV's
    largest batch is at least this many times FullKV's at its largest; scoring_share: scoring + selection takes at
    most this fraction of prefill time (at `SCORING_CONTEXT`); alloc_over_kept: the ragged cache allocates at most
    this many times the bytes it keeps (every decode row)."""

    floor_ratio: float = 1.3
    bound_fraction: float = 0.8
    batch_gain: float = 10.0
    scoring_share: float = 0.05
    alloc_over_kept: float = 1.05


THROUGHPUT_TARGETS = ThroughputTargets()
SCORING_CONTEXT = 131072  # the prompt length (128K tokens) at which the scoring share is judged


def oom_frontier(prefill_rows: pd.DataFrame, capacity_bytes: float) -> dict[str, float]:
    """Per policy, the context at which prefill peak memory would reach the device's capacity, extrapolated along
    the straight line through the two longest measured contexts (peak memory grows linearly with n)."""
    out = {}
    for policy, g in prefill_rows[prefill_rows.status == "ok"].groupby("policy"):
        g = g.sort_values("context").tail(2)
        if len(g) < 2:
            continue
        (n0, p0), (n1, p1) = g[["context", "peak_alloc_bytes"]].to_numpy(dtype=float)
        slope = (p1 - p0) / (n1 - n0)  # bytes per prompt token
        out[policy] = n1 + (capacity_bytes - p1) / slope if slope > 0 else float("inf")
    return out


def bars(res: dict, budget: float = 0.05, scoring_context: int = SCORING_CONTEXT,
         targets: ThroughputTargets = THROUGHPUT_TARGETS) -> pd.DataFrame:
    """The project's throughput bars, computed from stored bench results (`bench.load_results`; printed, never
    asserted): decode step vs floor at the longest context, the FlowKV speed-up against the bytes-ratio bound,
    throughput at the largest batch, scoring overhead at `scoring_context`, ragged allocated vs kept bytes, each
    against its target in `targets`. Returns a DataFrame (bar, value, target, reached)."""
    t = targets
    d = res["decode"][res["decode"].status == "ok"]
    n = int(d.context.max())
    ctx = d[(d.sweep == "context") & (d.context == n) & (d.batch == 1)]
    full = ctx[ctx.policy == "fullkv"].iloc[0]
    rows = []
    for pol in ("fullkv", "flowkv", "flowkv_global"):
        r = ctx[(ctx.policy == pol) & ((ctx.budget == budget) | (pol == "fullkv"))]
        if len(r):
            r = r.iloc[0]
            rows.append((f"decode step / floor, {pol}, n={n}, batch 1", r.floor_ratio, f"≤ {t.floor_ratio:g}",
                         r.floor_ratio <= t.floor_ratio))
    for pol in ("flowkv", "flowkv_global"):
        r = ctx[(ctx.policy == pol) & (ctx.budget == budget)]
        if len(r):
            r = r.iloc[0]
            frac = (full.decode_ms / r.decode_ms) / r.bound_speedup
            rows.append((f"{pol} speed-up over FullKV / bytes-ratio bound ({full.decode_ms / r.decode_ms:.2f}× of "
                         f"{r.bound_speedup:.2f}×), n={n}", frac, f"≥ {t.bound_fraction:g}",
                         frac >= t.bound_fraction))
    mb = d[d.sweep == "maxbatch"].set_index("policy")
    if {"fullkv", "flowkv_global"} <= set(mb.index):
        f, k = mb.loc["fullkv"], mb.loc["flowkv_global"]
        gain = k.tokens_per_s / f.tokens_per_s
        rows.append((f"tokens/s at the largest batch, n={n}: FlowKV {budget:.0%} (B={k.batch}) / FullKV "
                     f"(B={f.batch}) = {k.tokens_per_s:.0f} / {f.tokens_per_s:.0f}", gain, f"≥ {t.batch_gain:g}",
                     gain >= t.batch_gain))
    if "scoring" in res:
        sc = res["scoring"]
        for pol in ("flowkv", "flowkv_global", "snapkv"):
            r = sc[(sc.policy == pol) & (sc.context == scoring_context)]
            if len(r):
                v = float(r.fraction.iloc[0])
                rows.append((f"{pol} scoring+selection / prefill, n={scoring_context}", v,
                             f"≤ {t.scoring_share:g}", v <= t.scoring_share))
    rag = d[d.layout == "ragged"]
    worst = float((rag.allocated_bytes / rag.kept_bytes).max())
    rows.append(("ragged cache allocated / kept bytes (worst row)", worst, f"≤ {t.alloc_over_kept:g}",
                 worst <= t.alloc_over_kept))
    return pd.DataFrame(rows, columns=["bar", "value", "target", "reached"])


# ---- the throughput bars stated as a table (notebook 04 prints them before its GPU figures) ----
TARGET_SENSE = {"floor_ratio": "≤", "bound_fraction": "≥", "batch_gain": "≥", "scoring_share": "≤",
                "alloc_over_kept": "≤"}  # the comparison `bars` applies to each ThroughputTargets field


def targets_table(targets: ThroughputTargets = THROUGHPUT_TARGETS,
                  scoring_context: int = SCORING_CONTEXT) -> pd.DataFrame:
    """One row per field of `targets`: its `name`, the comparison `bars` applies (`sense`, '≤' or '≥'), the
    `value`, the `target` as `bars` prints it in its own `target` column, and what it is judged on (`judged_on`)."""
    from dataclasses import fields

    judged_on = {
        "floor_ratio": "decode step / its byte floor; batch 1, longest stored context; FullKV, FlowKV, FlowKV global",
        "bound_fraction": "FlowKV speed-up over FullKV / bytes-ratio bound; batch 1, longest stored context",
        "batch_gain": "tokens/s at FlowKV global's largest batch / FullKV's at its largest; longest stored context",
        "scoring_share": f"scoring + selection / prefill time; n = {scoring_context} tokens; every policy",
        "alloc_over_kept": "ragged cache allocated / kept bytes; worst decode row",
    }
    rows = []
    for f in fields(targets):
        value = getattr(targets, f.name)
        sense = TARGET_SENSE[f.name]
        rows.append((f.name, sense, value, f"{sense} {value:g}", judged_on[f.name]))
    return pd.DataFrame(rows, columns=["name", "sense", "value", "target", "judged_on"])


# ---- comparators and peers (issue 14) and scale (issue 15): tidy tables from stored bench runs ----
def weight_format_of(weights_label: str) -> str:
    """'fp8' or 'bf16' from a row's weights label (`bench.scale.weights_label`)."""
    return "fp8" if "fp8" in str(weights_label) else "bf16"


def config_label(policy: str, budget, layout: str = "ragged") -> str:
    """How a decode configuration is named in tables and legends: 'FullKV', 'FlowKV 5 %', 'Quest P=16 5 %', ..."""
    from .plots import policy_label

    if policy == "fullkv":
        return "FullKV"
    b = "" if budget is None or budget != budget else f" {budget:.0%}"
    if policy == "quest":
        return f"{policy_label(policy)}, P={str(layout).removeprefix('pages')}{b}"
    return f"{policy_label(policy)}{b}"


def comparison_table(res: dict, peers: dict | None = None, context: int | None = None) -> pd.DataFrame:
    """One row per way of decoding at `context` (default: the longest of the stored run): every policy's batch-1
    step and its largest batch (decode rows; block-sparse rows included), and, from a stored `bench peers` run,
    the whole-model peers (transformers eager and compiled). Columns: name, kind ('eviction' | 'block-sparse' |
    'full' | 'peer'), batch_1_ms, tokens_per_s_1, floor_ratio_1, max_batch, tokens_per_s_max, kv_resident_gb (the
    cache one sequence holds)."""
    d = res["decode"][res["decode"].status == "ok"]
    n = int(d.context.max()) if context is None else context
    d = d[d.context == n]
    rows = []
    one = d[(d.sweep == "context") & (d.batch == 1) & (d.layout.isin(["ragged"]) | (d.policy == "quest"))]
    for _, r in one.iterrows():
        big = d[(d.sweep == "maxbatch") & (d.policy == r.policy) & (d.layout == r.layout)]
        kind = "full" if r.policy == "fullkv" else "block-sparse" if r.policy == "quest" else "eviction"
        rows.append(dict(name=config_label(r.policy, r.budget, r.layout), kind=kind, batch_1_ms=r.decode_ms,
                         tokens_per_s_1=r.tokens_per_s, floor_ratio_1=r.floor_ratio,
                         max_batch=int(big.batch.iloc[0]) if len(big) else None,
                         tokens_per_s_max=float(big.tokens_per_s.iloc[0]) if len(big) else None,
                         kv_resident_gb=r.kept_bytes / 1e9))
    if peers is not None:
        p = peers["peers"]
        p = p[(p.context == n) & p.what.isin(["hf_eager", "hf_compiled"]) & (p.status == "ok")]
        names = {"hf_eager": "transformers eager (DynamicCache)", "hf_compiled": "transformers StaticCache + compile"}
        for _, r in p.iterrows():
            rows.append(dict(name=names[r.what], kind="peer", batch_1_ms=r.ms, tokens_per_s_1=r.tokens_per_s,
                             floor_ratio_1=r.floor_ratio, max_batch=None, tokens_per_s_max=None,
                             kv_resident_gb=r.kv_read_bytes / 1e9))
    order = {"full": 0, "eviction": 1, "block-sparse": 2, "peer": 3}
    out = pd.DataFrame(rows)
    return out.sort_values(["kind", "batch_1_ms"], key=lambda c: c.map(order) if c.name == "kind" else c,
                           ignore_index=True)


def attention_kernels(res: dict, peers: dict) -> pd.DataFrame:
    """One layer's decode attention at the kernel table's context: the project's split-KV kernel (full cache,
    uniform and ragged 5 % lengths) beside SDPA (full and pre-gathered), FlexAttention (page mask) and FlashInfer
    (or why not) from a `bench peers` run. Columns: name, us, kv_mb, frac_of_copy, status, note."""
    rows = []
    for _, r in res["kernel"].iterrows():
        rows.append(dict(name=f"split-KV (project), {r.lengths} lengths", us=r.us, kv_mb=r.kv_bytes / 1e6,
                         frac_of_copy=r.frac_of_copy, status="ok", note=f"config {r.config}"))
    for _, r in peers["peers"][peers["peers"].what.isin(["sdpa", "flex", "flashinfer"])].iterrows():
        rows.append(dict(name={"sdpa": "torch SDPA", "flex": "FlexAttention", "flashinfer": "FlashInfer"}[r.what]
                         + ("" if r.what != "sdpa" else (", full cache" if "full cache" in r.note else ", gathered 5 %")),
                         us=None if r.ms != r.ms else 1e3 * r.ms, kv_mb=r.kv_read_bytes / 1e6,
                         frac_of_copy=r.frac_of_copy, status=r.status, note=r.note))
    return pd.DataFrame(rows)


def scale_tables(res: dict) -> dict[str, pd.DataFrame]:
    """From a stored `bench scale` run: 'decode' (weight format × configuration × context: fits, ms and tokens/s at
    batch 1, floor ratio, peak and kept GB), 'frontier' (per format, FullKV's largest context that decoded and
    the first that did not), 'batch' (the largest batch of the searched configuration), 'prefill' (measured on a
    few layers and extrapolated, per format, policy and context), 'fullkv_curve' (every FullKV context the frontier
    search decoded, with the 'decode' columns: FullKV's memory and speed against the context)."""
    d = res["decode"].assign(format=lambda x: x.weights.map(weight_format_of))
    d["config"] = [config_label(p, b) for p, b in zip(d.policy, d.budget, strict=True)]
    grid = d[d.sweep == "scale"].assign(fits=lambda x: x.status == "ok", peak_gb=lambda x: x.peak_alloc_bytes / 1e9,
                                        kept_gb=lambda x: x.kept_bytes / 1e9)
    cols = ["format", "config", "policy", "budget", "context", "fits", "decode_ms", "tokens_per_s", "floor_ratio",
            "peak_gb", "kept_gb"]
    grid = grid[cols].reset_index(drop=True)
    curve = d[(d.sweep == "frontier") & (d.status == "ok")].assign(fits=True, peak_gb=lambda x: x.peak_alloc_bytes / 1e9,
                                                                   kept_gb=lambda x: x.kept_bytes / 1e9)
    curve = curve[cols].sort_values(["format", "context"]).reset_index(drop=True)
    fr = []
    for fmt, g in d[d.sweep == "frontier"].groupby("format", sort=False):
        ok, oom = g[g.status == "ok"].context, g[g.status == "oom"].context
        largest = int(ok.max()) if len(ok) else 0
        first_oom = oom[oom > largest]
        fr.append(dict(format=fmt, largest_context=largest,
                       first_oom=int(first_oom.min()) if len(first_oom) else None,
                       attempts=len(g)))
    batch = d[d.sweep == "maxbatch"][["format", "config", "context", "batch", "decode_ms", "tokens_per_s",
                                      "floor_ratio"]].reset_index(drop=True)
    p = res.get("scale_prefill")
    if p is not None:
        p = p.assign(format=p.weights.map(weight_format_of))
        p["config"] = [config_label(a, b) for a, b in zip(p.policy, p.budget, strict=True)]
        p = p[["format", "config", "context", "status", "layers_run", "seconds", "seconds_extrapolated",
               "peak_alloc_bytes", "peak_extrapolated_bytes", "device_bytes", "fits_extrapolated"]]
    return {"decode": grid, "frontier": pd.DataFrame(fr), "batch": batch, "prefill": p, "fullkv_curve": curve}


def prefill_flops(layers: int, heads: int, kv_heads: int, head_dim: int, hidden: int, intermediate: int, vocab: int,
                  n: int) -> dict[str, float]:
    """Matrix-multiply FLOPs of a Llama-style prefill of n tokens (2 per multiply-add), as the project's prefill runs
    it: per layer the q/k/v, o and gate/up/down projections of every token, causal attention (query i reads its i
    keys: QKᵀ and PV over n(n+1)/2 pairs per head), and the LM head of the last token only. Returns
    {'linear', 'attention', 'total'}; `tests/test_analysis_throughput.py` checks 'linear' against torch's
    FlopCounterMode on a real prefill."""
    H, G, d, D, inter, L = heads, kv_heads, head_dim, hidden, intermediate, layers
    linear = L * 2 * n * (D * H * d + 2 * D * G * d + H * d * D + 3 * D * inter) + 2 * D * vocab
    attention = L * 2 * 2 * H * d * (n * (n + 1) / 2)
    return {"linear": float(linear), "attention": float(attention), "total": float(linear + attention)}


def prefill_rates(rows: pd.DataFrame, shape: dict, seconds: str = "prefill_s", layers_run: str | None = None,
                  peak_tflops: float | None = None) -> pd.DataFrame:
    """Achieved TFLOP/s of stored prefill rows: `prefill_flops` of each row's context (over `layers_run` layers
    where the rows were run on a few layers, `bench scale`) over its `seconds` column. shape: the run's
    `meta['shape']` (intermediate and vocab are not row columns). Adds columns flops, attention_share, tflops, and
    mfu = tflops / peak_tflops when a measured matmul rate is given (the run's 'compute' table)."""
    out = rows[rows.status == "ok"].copy()
    flops, share = [], []
    for _, r in out.iterrows():
        L = int(r[layers_run]) if layers_run else int(r.layers)
        f = prefill_flops(L, int(r.heads), int(r.kv_heads), int(r.head_dim), int(r.hidden), shape["intermediate"],
                          shape["vocab"] if not layers_run else 0, int(r.context))
        flops.append(f["total"])
        share.append(f["attention"] / f["total"])
    out["flops"], out["attention_share"] = flops, share
    out["tflops"] = out.flops / out[seconds] / 1e12
    out["mfu"] = out.tflops / peak_tflops if peak_tflops else float("nan")
    return out
