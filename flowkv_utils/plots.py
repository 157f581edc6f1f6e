"""Figure helpers: one style, one way to save (PNG + PDF into figures/), a caption line with model and budget."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt

# one colour and marker per policy, so every figure of the project reads the same
POLICY_STYLE = {
    "fullkv": ("black", "o"), "streamingllm": ("#8c8c8c", "v"), "snapkv": ("#1f77b4", "s"),
    "pyramidkv": ("#17becf", "^"), "adakv": ("#2ca02c", "D"), "criticalkv": ("#bcbd22", "P"),
    "criticaladakv": ("#9edae5", "p"), "cake": ("#9467bd", "X"), "flowkv": ("#d62728", "*"),
    "flowkv_global": ("#ff7f0e", "h"), "smoothevict": ("#e377c2", "d"),
    "h2o": ("#8c564b", "<"), "tova": ("#637939", ">"), "keydiff": ("#7b4173", "H"),
    "defensivekv": ("#e7969c", ">"), "layer_defensivekv": ("#c49c94", "<"), "lava": ("#393b79", "8"),
    # FlowKV's ablations (role "ablation", drawn dotted): muted reds for the layer-wise, browns for the global form
    "flowkv_pool7": ("#d98c8c", "s"), "flowkv_no_cross": ("#c27070", "^"), "flowkv_per_head": ("#a85858", "v"),
    "flowkv_l1": ("#e0a8a8", "D"), "flowkv_sinks4": ("#8f4a4a", "P"),
    "flowkv_global_n0": ("#e8b07a", "s"), "flowkv_global_n1": ("#cc9460", "^"),
    "flowkv_global_n3": ("#b07a48", "v"), "flowkv_global_floor4": ("#8c6035", "P"),
}
POLICY_LABEL = {
    "fullkv": "FullKV", "streamingllm": "StreamingLLM", "snapkv": "SnapKV", "pyramidkv": "PyramidKV",
    "adakv": "AdaKV", "criticalkv": "CriticalKV", "criticaladakv": "CriticalAdaKV", "cake": "CAKE",
    "flowkv": "FlowKV (derived, layer-wise)", "flowkv_global": "FlowKV (derived, global)",
    "smoothevict": "SmoothEvict (project interpretation)",
    "h2o": "H2O", "tova": "TOVA", "keydiff": "KeyDiff",
    "defensivekv": "DefensiveKV", "layer_defensivekv": "Layer-DefensiveKV", "lava": "LAVa",
    "flowkv_pool7": "FlowKV ablation: max-pooled, k = 7", "flowkv_no_cross": "FlowKV ablation: no cross terms",
    "flowkv_per_head": "FlowKV ablation: per-head products", "flowkv_l1": "FlowKV ablation: L1 norm",
    "flowkv_sinks4": "FlowKV ablation: 4 sinks", "flowkv_global_n0": "FlowKV global ablation: N0, raw",
    "flowkv_global_n1": "FlowKV global ablation: N1, output norm",
    "flowkv_global_n3": "FlowKV global ablation: N3, layer sum 1",
    "flowkv_global_floor4": "FlowKV global ablation: floor 4",
}


# methods that are not eviction policies (no registry entry) but are drawn beside them: block-sparse decode
# (`blocksparse.PageDecode`, the rows of `bench gpu --pages`)
COMPARATOR_STYLE = {"quest": ("#117a65", "X")}
COMPARATOR_LABEL = {"quest": "block-sparse (Quest-style)"}


def figures_dir() -> Path:
    """$FLOWKV_FIGURES, else the repo's figures/ (found from this file), else ./figures."""
    env = os.environ.get("FLOWKV_FIGURES")
    if env:
        d = Path(env)
    else:
        repo = Path(__file__).resolve().parent.parent
        d = repo / "figures" if (repo / "pyproject.toml").exists() else Path("figures")
    d.mkdir(parents=True, exist_ok=True)
    return d


def style() -> None:
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", font_scale=0.95)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight",
                         "axes.titlesize": 11, "axes.titleweight": "bold"})


def caption(fig, text: str) -> None:
    """A small caption line under the axes (model, budget, data) — every figure carries one."""
    fig.text(0.01, -0.02, text, fontsize=8, color="#444444", ha="left", va="top")


