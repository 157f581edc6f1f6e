"""Tidy result tables: the one writer and loader every sweep and benchmark uses.

- `environment()`: the metadata columns every row carries (device, versions, date, command, git).
- `TableFile`: an append-only CSV with a fixed schema. Each row is one complete line written with a single
  os.write + fsync, so a crash leaves at most one torn last line, which is dropped on load and cut before the next
  append. A file that is not a table of this schema is refused *untouched*, naming its path and what is wrong
  (line and column for bad values). One writer at a time: a lock file `<table>.lock` holds the writer's pid; a
  second writer gets an error naming it, a lock left by a dead process is taken over (and said so).
- `read_table()`: the validated loader (typed columns; duplicate keys are an error, never silently pooled);
  `read_tables()` loads several tables of one schema as one (a sharded sweep's per-rank tables), a key in two files
  being an error naming them.
- `Recorder`: a folder of named tables (the benchmarks), each a `TableFile`, plus a `meta.json`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gzip
import io
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
META = ["device", "device_name", "torch", "transformers", "triton", "date", "command", "git"]


def git_describe() -> str:
    """`git describe --always --dirty` of the repository ('-dirty': the run used uncommitted changes), or
    $FLOWKV_GIT where set: a copy of the working tree whose .git is not the tree's own (a lent device's checkout)
    says the commit it runs that way."""
    if os.environ.get("FLOWKV_GIT"):
        return os.environ["FLOWKV_GIT"]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:  # pragma: no cover - no git
        return ""


def versions() -> dict[str, str]:
    """torch, transformers and triton versions ('' where not installed)."""
    import torch

    out = {"torch": torch.__version__, "transformers": "", "triton": ""}
    for mod in ("transformers", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    return out


def environment(command: str | None = None) -> dict:
    """The metadata every row carries: device, device name, versions, date, command, git."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if dev == "cuda" else (platform.processor() or platform.machine())
    cmd = command or "python -m " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).stem, *sys.argv[1:]])
    return {"device": dev, "device_name": name, **versions(),
            "date": _dt.datetime.now().isoformat(timespec="seconds"), "command": cmd, "git": git_describe()}


class TableError(ValueError):
    """A file that is not a valid table of the expected schema (the message names the file and where)."""


def _read_text(path: Path) -> tuple[str, bool]:
    """(complete lines of the file, whether a torn last line was dropped). Refuses non-UTF-8 bytes. A `.gz` file
    (a stored table compressed for the repository: `gzip -9 table.csv`) is read through gzip."""
    if not path.exists():
        return "", False
    if not path.is_file():
        raise TableError(f"{path}: not a regular file")
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise TableError(f"{path}: not a gzip-compressed table ({e})") from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise TableError(f"{path}: not a results table (not UTF-8 text: bad byte at line {line})") from None
    cut = data.rfind(b"\n") + 1
    return data[:cut].decode("utf-8"), cut != len(data)


def _check_header(path: Path, text: str, columns: Sequence[str], torn: bool) -> None:
    if not text:
        if torn:  # bytes but not one complete line: a header would end with a newline
            raise TableError(f"{path}: not a results table (no complete header line; expected columns "
                             f"{','.join(columns)}); use another path or move the file away")
        return
    header = next(csv.reader([text.split("\n", 1)[0]]))
    if header != list(columns):
        raise TableError(f"{path}: not a table of this schema: its columns are {','.join(header)!r}, expected "
                         f"{','.join(columns)!r}; use another path or move the file away")


def _empty(columns: Sequence[str], numeric: Sequence[str], integer: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64" if c in numeric else "int64" if c in integer else "object")
                         for c in columns})


