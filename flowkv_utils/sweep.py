"""Accuracy and fidelity versus KV budget: a resumable sweep over (task instance × policy × budget).

Each instance is prefilled ONCE; every policy and budget reuses that prefill (compression happens after it, so
only decoding differs), and only the short answer is decoded (greedy, stopping at the end of the turn).
Every finished point appends its rows to a tidy CSV, one row per metric:

    model, task, instance, context_tokens, policy, budget_tokens, budget_fraction, kept_entries, budget_bytes,
    metric, value, prediction, seed, versions, elapsed_s

- budget_tokens: the budget as given (average kept tokens per KV head, window included), or "full" (`FULL`).
  At "full" every policy is FullKV, so FullKV is decoded once per instance and its rows are written under every
  policy; the policy "fullkv" itself is run at "full" only. A token budget ≥ n also keeps everything: those rows
  reuse the FullKV answer too.
- metric: the task's metric (e.g. contains, string_match_all) and, with fidelity on, `attn_rel_err` (mean over
  layers of ‖O_S − O‖_F/‖O‖_F on the window, renormalised) and `kl_next_token` (mean KL(full ‖ compressed) along
  FullKV's own answer, teacher-forced).
- Crash safety: each row is one complete line written with a single write + fsync; on load a trailing partial
  line is dropped (and cut from the file before appending); a rerun skips the finished
  (model, task, instance, policy, budget_tokens, metric) keys. The same seed gives the same table, bar elapsed_s.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from . import metrics
from .capture import prefill
from .generate import generate, teacher_forced_logits
from .models import shape_of
from .policies import REGISTRY, get_policy
from .tasks import TaskInstance

FULL = "full"  # budget sentinel: the full cache
COLUMNS = ["model", "task", "instance", "context_tokens", "policy", "budget_tokens", "budget_fraction",
           "kept_entries", "budget_bytes", "metric", "value", "prediction", "seed", "versions", "elapsed_s"]
KEY = ["model", "task", "instance", "policy", "budget_tokens", "metric"]
TIMING = ["elapsed_s"]
FIDELITY = ("attn_rel_err", "kl_next_token")
PREDICTION_CHARS = 160
HEADWISE = ("streamingllm", "snapkv", "pyramidkv", "adakv", "criticalkv", "criticaladakv", "cake")


# ------------------------------------------------------------------------------------------------------------
# the crash-safe table


def _complete_text(path: Path) -> str:
    """File content up to its last newline (a trailing partial line, from a crash mid-write, is dropped)."""
    if not path.is_file():
        return ""
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    return data[:cut].decode("utf-8")


def load_results(path: str | Path) -> pd.DataFrame:
    """The results table (every column as written; budget_tokens stays text: ints and "full"), partial last
    line dropped. An empty or missing file gives an empty table with the right columns."""
    text = _complete_text(Path(path))
    if not text.strip():
        return pd.DataFrame(columns=COLUMNS)
    df = pd.read_csv(io.StringIO(text), dtype={"budget_tokens": str, "instance": str, "prediction": str},
                     keep_default_na=False)
    for c in ("value", "budget_fraction", "elapsed_s"):
        df[c] = pd.to_numeric(df[c])
    for c in ("context_tokens", "kept_entries", "budget_bytes", "seed"):
        df[c] = pd.to_numeric(df[c]).astype("int64")
    return df


class ResultsFile:
    """Append-only CSV: the header once, then one complete line per row, each a single os.write + fsync."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = _complete_text(self.path)
        if self.path.is_file() and self.path.stat().st_size != len(text.encode("utf-8")):
            with open(self.path, "r+b") as f:  # cut the partial line a crash left behind
                f.truncate(len(text.encode("utf-8")))
        if text and text.split("\n", 1)[0].split(",") != COLUMNS:
            raise ValueError(f"{self.path} has columns {text.split(chr(10), 1)[0]!r}, expected "
                             f"{','.join(COLUMNS)}: use another results path or delete the file")
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if not text:
            self._write_line(COLUMNS)

    def _write_line(self, values: list) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(values)
        os.write(self.fd, buf.getvalue().encode("utf-8"))
        os.fsync(self.fd)

    def write(self, row: dict) -> None:
        self._write_line([row[c] for c in COLUMNS])

    def close(self) -> None:
        os.close(self.fd)


