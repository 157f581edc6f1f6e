"""Run the notebooks headless with papermill: `python -m flowkv_utils.runner [NAMES] [--set smoke] [-p k v]`.

Notebooks run in their numeric order; executed copies go to runs/<set>/ (ignored by git), figures to figures/
(or --figures DIR). Before the first notebook starts, every parameter of every selected notebook is checked —
name, declared type and allowed values (`params.py`) — and a bad one stops the run with "notebook, parameter,
value, what is allowed" (papermill itself would only warn about an unknown name). A failing notebook stops the run
with "notebook X, cell N: Error: value" and exit code 1. While a notebook runs, its long work's progress bars
(`progress.bar`: counts, rate, ETA) appear in this terminal, and each notebook's elapsed time as it finishes.
Ctrl-C stops it with one line saying which notebook and cell were running, what was saved, and the command that
resumes.

Headless runs never wait for a person: a notebook that declares a parameter named in `HEADLESS` (e.g. notebook 02's
`interactive`, which draws ipywidgets controls) gets its headless value (`interactive=False`: one static state) under
every parameter set, unless the set file or a -p override names it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import signal
import sys
import time
from pathlib import Path

import yaml

from .params import ParameterError, check_parameters
from .progress import Relay

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
# the value a headless run gives these parameters where a notebook declares them (a set file or -p still wins)
HEADLESS = {"interactive": False}


def discover(names: list[str] | None = None, folder: Path = NOTEBOOKS) -> list[Path]:
    """Notebooks in order; names may be stems ('01_headwise_decomposition'), prefixes ('01') or paths."""
    found = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not names:
        return found
    out = []
    for name in names:
        if Path(name).is_file():
            out.append(Path(name))
            continue
        hits = [p for p in found if p.stem == name or p.stem.startswith(name)]
        if not hits:
            raise SystemExit(f"no notebook matches {name!r}; available: {', '.join(p.stem for p in found)}")
        out.extend(hits)
    return out


def parse_value(text: str):
    """'-p budget 64' → 64; YAML rules, so lists ('[64, 128]') and booleans work too."""
    return yaml.safe_load(text)


def parameters_for(nb: Path, param_set: str | None, overrides: dict) -> dict:
    """Named parameter set (notebooks/params/<stem>.<set>.yaml) merged with -p overrides, over the `HEADLESS`
    values of the parameters the notebook declares; names checked."""
    import papermill as pm

    known = pm.inspect_notebook(str(nb))
    params: dict = {k: v for k, v in HEADLESS.items() if k in known}  # headless: nothing waits for a widget
    if param_set and param_set != "default":
        f = nb.parent / "params" / f"{nb.stem}.{param_set}.yaml"
        if not f.is_file():
            raise SystemExit(f"notebook {nb.stem}: no parameter set {param_set!r} ({f} missing)")
        params.update(yaml.safe_load(f.read_text()) or {})
    params.update(overrides)
    try:
        check_parameters(nb.stem, known, params, cwd=nb.parent)
    except ParameterError as e:
        raise SystemExit(str(e)) from None
    return params


def interrupted_message(nb: Path, cell: str, executed: Path, done: list[str], argv: list[str]) -> str:
    """The one line Ctrl-C leaves: where it stopped, what was saved, how to resume."""
    saved = (f"finished notebooks: {', '.join(done)}; " if done else "") + \
        f"executed copy so far: {executed}; result tables keep every finished row"
    cmd = "python -m flowkv_utils.runner " + " ".join(argv)
    return f"interrupted: notebook {nb.stem}, {cell} was running; {saved}; resume with: {cmd}"


class _CtrlC:
    """While a notebook runs, the first SIGINT marks the run as interrupted and passes the interrupt on to the
    kernel (Jupyter starts kernels in their own session, so Ctrl-C does not reach them): the kernel stops the cell
    and papermill reports it cleanly, with no traceback from a half-closed kernel. A second SIGINT stops the runner
    at once."""

    def __enter__(self):
        self.hit = False
        self.old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, *_):
        import psutil

        self.hit = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for child in psutil.Process().children(recursive=True):  # the kernel (ipykernel: SIGINT interrupts a cell)
            try:
                child.send_signal(signal.SIGINT)
            except psutil.Error:
                pass

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.old)


def run(notebooks: list[Path], param_set: str | None, overrides: dict, out_dir: Path, figures: Path | None,
        progress: bool = True, argv: list[str] | None = None) -> list[tuple[str, float]]:
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    all_params = {nb: parameters_for(nb, param_set, overrides) for nb in notebooks}  # every check before any run
    for folder, what in ((out_dir, "--out"), (figures, "--figures")):
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"{what} {folder}: cannot create it ({e.strerror}); pass a writable folder") from None
        if not os.access(folder, os.W_OK):
            raise SystemExit(f"{what} {folder}: not writable; pass a writable folder")
    if figures is not None:
        os.environ["FLOWKV_FIGURES"] = str(figures.resolve())
    os.environ["FLOWKV_NUMBERS"] = str(out_dir.resolve())  # checks.record: key numbers beside the executed copies
    timings = []
    for i, nb in enumerate(notebooks, 1):
        params = all_params[nb]
        print(f"[{i}/{len(notebooks)}] {nb.stem} ({param_set or 'default'} parameters{': ' if params else ''}"
              f"{', '.join(f'{k}={v}' for k, v in params.items())})", flush=True)
        (out_dir / f"{nb.stem[:2]}.numbers.json").unlink(missing_ok=True)  # this run's numbers only (checks.record)
        t0 = time.perf_counter()
        done = [s for s, _ in timings]

        def stop(cell: str, nb=nb, done=done) -> SystemExit:
            print("\n" + interrupted_message(nb, cell, out_dir / nb.name, done,
                                             argv if argv is not None else sys.argv[1:]), file=sys.stderr, flush=True)
            return SystemExit(130)

        try:
            relay = Relay(out_dir / f"{nb.stem}.progress.log") if progress else contextlib.nullcontext()
            with _CtrlC() as ctrl_c, relay:
                pm.execute_notebook(str(nb), str(out_dir / nb.name), parameters=params, cwd=str(nb.parent),
                                    progress_bar=progress, kernel_name="python3")
        except PapermillExecutionError as e:
            cell = f"cell {e.exec_count if e.exec_count else e.cell_index}"
            if e.ename == "KeyboardInterrupt" or ctrl_c.hit:
                raise stop(cell) from None
            raise SystemExit(f"notebook {nb.stem}, {cell}: {e.ename}: {e.evalue}  (executed copy: "
                             f"{out_dir / nb.name})") from None
        except KeyboardInterrupt:
            raise stop("a cell") from None
        dt = time.perf_counter() - t0
        timings.append((nb.stem, dt))
        print(f"    done in {dt:.1f} s", flush=True)
    with open(out_dir / "timings.csv", "a", newline="") as f:
        w = csv.writer(f)
        for stem, dt in timings:
            w.writerow([time.strftime("%Y-%m-%dT%H:%M:%S"), param_set or "default", stem, f"{dt:.1f}"])
    return timings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flowkv_utils.runner", description=__doc__.split("\n")[0])
    ap.add_argument("notebooks", nargs="*", help="names or numeric prefixes (default: all, in order)")
    ap.add_argument("--set", dest="param_set", default="default",
                    help="parameter set: 'default' (the full study) or a name with notebooks/params/<nb>.<set>.yaml")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="override one parameter (repeatable); value parsed as YAML")
    ap.add_argument("--out", type=Path, default=None, help="folder for executed copies (default runs/<set>)")
    ap.add_argument("--figures", type=Path, default=None, help="figure folder (default figures/)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    nbs = discover(a.notebooks)
    overrides = {k: parse_value(v) for k, v in a.parameter}
    out = a.out or REPO / "runs" / a.param_set
    timings = run(nbs, a.param_set, overrides, out, a.figures, progress=not a.no_progress,
                  argv=list(argv if argv is not None else sys.argv[1:]))
    print("\n".join(f"{s:<32s} {t:7.1f} s" for s, t in timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