def read_table(path: str | Path, columns: Sequence[str], numeric: Sequence[str] = (), integer: Sequence[str] = (),
               key: Sequence[str] | None = None) -> pd.DataFrame:
    """Load a table written by `TableFile`: complete lines only (a torn last line is dropped), the schema checked,
    `numeric`/`integer` columns parsed (a bad value names the file, line and column), other columns kept as text;
    with `key`, duplicate keys are an error. A missing or empty file gives an empty table with the columns."""
    path = Path(path)
    text, torn = _read_text(path)
    _check_header(path, text, columns, torn)
    if not text.strip():
        return _empty(columns, numeric, integer)
    df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    for c in (*numeric, *integer):
        vals = pd.to_numeric(df[c].replace("", "nan"), errors="coerce")
        bad = vals.isna() & ~df[c].isin(["", "nan", "NaN"])
        if c in integer:
            bad |= vals.isna() | (vals % 1 != 0)
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            raise TableError(f"{path}, line {i + 2}, column {c!r}: {df[c].iloc[i]!r} is not "
                             f"{'an integer' if c in integer else 'a number'}")
        df[c] = vals.astype("int64") if c in integer else vals.astype("float64")
    if key:
        dup = df.duplicated(list(key), keep=False)
        if dup.any():
            i = int(dup.to_numpy().nonzero()[0][0])
            raise TableError(f"{path}: {int(dup.sum())} rows share a key (first at line {i + 2}: "
                             f"{dict(df.loc[df.index[i], list(key)])}); a table has one row per key — "
                             "was it written by two processes at once?")
    return df


def read_tables(paths: Sequence[str | Path], columns: Sequence[str], numeric: Sequence[str] = (),
                integer: Sequence[str] = (), key: Sequence[str] | None = None) -> pd.DataFrame:
    """Several tables of one schema as one (`read_table` on each, in the order given, so a torn last line of each
    is dropped); with `key`, a key held by two files is an error naming both (a table has one row per key)."""
    frames = [read_table(p, columns, numeric, integer, key) for p in paths]
    if not frames:
        return _empty(columns, numeric, integer)
    source = [str(p) for p, f in zip(paths, frames, strict=True) for _ in range(len(f))]  # each row's file
    frames = [f for f in frames if len(f)] or frames[:1]
    df = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    if key and len(frames) > 1:
        dup = df.duplicated(list(key), keep=False)
        if dup.any():
            first = df.loc[dup, list(key)].iloc[0]
            same = dup & (df[list(key)] == first).all(axis=1)
            files = list(dict.fromkeys(s for s, d in zip(source, same, strict=True) if d))
            raise TableError(f"{int(dup.sum())} rows share a key across {', '.join(files)} (first: "
                             f"{dict(first)}); the tables of one sweep hold each key once — was one point run "
                             "by two processes?")
    return df


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TableLock:
    """`<path>.lock` holding 'pid host': one writer per table. A lock of a dead process on this host is stale."""

    def __init__(self, path: Path):
        self.path = path.with_name(path.name + ".lock")
        self.held = False

    def acquire(self) -> None:
        me = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    pid_s, host = (self.path.read_text().split() + ["", ""])[:2]
                    pid = int(pid_s)
                except (OSError, ValueError):
                    pid, host = -1, ""
                if host == socket.gethostname() and pid > 0 and not _pid_alive(pid):
                    warnings.warn(f"{self.path}: stale lock of process {pid} (no longer running) taken over",
                                  stacklevel=3)
                    self.path.unlink(missing_ok=True)
                    continue
                raise TableError(f"{self.path.with_suffix('')}: another writer holds it (process {pid} on "
                                 f"{host or '?'}, lock file {self.path}); wait for it to finish, or delete the lock "
                                 "file if that process is gone") from None
            os.write(fd, me.encode())
            os.close(fd)
            self.held = True
            return

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


