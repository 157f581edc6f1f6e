"""Write tests/expected_numbers/<id>.smoke.json from a smoke run's key numbers (`checks.record`).

    python tests/update_expected_numbers.py --run 01 02 03    # run the smoke sets the way the test does, then write
    python -m flowkv_utils.runner 01 02 03 --set smoke --out /tmp/x
    python tests/update_expected_numbers.py /tmp/x            # every <id>.numbers.json of that run
    python tests/update_expected_numbers.py /tmp/x 02         # only notebook 02

`--run` starts notebook 03 from an empty results table, as the test does; a plain runner call resumes the smoke
table in runs/smoke/, whose rows may predate a code change (same numbers when nothing changed).

The values come from the run, never from a person: this script copies them. Tolerances (float numbers only;
booleans, ints, strings and None must match exactly) are DEFAULT_TOLERANCE, or TOLERANCES[name] for numbers at
rounding level, or whatever an existing expected file already says for that name (hand-tuned tolerances survive a
regeneration). `tests/test_notebooks.py` imports `compare_numbers`, `smoke_argv` and `FRESH_TABLE` from here, so the
test and the regeneration run the notebooks the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

EXPECTED = Path(__file__).resolve().parent / "expected_numbers"
DEFAULT_TOLERANCE = {"rel": 1e-3, "abs": 1e-6}
# numbers whose value is float rounding: what matters is that they stay below the notebook's rtol (1e-5)
TOLERANCES = {"identity_max_rel_err": {"rel": 1e-3, "abs": 1e-5}}
# notebooks whose smoke set writes a results table: the test (and --run) points it into its own empty folder, so
# the numbers come from this code and not from rows an earlier run left in runs/smoke/
FRESH_TABLE = {"03": ("results_path", "03_sweep.csv")}


def smoke_argv(notebook: str | Path, out: Path, figures: Path) -> list[str]:
    """Runner arguments of one notebook's smoke run, as the test runs it (results tables inside `out`)."""
    nb_id = Path(notebook).name[:2]
    argv = [str(notebook), "--set", "smoke", "--figures", str(figures), "--out", str(out), "--no-progress"]
    if nb_id in FRESH_TABLE:
        name, file = FRESH_TABLE[nb_id]
        argv += ["-p", name, str(out / file)]
    return argv


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def compare_numbers(got: dict, expected: dict) -> list[str]:
    """One line per difference between a run's numbers `got` ({name: value}) and `expected` ({name: {"value": v,
    optional "rel", "abs"}}): a float outside abs + rel·|expected| (saying by how much), any other value not equal
    (type included: True is not 1), a number not recorded, a number not expected."""
    out = []
    for name, e in sorted(expected.items()):
        want = e["value"]
        if name not in got:
            out.append(f"{name}: expected {want!r}, not recorded any more")
            continue
        v = got[name]
        if isinstance(want, float) and _is_number(v) and not (math.isnan(want) or math.isnan(v)):
            tol = e.get("abs", DEFAULT_TOLERANCE["abs"]) + e.get("rel", DEFAULT_TOLERANCE["rel"]) * abs(want)
            diff = v - want
            if abs(diff) > tol:
                rel = f", {diff / abs(want):+.2%}" if want else ""
                out.append(f"{name}: {v!r}, expected {want!r} (changed by {diff:+.4g}{rel}; tolerance ±{tol:.3g})")
        elif type(v) is not type(want) or v != want:
            by = f", changed by {v - want:+d}" if type(v) is type(want) is int else ""
            out.append(f"{name}: {v!r}, expected {want!r} (must be equal{by})")
    for name in sorted(set(got) - set(expected)):
        out.append(f"{name}: {got[name]!r} recorded but not expected (new number: regenerate the expected file)")
    return out


def expected_entry(name: str, value, old: dict | None) -> dict:
    """{"value": value} plus tolerances for a float: the old entry's, else TOLERANCES[name], else the default."""
    entry = {"value": value}
    if isinstance(value, float):
        tol = {k: old[k] for k in ("rel", "abs") if old and k in old} or TOLERANCES.get(name, DEFAULT_TOLERANCE)
        entry.update({**DEFAULT_TOLERANCE, **tol})
    return entry


def update(out: Path, ids: list[str] | None = None) -> list[Path]:
    """Write EXPECTED/<id>.smoke.json for each <id>.numbers.json in `out` (or only `ids`); print what changed."""
    files = sorted(out.glob("[0-9][0-9].numbers.json"))
    if ids:
        files = [f for f in files if f.name[:2] in ids]
        missing = sorted(set(ids) - {f.name[:2] for f in files})
        if missing:
            raise SystemExit(f"{out}: no numbers for notebook(s) {', '.join(missing)} (run them with --set smoke)")
    if not files:
        raise SystemExit(f"{out}: no <id>.numbers.json (run: python -m flowkv_utils.runner --set smoke --out {out})")
    EXPECTED.mkdir(exist_ok=True)
    written = []
    for f in files:
        nb_id = f.name[:2]
        got = json.loads(f.read_text())
        target = EXPECTED / f"{nb_id}.smoke.json"
        old = json.loads(target.read_text())["numbers"] if target.is_file() else {}
        changes = compare_numbers(got, old) if old else [f"new file, {len(got)} numbers"]
        data = {"about": f"key numbers of notebook {nb_id} with its smoke parameters, copied from a run by "
                         "tests/update_expected_numbers.py (values are never typed by hand; tolerances may be)",
                "numbers": {k: expected_entry(k, v, old.get(k)) for k, v in sorted(got.items())}}
        target.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        written.append(target)
        print(f"{target}: unchanged" if not changes else f"{target}:\n  " + "\n  ".join(changes))
    return written


def run_smoke(ids: list[str], out: Path) -> None:
    """Run the smoke sets of `ids` as tests/test_notebooks.py does (fresh results tables inside `out`)."""
    from flowkv_utils import runner

    for nb in runner.discover(ids):
        if runner.main(smoke_argv(nb, out, out / "figures")) != 0:
            raise SystemExit(f"{nb.stem}: smoke run failed")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", type=Path, help="the runner's --out folder of a smoke run")
    ap.add_argument("ids", nargs="*", help="notebook ids (01, 02, ...); default: every one with numbers")
    ap.add_argument("--run", action="store_true", help="run the smoke sets first (then the positionals are ids)")
    a = ap.parse_args(argv)
    if a.run:
        ids = ([str(a.out)] if a.out else []) + a.ids
        with tempfile.TemporaryDirectory() as tmp:
            run_smoke(ids, Path(tmp))
            update(Path(tmp), [i[:2] for i in ids] or None)
        return 0
    if a.out is None:
        ap.error("give the smoke run's --out folder, or --run")
    update(a.out, a.ids or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