def done_keys(path: str | Path) -> set[tuple]:
    """The finished (model, task, instance, policy, budget_tokens, metric) keys of a results file."""
    df = load_results(path)
    return set(map(tuple, df[KEY].astype(str).itertuples(index=False))) if len(df) else set()


# ------------------------------------------------------------------------------------------------------------
# the sweep


def versions() -> str:
    import transformers

    return f"torch {torch.__version__}; transformers {transformers.__version__}"


def model_name(model) -> str:
    return shape_of(model).name or type(model).__name__


def _text(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True) if tok is not None else " ".join(map(str, ids))


def _short(text: str) -> str:
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= PREDICTION_CHARS else text[: PREDICTION_CHARS - 1] + "…"


def check_budgets(budgets: Sequence) -> list:
    """Budgets as given: positive ints (tokens per KV head) or "full"; anything else is an error."""
    out = []
    for b in budgets:
        if isinstance(b, str) and b.lower() == FULL:
            out.append(FULL)
        elif isinstance(b, int) and not isinstance(b, bool) and b > 0:
            out.append(int(b))
        else:
            raise ValueError(f"budget {b!r}: budgets are positive token counts per KV head (e.g. 64, 128, ...) "
                             f"or {FULL!r} (the full cache)")
    return out


def plan(policies: Sequence[str], budgets: Sequence) -> list[tuple[str, int | str]]:
    """The (policy, budget) points run for every instance: fullkv at "full" only, the others at every budget."""
    for p in policies:
        if p not in REGISTRY:
            raise ValueError(f"unknown policy {p!r}: registered are {', '.join(REGISTRY)}")
    budgets = check_budgets(budgets)
    return [(p, b) for p in policies for b in budgets if p != "fullkv" or b == FULL]


def run_sweep(model, tok, instances: Sequence[TaskInstance], policies: Sequence[str], budgets: Sequence,
              path: str | Path, seed: int = 0, window: int = 32, fidelity: bool = True,
              policy_params: dict[str, dict] | None = None, kl_tokens: int = 16, progress: bool = True,
              on_row: Callable[[dict], None] | None = None) -> pd.DataFrame:
    """Run every (instance, policy, budget) point not yet in `path`, appending rows; returns the whole table.

    seed: the seed the instances were built with (recorded; also seeds torch). window: observation window of
    the prefill, passed to every policy unless policy_params says otherwise. policy_params: {policy name:
    constructor kwargs}. kl_tokens: length of the teacher-forced continuation (FullKV's answer) for the KL.
    on_row(row) is called after each row is safely on disk (progress displays, tests)."""
    from tqdm import tqdm

    points = plan(policies, budgets)
    policy_params = policy_params or {}
    name, vers = model_name(model), versions()
    done = done_keys(path)

    def metric_names(inst: TaskInstance) -> list[str]:
        return [inst.metric] + (list(FIDELITY) if fidelity else [])

    def finished(inst: TaskInstance, p: str, b) -> bool:
        return all((name, inst.task, inst.instance, p, str(b), m) in done for m in metric_names(inst))

    todo = [(inst, [(p, b) for p, b in points if not finished(inst, p, b)]) for inst in instances]
    total = len(instances) * len(points)
    remaining = sum(len(t) for _, t in todo)
    ctx = _Context(ResultsFile(path), tqdm(total=total, initial=total - remaining, disable=not progress,
                                           desc="sweep", unit="pt"),
                   seed, window, fidelity, policy_params, kl_tokens, name, vers, done, on_row)
    try:
        for inst, pts in todo:
            if pts:
                _run_instance(model, tok, inst, pts, metric_names(inst), ctx)
    finally:
        ctx.bar.close()
        ctx.out.close()
    return load_results(path)


@dataclass
class _Context:
    """What every point of a sweep shares."""

    out: ResultsFile
    bar: object  # tqdm progress bar
    seed: int
    window: int
    fidelity: bool
    policy_params: dict
    kl_tokens: int
    model_name: str
    versions: str
    done: set
    on_row: Callable[[dict], None] | None