class TableFile:
    """Append-only CSV with a fixed schema (see the module docstring): validated on open, locked while open."""

    def __init__(self, path: str | Path, columns: Sequence[str], lock: bool = True):
        self.path = Path(path)
        self.columns = list(columns)
        if self.path.suffix == ".gz":
            raise TableError(f"{self.path}: a compressed table is a read-only archive; write to a .csv table (and "
                             "gzip it when it is complete)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TableError(f"{self.path}: cannot create its folder ({e.strerror})") from None
        self.lock = TableLock(self.path) if lock else None
        if self.lock:
            self.lock.acquire()
        try:
            text, torn = _read_text(self.path)
            _check_header(self.path, text, self.columns, torn)  # refuse a foreign file before touching it
            if torn:  # cut the partial line a crash left behind (the file is a table of this schema)
                with open(self.path, "r+b") as f:
                    f.truncate(len(text.encode("utf-8")))
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            self.close()
            raise TableError(f"{self.path}: cannot write ({e.strerror})") from None
        except BaseException:
            self.close()
            raise
        if not text:
            self._write_line(self.columns)

    def _write_line(self, values: list) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(values)
        self._append(buf.getvalue())

    def _append(self, text: str) -> None:
        data = memoryview(text.encode("utf-8"))
        while data:  # os.write may write less than asked
            data = data[os.write(self.fd, data):]
        os.fsync(self.fd)

    def write(self, row: dict) -> None:
        self.write_many([row])

    def write_many(self, rows: Sequence[dict]) -> None:
        """Append rows in one write and one fsync (a crash can only tear the last line, which reading drops)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for row in rows:
            unknown = sorted(set(row) - set(self.columns))
            if unknown:
                raise ValueError(f"{self.path}: unknown column(s) {', '.join(unknown)}; columns are "
                                 f"{', '.join(self.columns)}")
            w.writerow(["" if row.get(c) is None else row.get(c) for c in self.columns])
        if rows:
            self._append(buf.getvalue())

    def close(self) -> None:
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None
        if self.lock:
            self.lock.release()

    def __enter__(self) -> TableFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def move_aside(path: str | Path) -> Path | None:
    """Rename an existing file to `<stem>.<timestamp>.old<suffix>` (never deletes); returns the new path."""
    path = Path(path)
    if not path.exists():
        return None
    stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    new = path.with_name(f"{path.stem}.{stamp}.old{path.suffix}")
    i = 1
    while new.exists():
        new = path.with_name(f"{path.stem}.{stamp}-{i}.old{path.suffix}")
        i += 1
    path.rename(new)
    return new


class Recorder:
    """A folder of named tidy tables (`schemas`: {table: columns}); every row also carries `META`. Rows are appended
    as they are measured (a run cut short keeps what it measured) and kept in memory; `save_meta` writes
    <out>/meta.json. out=None keeps rows in memory only."""

    def __init__(self, out: Path | str | None, meta: dict, schemas: dict[str, list[str]], echo: bool = True,
                 skip: Sequence[str] = ()):
        self.out = Path(out) if out else None
        self.meta = meta
        self.schemas = schemas
        self.rows: dict[str, list[dict]] = {}
        self.files: dict[str, TableFile] = {}
        self.echo = echo
        self.skip = set(skip)  # columns not echoed

    def row(self, table: str, **values) -> dict:
        """A row of `table` with every column (missing values None); unknown names raise, naming the known ones."""
        if table not in self.schemas:
            raise ValueError(f"table={table!r}: known tables are {', '.join(self.schemas)}")
        cols = self.schemas[table]
        unknown = sorted(set(values) - set(cols))
        if unknown:
            raise ValueError(f"table {table!r}: unknown column(s) {', '.join(unknown)}; columns are "
                             f"{', '.join(cols)}")
        return {**{k: self.meta.get(k) for k in META}, **{k: values.get(k) for k in cols}}

    def add(self, table: str, **values) -> dict:
        r = self.row(table, **values)
        self.rows.setdefault(table, []).append(r)
        if self.out:
            if table not in self.files:
                self.files[table] = TableFile(self.out / f"{table}.csv", META + self.schemas[table])
            self.files[table].write(r)
        if self.echo:
            short = {k: v for k, v in values.items() if v is not None and k not in self.skip}
            print(f"[{table}] " + " ".join(f"{k}={_fmt(v)}" for k, v in short.items()), flush=True)
        return r

    def frame(self, table: str) -> pd.DataFrame:
        return pd.DataFrame(self.rows.get(table, []), columns=META + self.schemas[table])

    def save_meta(self, **extra) -> None:
        """Write <out>/meta.json: the run's metadata plus `extra`, merged into what the file already holds."""
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            path = self.out / "meta.json"
            old = json.loads(path.read_text()) if path.exists() else {}
            path.write_text(json.dumps({**old, **self.meta, **extra}, indent=2, default=str))

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
