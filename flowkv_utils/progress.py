"""Progress bars where the user looks: the terminal that started the work.

Long work (a sweep's points, a model's parts, the GPU benchmark's configurations) reports through `bar`, a tqdm bar
with counts, rate and ETA. Run from a terminal, it writes to stderr as tqdm does. Inside a notebook executed by the
runner (`python -m flowkv_utils.runner`, `make figures`), the kernel's stderr would only reach the executed copy, so
the runner names a progress file in `$FLOWKV_PROGRESS` and streams what is written there to its own stderr while the
notebook runs (`Relay`): the bar of a 16-minute sweep moves in the terminal instead of one silent cell.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import IO

ENV = "FLOWKV_PROGRESS"  # set by the runner: the file the notebook's progress goes to
_FILES: dict[str, IO[str]] = {}


def channel() -> IO[str]:
    """Where progress goes: the runner's progress file when one is named in $FLOWKV_PROGRESS, else stderr."""
    path = os.environ.get(ENV)
    if not path:
        return sys.stderr
    if path not in _FILES:
        _FILES[path] = open(path, "a", buffering=1, encoding="utf-8")  # line-buffered; tqdm flushes each update
    return _FILES[path]


def bar(iterable: Iterable | None = None, **kwargs):
    """A tqdm bar (same arguments) written to `channel()`; under the runner updated at most once a second."""
    from tqdm import tqdm

    if os.environ.get(ENV):
        kwargs.setdefault("mininterval", 1.0)
        kwargs.setdefault("ncols", 100)  # the relay is not a terminal tqdm can measure
    kwargs.setdefault("file", channel())
    return tqdm(iterable, **kwargs)


def note(text: str) -> None:
    """One line of progress (a step with no count, e.g. a model being dequantised once) to `channel()`, above any
    bar that is running (tqdm.write)."""
    from tqdm import tqdm

    tqdm.write(text, file=channel())


class Relay:
    """The runner's side: while a notebook runs, copy what its kernel writes to the progress file onto `out`.

    with Relay(path, sys.stderr): execute the notebook   (sets $FLOWKV_PROGRESS for the kernel it starts)"""

    def __init__(self, path: Path, out: IO[str] | None = None, interval: float = 0.5):
        self.path, self.out, self.interval = Path(path), out or sys.stderr, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._old: str | None = None

    def __enter__(self) -> Relay:
        self.path.write_text("")  # this notebook's progress only
        self._old = os.environ.get(ENV)
        os.environ[ENV] = str(self.path.resolve())
        self._thread.start()
        return self

    def _copy(self, f) -> None:
        text = f.read()
        if text:
            self.out.write(text)
            self.out.flush()

    def _run(self) -> None:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            while not self._stop.wait(self.interval):
                self._copy(f)
            self._copy(f)  # what was written last
            if f.tell():
                self.out.write("\n")  # end the bar's line

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = self._old