@torch.no_grad()
def _run_instance(model, tok, inst: TaskInstance, pts: list, metric_names: list[str], ctx: _Context) -> None:
    """One prefill, FullKV's answer (and fidelity references) once, then every (policy, budget) point."""
    seed, window, fidelity, kl_tokens, name = ctx.seed, ctx.window, ctx.fidelity, ctx.kl_tokens, ctx.model_name
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    pf = prefill(model, inst.prompt_ids, window=window)
    s = pf.shape
    entry_bytes = 2 * s.head_dim * pf.layers[0].k.element_size()  # K and V of one (layer, head, token)
    full_ids = generate(pf, None, inst.max_new_tokens, tok)
    full_text = _text(tok, full_ids)
    full_elapsed = time.perf_counter() - t0
    ref_out, full_tf, cont = None, None, None
    if fidelity:
        cont = torch.tensor((full_ids or [int(pf.logits.argmax())])[:kl_tokens])
        full_tf = teacher_forced_logits(pf, cont, None)
        ref_out = [metrics.window_output(pf, li) for li in range(s.layers)]
    n_all = s.layers * s.kv_heads * pf.n

    for p, b in pts:
        t1 = time.perf_counter()
        result = None
        if p != "fullkv" and b != FULL:
            result = get_policy(p, **{"window": window, **ctx.policy_params.get(p, {})})(pf, b)
            if result.budget.full:
                result = None
        if result is None:  # the full cache: FullKV's answer, zero error by definition
            text, kept, vals = full_text, n_all, {"attn_rel_err": 0.0, "kl_next_token": 0.0}
            elapsed = full_elapsed if p == "fullkv" else time.perf_counter() - t1
        else:
            ids = generate(pf, result, inst.max_new_tokens, tok)
            text, kept, vals = _text(tok, ids), result.total_kept, {}
            if fidelity:
                vals["attn_rel_err"] = float(metrics.attention_output_errors(pf, result.keep, result.values,
                                                                             ref_out).mean())
                vals["kl_next_token"] = metrics.next_token_kl(pf, cont, result, full_tf)
            elapsed = time.perf_counter() - t1
        vals[inst.metric] = metrics.score(inst.metric, text, inst.references,
                                          all_classes=inst.meta.get("all_classes", ()),
                                          cut_first_line=inst.meta.get("cut_first_line", False))
        for m in metric_names:
            if (name, inst.task, inst.instance, p, str(b), m) in ctx.done:  # a point cut short by a crash
                continue
            row = {"model": name, "task": inst.task, "instance": inst.instance, "context_tokens": pf.n,
                   "policy": p, "budget_tokens": str(b), "budget_fraction": kept / n_all, "kept_entries": kept,
                   "budget_bytes": kept * entry_bytes, "metric": m, "value": vals[m],
                   "prediction": _short(text), "seed": seed, "versions": ctx.versions,
                   "elapsed_s": round(elapsed, 3)}
            ctx.out.write(row)
            if ctx.on_row is not None:
                ctx.on_row(row)
        ctx.bar.update(1)


# ------------------------------------------------------------------------------------------------------------
# summaries for the notebook


def budget_value(b: str, full_at: float = math.inf) -> float:
    """Numeric budget of a budget_tokens entry; "full" → full_at (e.g. a position right of the largest)."""
    return full_at if str(b) == FULL else float(b)


def task_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of the task metrics (not the fidelity ones), with a numeric `budget` column (inf for "full")."""
    d = df[~df.metric.isin(FIDELITY)].copy()
    d["budget"] = d.budget_tokens.map(budget_value)
    return d


def accuracy_table(df: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Mean score per (task, policy, budget); metric: a fidelity metric name instead of the task metrics.
    Adds task "average" = unweighted mean over tasks (as LongBench averages datasets)."""
    d = task_rows(df) if metric is None else df[df.metric == metric].assign(
        budget=lambda x: x.budget_tokens.map(budget_value))
    per = d.groupby(["task", "policy", "budget"], as_index=False).agg(value=("value", "mean"),
                                                                       n=("value", "size"),
                                                                       kib=("budget_bytes", "mean"))
    per["kib"] = per["kib"] / 1024
    avg = per.groupby(["policy", "budget"], as_index=False).agg(value=("value", "mean"), n=("n", "sum"),
                                                                 kib=("kib", "mean"))
    avg["task"] = "average"
    return pd.concat([per, avg[per.columns]], ignore_index=True)


