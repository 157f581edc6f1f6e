"""Analysis: the numbers notebooks state, computed from tidy result tables (notebooks only format them).

Two modules, one job each: `accuracy` (sweep tables: accuracy with intervals, AUC, claims, the study's cells and
budget-to-match; notebook 03) and `throughput` (bench tables: bars against targets, OOM frontier, comparators,
peers, scale, prefill FLOPs; notebook 04). Every name is importable from `flowkv_utils.analysis` as before.
"""

# the head-wise baselines the claims compare with (notebook 03 reads analysis.BASELINES)
from ..policies import BASELINES
from .accuracy import (
    BUDGET_UNITS,
    CI_LEVEL,
    CI_RESAMPLES,
    FIDELITY,
    IDENTITY,
    LENGTH_ID,
    SOLVED,
    accuracy_table,
    auc_table,
    best_baseline,
    bootstrap_mean_ci,
    budget_to_match,
    budget_unit,
    budget_value,
    cell_length,
    cell_of,
    cells_by_length,
    check_single_run,
    claims,
    complete_instances,
    fidelity_accuracy_correlation,
    fullkv_accuracy,
    fullkv_rows,
    head_to_head,
    kv_layout,
    paired_difference,
    run_label,
    solved_cells,
    solved_rows,
    task_rows,
)
from .throughput import (
    GAPS,
    H200_TARGETS,
    SCORING_CONTEXT,
    TARGET_SENSE,
    THROUGHPUT_TARGETS,
    H200Targets,
    ThroughputTargets,
    attention_kernels,
    bars,
    comparison_table,
    config_label,
    h200_bars,
    oom_frontier,
    prefill_flops,
    prefill_rates,
    profile_groups,
    scale_tables,
    targets_table,
    weight_format_of,
)

__all__ = ["H200_TARGETS", "H200Targets", "BASELINES", "BUDGET_UNITS", "CI_LEVEL", "CI_RESAMPLES", "FIDELITY", "GAPS", "IDENTITY", "LENGTH_ID",
           "SCORING_CONTEXT", "SOLVED", "TARGET_SENSE", "THROUGHPUT_TARGETS", "ThroughputTargets",
           "accuracy_table", "attention_kernels", "auc_table", "bars", "h200_bars", "best_baseline", "bootstrap_mean_ci",
           "budget_to_match", "budget_unit", "budget_value", "cell_length", "cell_of", "cells_by_length",
           "check_single_run", "claims", "comparison_table", "complete_instances", "config_label", "fidelity_accuracy_correlation",
           "fullkv_accuracy", "fullkv_rows", "head_to_head", "kv_layout", "oom_frontier", "paired_difference",
           "prefill_flops", "prefill_rates", "profile_groups", "run_label", "scale_tables", "solved_cells", "solved_rows",
           "targets_table", "task_rows", "weight_format_of"]
