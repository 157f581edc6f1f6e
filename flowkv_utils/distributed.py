"""Sharding a sweep over processes under `torchrun`: one process per GPU (or CPU process), instances split by rank.

- `Shard`: which part of the work this process does — rank r of a world of N processes (`from_env()` reads torchrun's
  RANK, WORLD_SIZE and LOCAL_RANK; a plain run is rank 0 of 1). `shard.take(items)` is the split: round-robin by
  index (items r, r + N, r + 2N, ...), so every item is in exactly one shard and the split depends only on the
  order of the items and N.
- `device_for(device, shard)`: the device a rank uses — `cuda:LOCAL_RANK` when CUDA is asked for, else the CPU.
- `process_group(shard, device)`: the process group (nccl on CUDA, gloo on the CPU), set up only when N > 1. A sweep
  uses it only for barriers (`barrier`): its ranks never exchange data, each appends to its own table. (The
  tensor-parallel command, `tensor_parallel`, sets up the same group for its collectives.)
- `rank_table(path, shard)`: where a rank writes: `table.csv` → `table.rank0-of-2.csv` beside it (a plain run writes
  `table.csv` itself); `rank_tables(path)` finds them again for the merged load (`sweep.load_results`).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun sets in every process it starts
BARRIER_TIMEOUT_S = 7 * 24 * 3600  # the first rank to finish waits at the final barrier for the slowest one


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `world_size` processes; `local_rank` is its index on its host (its GPU there)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self):
        for name in ("rank", "world_size", "local_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}={v!r}: must be an int")
        if self.world_size < 1:
            raise ValueError(f"world_size={self.world_size}: must be ≥ 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank}: must be in [0, world_size={self.world_size})")
        if not 0 <= self.local_rank <= self.rank:
            raise ValueError(f"local_rank={self.local_rank}: must be in [0, rank={self.rank}]")

    @property
    def main(self) -> bool:
        """Rank 0: the one process that reports for all."""
        return self.rank == 0

    @property
    def label(self) -> str:
        return f"rank {self.rank}/{self.world_size}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Shard:
        """This process's shard from torchrun's environment; none of RANK, WORLD_SIZE, LOCAL_RANK set: rank 0 of 1.
        Some but not all set, or values that are not integers, are an error naming them."""
        env = os.environ if env is None else env
        given = {k: env[k] for k in ENV if k in env}
        if not given:
            return cls()
        if len(given) < len(ENV):
            missing = [k for k in ENV if k not in given]
            raise ValueError(f"{', '.join(f'{k}={v}' for k, v in given.items())} set but {', '.join(missing)} "
                             "not: start the processes with torchrun (which sets all of RANK, WORLD_SIZE, "
                             "LOCAL_RANK), or unset them for a single-process run")
        values = {}
        for k, v in given.items():
            try:
                values[k] = int(v)
            except ValueError:
                raise ValueError(f"{k}={v!r} in the environment: must be an integer (set by torchrun)") from None
        return cls(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])

    def take(self, items: Sequence[T]) -> list[T]:
        """This shard's items: every world_size-th one, starting at index rank (round-robin by index)."""
        return list(items[self.rank::self.world_size])


def device_for(device: str | torch.device, shard: Shard) -> torch.device:
    """The device of this rank: "cuda" → cuda:LOCAL_RANK (one GPU per process); any other device as given. With
    more than one process an explicit "cuda:N" is an error (every rank would share that GPU)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    if shard.world_size > 1 and dev.index is not None:
        raise ValueError(f"device={str(device)!r} with {shard.world_size} processes: pass device 'cuda' (each "
                         "rank then uses cuda:LOCAL_RANK), or run a single process")
    index = shard.local_rank if dev.index is None else dev.index
    if not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}: CUDA is not available here; use 'cpu'")
    if index >= torch.cuda.device_count():
        raise ValueError(f"device cuda:{index} ({shard.label}, LOCAL_RANK={shard.local_rank}): this host has "
                         f"{torch.cuda.device_count()} GPU(s); start at most that many processes per node")
    return torch.device("cuda", index)


@contextmanager
def process_group(shard: Shard, device: torch.device,
                  timeout_s: float = BARRIER_TIMEOUT_S) -> Iterator[None]:
    """The torch.distributed process group of a sharded run (nccl on CUDA, gloo on the CPU): a sweep's barriers, or
    the collectives of a tensor-parallel run; a single process sets nothing up. torchrun provides the rendezvous
    (MASTER_ADDR, MASTER_PORT). timeout_s: how long a barrier waits for the slowest rank."""
    if shard.world_size == 1:
        yield
        return
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=shard.rank, world_size=shard.world_size,
                            timeout=_dt.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier(shard: Shard) -> None:
    """Wait until every rank gets here (nothing to wait for in a single process)."""
    if shard.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def rank_table(path: str | Path, shard: Shard) -> Path:
    """The table a rank appends to: `<stem>.rank<r>-of-<N><suffix>` beside `path`; a single process writes `path`."""
    path = Path(path)
    if shard.world_size == 1:
        return path
    return path.with_name(f"{path.stem}.rank{shard.rank}-of-{shard.world_size}{path.suffix}")


def rank_tables(path: str | Path) -> dict[Path, Shard]:
    """The per-rank tables lying beside `path` ({file: the shard that wrote it}), by world size then rank. Files
    moved aside (`results.move_aside`: `<stem>.rank0-of-2.<time>.old.csv`) do not match."""
    path = Path(path)
    pattern = re.compile(re.escape(path.stem) + r"\.rank(\d+)-of-(\d+)" + re.escape(path.suffix) + "$")
    found = {}
    if path.parent.is_dir():
        for p in path.parent.iterdir():
            m = pattern.match(p.name)
            if m:
                if not int(m[1]) < int(m[2]):
                    raise ValueError(f"{p}: rank {m[1]} of a world of {m[2]} processes cannot exist; "
                                     "move the file away")
                found[p] = Shard(int(m[1]), int(m[2]), 0)
    return dict(sorted(found.items(), key=lambda kv: (kv[1].world_size, kv[1].rank)))