def save_figure(fig, notebook: str, name: str, formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """Save to figures/<notebook>_<name>.{png,pdf}; returns the paths."""
    out = []
    for ext in formats:
        p = figures_dir() / f"{notebook}_{name}.{ext}"
        # no creation date in PDFs: rerunning a notebook leaves unchanged figures byte-identical in git
        fig.savefig(p, metadata={"CreationDate": None} if ext == "pdf" else None)
        out.append(p)
    return out


def _style(name: str) -> tuple[str, str]:
    return POLICY_STYLE.get(name) or COMPARATOR_STYLE.get(name, ("#333333", "o"))


def policy_color(name: str) -> str:
    return _style(name)[0]


def policy_marker(name: str) -> str:
    return _style(name)[1]


def policy_label(name: str) -> str:
    return POLICY_LABEL.get(name) or COMPARATOR_LABEL.get(name, name)


def policy_linestyle(name: str) -> str:
    """Dotted for FlowKV's ablations (role "ablation"), solid for every other policy (and unknown names)."""
    from .policies import REGISTRY  # here: importing the plots needs no torch

    cls = REGISTRY.get(name)
    return ":" if cls is not None and cls.role == "ablation" else "-"


def plot_curves(ax, table, task: str = "average", x: str = "budget",
                policies: Sequence[str] | None = None, logx: bool = True, full_x: float | None = None,
                reference: bool = True) -> None:
    """One line per policy (project colours/markers) of an `accuracy_table` for one task, against x = "budget"
    (tokens per KV head) or "kib" (KiB of KV kept); with `reference`, FullKV as a dashed line (and, with full_x,
    as a point: at x = full_x for budgets, at its own size for "kib"). A table with `low`/`high` columns
    (`analysis.accuracy_table(..., ci=True)`) also gets each curve's interval as a light band."""
    t = table[table.task == task]
    fin = t[t.budget.map(math.isfinite)]
    for p in policies or list(dict.fromkeys(t.policy)):
        g = fin[fin.policy == p].sort_values(x)
        if p == "fullkv" or g.empty:
            continue
        ax.plot(g[x], g.value, marker=policy_marker(p), color=policy_color(p), ls=policy_linestyle(p), lw=1.4,
                ms=5, label=policy_label(p))
        if "low" in g and g.low.notna().any():  # the table's 95 % interval (accuracy_table(..., ci=True))
            ax.fill_between(g[x], g.low, g.high, color=policy_color(p), alpha=0.12, lw=0)
    full = t[(t.policy == "fullkv") & ~t.budget.map(math.isfinite)]
    if reference and len(full):
        ax.axhline(full.value.mean(), color=policy_color("fullkv"), ls="--", lw=1, label="FullKV")
        if full_x is not None:
            ax.plot([full_x if x == "budget" else full[x].mean()], [full.value.mean()], "o",
                    color=policy_color("fullkv"))
    if logx:
        ax.set_xscale("log", base=2)


def metric_panels(runs: Sequence[tuple[str, object, Sequence[str]]], metrics: Sequence[str]):
    """One row of panels per run (label, sweep table, policies), one panel per metric ("accuracy", with its 95 %
    bands and FullKV, or a fidelity metric on a log axis) of the task-averaged curves; returns (fig, axes (R, M)).
    Each row's legend sits right of its last panel."""
    from . import analysis  # tables → figures: the summaries come from analysis

    fig, axes = plt.subplots(len(runs), len(metrics), figsize=(4.4 * len(metrics) + 2, 3.6 * len(runs)),
                             squeeze=False, layout="constrained")
    for row, (label, rows, policies) in zip(axes, runs, strict=True):
        for ax, m in zip(row, metrics, strict=True):
            acc = m == "accuracy"
            plot_curves(ax, analysis.accuracy_table(rows, metric=None if acc else m, ci=acc), "average",
                        policies=policies, reference=acc)
            ax.set(xlabel=f"budget ({analysis.budget_unit(rows.budget)})", ylabel=m,
                   yscale="linear" if acc else "log")
        row[0].set_title(label, loc="left", fontsize=9)
        row[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7)
    return fig, axes