def fullkv_accuracy(df: pd.DataFrame) -> pd.Series:
    """FullKV's mean score per task (policy fullkv at budget "full")."""
    d = task_rows(df)
    d = d[(d.policy == "fullkv") & (d.budget_tokens == FULL)]
    return d.groupby("task").value.mean()


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


def claims(df: pd.DataFrame, flowkv: str = "flowkv", baselines: Sequence[str] = HEADWISE) -> dict:
    """Numbers behind method.md §5 claims 3 and 4, computed from the table (finite budgets only).

    Claim 3 (FlowKV beats the head-wise baselines): over the (task, budget) `cells`, how often FlowKV's mean
    accuracy is above (`wins`), equal to (`ties`) or below (`losses`) the best baseline's; mean accuracy over
    budgets of FlowKV vs the best baseline. `fidelity_leader`: per fidelity metric in the table, the policy (of
    FlowKV and the baselines) with the lowest task-averaged value at each budget.
    Claim 4 (the gap widens as the budget shrinks): on the task-averaged curve, the advantage
    adv(B) = acc_FlowKV(B) − max_baseline acc(B) per budget (smallest first), its Spearman correlation with
    the budget (negative = widens as the budget shrinks), and at the smallest budget the accuracy losses
    (FullKV − accuracy) of FlowKV and of the best baseline, and their ratio (> 1: FlowKV loses less)."""
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
    leaders = {}
    for m in FIDELITY:
        fid = accuracy_table(df, metric=m) if (df.metric == m).any() else None
        if fid is not None:
            fid = fid[(fid.task == "average") & fid.budget.map(math.isfinite) & fid.policy.isin([flowkv] + base)]
            leaders[m] = [str(g.loc[g.value.idxmin(), "policy"]) for _, g in fid.groupby("budget")]
    return {
        "flowkv": flowkv, "baselines": base, "fullkv": full, "fidelity_leader": leaders,
        "budgets": [int(b) for b in avg.index], "advantage": [float(a) for a in adv.values],
        "best_baseline_per_budget": [str(avg.loc[b, base].astype(float).idxmax()) for b in avg.index],
        "wins": wins, "ties": ties, "losses": int(len(cells)) - wins - ties, "cells": int(len(cells)),
        "mean_flowkv": float(mean_acc[flowkv]), "best_baseline": str(mean_acc[base].idxmax()),
        "mean_best_baseline": float(mean_acc[base].max()),
        "smallest_budget": int(smallest), "loss_flowkv_smallest": float(loss_f.loc[smallest]),
        "loss_baseline_smallest": float(loss_b.loc[smallest]),
        "loss_ratio_smallest": float(loss_b.loc[smallest] / loss_f.loc[smallest]) if loss_f.loc[smallest] > 0
        else float("inf") if loss_b.loc[smallest] > 0 else 1.0,
        "spearman_adv_vs_log_budget": rho,
    }


def plot_curves(ax, table: pd.DataFrame, task: str = "average", x: str = "budget",
                policies: Sequence[str] | None = None, logx: bool = True, full_x: float | None = None,
                reference: bool = True) -> None:
    """One line per policy (project colours/markers) of an `accuracy_table` for one task, against x = "budget"
    (tokens per KV head) or "kib" (KiB of KV kept); with `reference`, FullKV as a dashed line (and, with full_x,
    as a point: at x = full_x for budgets, at its own size for "kib")."""
    from . import plots

    t = table[table.task == task]
    fin = t[t.budget.map(math.isfinite)]
    for p in policies or list(dict.fromkeys(t.policy)):
        g = fin[fin.policy == p].sort_values(x)
        if p == "fullkv" or g.empty:
            continue
        ax.plot(g[x], g.value, marker=plots.policy_marker(p), color=plots.policy_color(p), lw=1.4, ms=5,
                label=plots.policy_label(p))
    full = t[(t.policy == "fullkv") & ~t.budget.map(math.isfinite)]
    if reference and len(full):
        ax.axhline(full.value.mean(), color=plots.policy_color("fullkv"), ls="--", lw=1, label="FullKV")
        if full_x is not None:
            ax.plot([full_x if x == "budget" else full[x].mean()], [full.value.mean()], "o",
                    color=plots.policy_color("fullkv"))
    if logx:
        ax.set_xscale("log", base=2)
