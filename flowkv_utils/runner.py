"""Run the notebooks headless with papermill: `python -m flowkv_utils.runner [NAMES] [--set smoke] [-p k v]`.

Notebooks run in their numeric order; executed copies go to runs/<set>/ (ignored by git), figures to figures/
(or --figures DIR). A failing notebook stops the run with "notebook X, cell N: Error: value" and exit code 1.
Unknown -p names are rejected, naming the known ones (papermill itself would only warn).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"


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
    """Named parameter set (notebooks/params/<stem>.<set>.yaml) merged with -p overrides; names checked."""
    import papermill as pm

    known = pm.inspect_notebook(str(nb))
    params: dict = {}
    if param_set and param_set != "default":
        f = nb.parent / "params" / f"{nb.stem}.{param_set}.yaml"
        if not f.is_file():
            raise SystemExit(f"notebook {nb.stem}: no parameter set {param_set!r} ({f} missing)")
        params.update(yaml.safe_load(f.read_text()) or {})
    params.update(overrides)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise SystemExit(f"notebook {nb.stem}: unknown parameter(s) {', '.join(unknown)}; "
                         f"known: {', '.join(known)}")
    return params


def run(notebooks: list[Path], param_set: str | None, overrides: dict, out_dir: Path, figures: Path | None,
        progress: bool = True) -> list[tuple[str, float]]:
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    out_dir.mkdir(parents=True, exist_ok=True)
    if figures is not None:
        os.environ["FLOWKV_FIGURES"] = str(figures.resolve())
    timings = []
    for i, nb in enumerate(notebooks, 1):
        params = parameters_for(nb, param_set, overrides)
        print(f"[{i}/{len(notebooks)}] {nb.stem} ({param_set or 'default'} parameters{': ' if params else ''}"
              f"{', '.join(f'{k}={v}' for k, v in params.items())})", flush=True)
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(str(nb), str(out_dir / nb.name), parameters=params, cwd=str(nb.parent),
                                progress_bar=progress, kernel_name="python3")
        except PapermillExecutionError as e:
            raise SystemExit(f"notebook {nb.stem}, cell {e.exec_count if e.exec_count else e.cell_index}: "
                             f"{e.ename}: {e.evalue}  (executed copy: {out_dir / nb.name})") from None
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
    timings = run(nbs, a.param_set, overrides, out, a.figures, progress=not a.no_progress)
    print("\n".join(f"{s:<32s} {t:7.1f} s" for s, t in timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
