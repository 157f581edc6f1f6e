"""A sweep sharded over processes: the split by rank (every instance once, deterministic), the shard from torchrun's
environment, per-rank table names, the merged load (duplicates across shards and mixed world sizes are errors, a torn
last line is dropped), resuming a crashed shard, the command's clear errors, and a real 2-process gloo run under
torchrun whose merged table equals the single-process table."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flowkv_utils import analysis, distributed, sweep, sweep_cli
from flowkv_utils.distributed import Shard
from flowkv_utils.models import random_model
from flowkv_utils.results import REPO, TableError
from flowkv_utils.tasks import TaskInstance

pytestmark = pytest.mark.usefixtures("one_thread")  # sweeps here and in the subprocesses run on one thread
POLICIES, BUDGETS = ["fullkv", "snapkv"], [12, "full"]
COMPARED = sweep.KEY + ["value", "prediction"]  # every column but the timing and the versions text


@pytest.fixture(scope="module")
def tiny(one_thread):
    """A random-weight model and 5 tiny instances (tok None: predictions are token ids)."""
    model = random_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8, vocab=128, seed=0)
    g = torch.Generator().manual_seed(0)
    insts = []
    for i in range(5):
        ids = torch.randint(0, 128, (1, 40 + 4 * i), generator=g)
        insts.append(TaskInstance("tiny", f"i{i}", ids, [str(int(ids[0, 5]))], 3, "contains"))
    return model, insts


def _sweep(tiny, path, shard=None, on_row=None):
    model, insts = tiny
    return sweep.run_sweep(model, None, insts, POLICIES, BUDGETS, path, window=8, progress=False, shard=shard,
                           on_row=on_row)


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    key = lambda df: df[COMPARED].sort_values(sweep.KEY).reset_index(drop=True)
    pd.testing.assert_frame_equal(key(a), key(b))


@pytest.fixture(scope="module")
def single(tiny, tmp_path_factory):
    """The single-process table of the tiny sweep."""
    path = tmp_path_factory.mktemp("single") / "t.csv"
    return _sweep(tiny, path)


# ------------------------------------------------------------------------------------------------ the split


@given(n=st.integers(0, 40), world=st.integers(1, 9))
def test_split_takes_every_item_exactly_once_round_robin(n, world):
    items = [f"x{i}" for i in range(n)]
    shards = [Shard(r, world, r).take(items) for r in range(world)]
    assert sorted(sum(shards, [])) == sorted(items)  # every item, none twice
    for r, part in enumerate(shards):
        assert part == [items[i] for i in range(n) if i % world == r]  # round-robin by index, order kept
        assert Shard(r, world, r).take(items) == part  # deterministic


def test_shard_from_the_torchrun_environment():
    assert Shard.from_env({}) == Shard(0, 1, 0)  # a plain run
    assert Shard.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Shard(3, 4, 1)
    with pytest.raises(ValueError, match="RANK=1 set but WORLD_SIZE, LOCAL_RANK not"):
        Shard.from_env({"RANK": "1"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two'.*integer"):
        Shard.from_env({"RANK": "0", "WORLD_SIZE": "two", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match=r"rank=2: must be in \[0, world_size=2\)"):
        Shard.from_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="world_size=0"):
        Shard(0, 0)


def test_device_of_a_rank():
    assert distributed.device_for("cpu", Shard(1, 2, 1)) == torch.device("cpu")
    with pytest.raises(ValueError, match="device='cuda:1' with 2 processes: pass device 'cuda'"):
        distributed.device_for("cuda:1", Shard(1, 2, 1))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            distributed.device_for("cuda", Shard(0, 2, 0))


def test_rank_table_names(tmp_path):
    path = tmp_path / "t.csv"
    assert distributed.rank_table(path, Shard()) == path  # a single process writes the table itself
    names = [distributed.rank_table(path, Shard(r, 2, r)) for r in range(2)]
    assert [p.name for p in names] == ["t.rank0-of-2.csv", "t.rank1-of-2.csv"]
    for p in [*names, tmp_path / "t.rank0-of-2.20260101T000000.old.csv", tmp_path / "u.rank0-of-2.csv"]:
        p.write_text("")
    assert distributed.rank_tables(path) == {names[0]: Shard(0, 2), names[1]: Shard(1, 2)}  # not moved-aside ones
    (tmp_path / "t.rank2-of-2.csv").write_text("")
    with pytest.raises(ValueError, match="rank 2 of a world of 2 processes cannot exist"):
        distributed.rank_tables(path)


# ----------------------------------------------------------------------------------- merge, resume, errors


def test_shards_merge_to_the_single_process_table_and_a_crashed_shard_resumes(tiny, single, tmp_path):
    path = tmp_path / "t.csv"
    parts = [_sweep(tiny, path, Shard(r, 2, r)) for r in range(2)]  # the ranks need no process group
    assert sorted(parts[0].instance.unique()) == ["i0", "i2", "i4"] and sorted(parts[1].instance.unique()) == ["i1",
                                                                                                              "i3"]
    assert not path.exists() and sweep.table_files(path) == [tmp_path / "t.rank0-of-2.csv",
                                                             tmp_path / "t.rank1-of-2.csv"]
    _same(sweep.load_results(path), single)
    # rank 1 killed mid-write: its last instance's rows lost, a torn line left; the load drops the torn line
    rank1 = tmp_path / "t.rank1-of-2.csv"
    lines = rank1.read_bytes().split(b"\n")
    per_instance = len(parts[1]) // 2
    rank1.write_bytes(b"\n".join(lines[: 1 + per_instance]) + b"\n" + lines[1 + per_instance][:30])
    assert len(sweep.load_results(path)) == len(single) - per_instance
    rows = []
    _sweep(tiny, path, Shard(1, 2, 1), on_row=rows.append)  # the same command again: only what is missing
    assert len(rows) == per_instance and {r["instance"] for r in rows} == {"i3"}
    _sweep(tiny, path, Shard(0, 2, 0), on_row=rows.append)
    assert len(rows) == per_instance  # rank 0 had finished: nothing to redo
    _same(sweep.load_results(path), single)
    # a single-process rerun on the same path reuses the rank tables' points too (it writes `path` itself)
    _sweep(tiny, path, on_row=rows.append)
    assert len(rows) == per_instance and sweep.table_files(path)[0] == path


def test_merge_refuses_duplicates_across_shards_and_mixed_world_sizes(tiny, single, tmp_path):
    path = tmp_path / "t.csv"
    _sweep(tiny, path, Shard(0, 2, 0))
    rank0, rank1 = tmp_path / "t.rank0-of-2.csv", tmp_path / "t.rank1-of-2.csv"
    lines = rank0.read_text().split("\n")
    rank1.write_text("\n".join(lines[:2]) + "\n")  # rank 1 holding a point of rank 0
    with pytest.raises(TableError, match=f"2 rows share a key across {rank0}, {rank1}"):
        sweep.load_results(path)
    rank1.unlink()
    (tmp_path / "t.rank0-of-3.csv").write_text(lines[0] + "\n")
    with pytest.raises(TableError, match=r"runs with 2 and 3 processes .*t.rank0-of-2.csv, t.rank0-of-3.csv"):
        sweep.load_results(path)
    with pytest.raises(ValueError, match="3 processes, but rank tables of another number of processes .*"
                                         "t.rank0-of-2.csv.*resume with that many"):
        _sweep(tiny, path, Shard(0, 3, 0))
    with pytest.raises(ValueError, match="fresh=True in a sharded run"):
        sweep.run_sweep(tiny[0], None, tiny[1], POLICIES, BUDGETS, path, window=8, progress=False, fresh=True,
                        shard=Shard(0, 2, 0))
    moved = sweep.move_tables_aside(path)  # what --fresh does once, on rank 0
    assert [old.name for old, _ in moved] == ["t.rank0-of-2.csv", "t.rank0-of-3.csv"]
    assert all(new.exists() and not old.exists() for old, new in moved) and len(sweep.load_results(path)) == 0


def test_command_errors_are_one_line_naming_the_value(monkeypatch, capsys, tmp_path):
    for k in distributed.ENV:
        monkeypatch.delenv(k, raising=False)
    for args, match in ((["--budgte", "64"], "unrecognized arguments: --budgte"),
                        (["--budgets", "0"], "argument --budgets: budget=0: must be a positive token count")):
        with pytest.raises(SystemExit) as e:
            sweep_cli.main(["--table", str(tmp_path / "t.csv"), *args])
        assert e.value.code == 2 and match in capsys.readouterr().err
    table = ["--table", str(tmp_path / "t.csv")]
    cases = [({}, ["--policies", "nope"], "unknown policy 'nope'"),
             ({}, ["--ruler-tasks", "vt"], r"--ruler-lengths \[1024, 512\]: give one length per task"),
             ({}, ["--ruler-per-length", "0"], r"--ruler-per-length 0: must be ≥ 1"),
             ({"RANK": "0"}, [], "RANK=0 set but WORLD_SIZE, LOCAL_RANK not"),
             ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, ["--device", "cuda:0"],
              r"\(rank 1/2\): error: device='cuda:0' with 2 processes")]
    for env, args, match in cases:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert sweep_cli.main(table + args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().split("\n")) == 1 and re.search(match, err), err
        for k in env:
            monkeypatch.delenv(k)
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.model
def test_ruler_grid_and_haystack_name_the_instances(embedded):
    """--ruler-grid runs every task at every length; --haystack reaches NIAH and RULER's haystack tasks (and names
    them), not the word-list tasks."""
    tok = embedded[1]
    a = sweep_cli.parser().parse_args(["--table", "t.csv", "--niah-lengths", "300", "--niah-depths", "0.5",
                                       "--ruler-tasks", "niah_single", "fwe", "--ruler-lengths", "300", "400",
                                       "--ruler-grid", "--ruler-per-length", "2", "--haystack", "essay"])
    insts = sweep_cli.task_instances(a, tok)
    cells = [(i.task, i.prompt_ids.shape[-1] <= n) for i, n in zip(insts, [300] + [300, 300, 400, 400] * 2, strict=True)]
    assert [t for t, _ in cells] == ["niah_essay"] + ["ruler_niah_single_essay"] * 4 + ["ruler_fwe"] * 4
    assert all(fits for _, fits in cells) and len({i.instance for i in insts[1:5]}) == 4


@pytest.mark.model
def test_solved_only_runs_the_policies_on_the_cells_fullkv_solves(monkeypatch, capsys, tmp_path):
    """--solved-only: FullKV on every instance first, its accuracy per (task, length) cell printed, the other
    policies only where it reaches the threshold (whichever cells those are on this model)."""
    for k in distributed.ENV:
        monkeypatch.delenv(k, raising=False)
    table = tmp_path / "s.csv"
    args = ["--table", str(table), "--niah-lengths", "--ruler-tasks", "niah_single", "niah_multivalue",
            "--ruler-lengths", "300", "--ruler-grid", "--ruler-per-length", "2", "--policies", "fullkv", "snapkv",
            "--budgets", "64", "full", "--window", "16", "--no-fidelity", "--solved-only", "0.75"]
    assert sweep_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "FullKV per (task, length) cell (solved: ≥ 0.75):" in out
    df = analysis.cells_by_length(sweep.load_results(table))
    full = df[df.policy == "fullkv"].groupby("task").value.mean()
    assert set(full.index) == {"ruler_niah_single @300", "ruler_niah_multivalue @300"}
    for cell, acc in full.items():
        assert f"{cell}" in out
        ran = df[(df.task == cell) & (df.policy == "snapkv") & (df.budget == "64")]
        assert len(ran) == (2 if acc >= 0.75 else 0), (cell, acc)
    assert sweep_cli.main(args[:-1] + ["1.5"]) == 2
    assert "--solved-only 1.5: an accuracy in [0, 1]" in capsys.readouterr().err


# --------------------------------------------------------------------------------- a real 2-process run


@pytest.mark.model
def test_torchrun_two_processes_give_the_single_process_table(monkeypatch, capsys, tmp_path):
    """The same command, once in this process and once under torchrun with 2 gloo processes on the CPU (3 NIAH
    instances of ~250 tokens on the embedded model: rank 0 runs two, rank 1 one): equal merged tables."""
    args = ["--niah-lengths", "256", "--niah-depths", "0.2", "0.5", "0.8", "--ruler-tasks", "--ruler-lengths",
            "--policies", "fullkv", "snapkv", "--budgets", "64", "full", "--window", "16", "--threads", "1"]
    for k in distributed.ENV:
        monkeypatch.delenv(k, raising=False)
    assert sweep_cli.main(["--table", str(tmp_path / "one.csv"), *args]) == 0
    assert "merged table" in capsys.readouterr().out
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "flowkv_utils.sweep_cli", "--table", str(tmp_path / "two.csv"), *args],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 0/2 on cpu: 2 of 3 instances" in run.stdout and "rank 1/2 on cpu: 1 of 3 instances" in run.stdout
    one, two = sweep.load_results(tmp_path / "one.csv"), sweep.load_results(tmp_path / "two.csv")
    assert f"merged table {tmp_path / 'two.csv'}: {len(one)} rows from 2 file(s) (two.rank0-of-2.csv, " \
           "two.rank1-of-2.csv)" in run.stdout
    assert len(one) == 3 * 3 * (1 + len(sweep.FIDELITY)) and one.value[one.metric == "contains"].sum() >= 3  # FullKV finds the needles
    _same(one, two)
