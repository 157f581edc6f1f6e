"""Every numbered notebook runs headless with its `smoke` parameters, writes the figures it saves, and states the
key numbers (`checks.record`) its expected file holds: tests/expected_numbers/<id>.smoke.json, written from a run by
tests/update_expected_numbers.py (floats within their tolerances, everything else exactly)."""

from __future__ import annotations

import json
import re

import nbformat
import pytest
from update_expected_numbers import EXPECTED, compare_numbers, smoke_argv

from flowkv_utils import runner

NOTEBOOKS = sorted(runner.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
# save_figure(fig, "01", "name") with literal strings; names built at run time are not predicted
SAVE = re.compile(r"""save_figure\(\s*\w+\s*,\s*["'](\w+)["']\s*,\s*["']([\w\-.]+)["']""")
REGENERATE = "python tests/update_expected_numbers.py --run {id}"


def expected_figures(path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    return sorted({f"{prefix}_{name}.{ext}" for prefix, name in SAVE.findall(src) for ext in ("png", "pdf")})


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_smoke(path, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWKV_FIGURES", str(tmp_path / "figures"))  # the runner sets it; restored afterwards
    monkeypatch.setenv("FLOWKV_NUMBERS", str(tmp_path / "runs"))  # likewise
    figs, runs = tmp_path / "figures", tmp_path / "runs"
    rc = runner.main(smoke_argv(path, runs, figs))  # a results table the smoke set writes goes into runs/ too
    assert rc == 0
    assert (runs / path.name).is_file(), "executed copy written"
    for name in expected_figures(path):
        f = figs / name
        assert f.is_file() and f.stat().st_size > 0, f"{path.stem} did not write {name}"
    nb_id = path.stem[:2]
    want = EXPECTED / f"{nb_id}.smoke.json"
    if not want.is_file():  # a notebook that records nothing yet; one with an expected file must match it
        return
    got = runs / f"{nb_id}.numbers.json"
    assert got.is_file(), f"{path.stem} recorded no key numbers (checks.record) but {want.name} expects some"
    problems = compare_numbers(json.loads(got.read_text()), json.loads(want.read_text())["numbers"])
    assert not problems, (f"{path.stem}: {len(problems)} key number(s) differ from tests/expected_numbers/{want.name}"
                          f"\n  " + "\n  ".join(problems) + "\nIf the change is intended, regenerate: "
                          + REGENERATE.format(id=nb_id))


def test_expected_numbers_name_notebooks():
    """Every expected file belongs to a notebook and holds values with well-formed tolerances."""
    ids = {p.stem[:2] for p in NOTEBOOKS}
    for f in sorted(EXPECTED.glob("*.json")):
        assert f.name.endswith(".smoke.json") and f.name[:2] in ids, f"{f.name}: no notebook {f.name[:2]}_*.ipynb"
        for name, e in json.loads(f.read_text())["numbers"].items():
            assert "value" in e, f"{f.name}: {name} has no value"
            if isinstance(e["value"], float):
                assert e["rel"] >= 0 and e["abs"] >= 0, f"{f.name}: {name} has a negative tolerance"


def test_compare_numbers_says_what_changed():
    want = {"err": {"value": 1.0e-7, "rel": 1e-3, "abs": 1e-5}, "auc": {"value": 0.5, "rel": 1e-3, "abs": 1e-6},
            "ok": {"value": True}, "wins": {"value": 3}, "who": {"value": "flowkv"}, "rho": {"value": None},
            "gone": {"value": 1.0}}
    got = {"err": 3e-6, "auc": 0.5006, "ok": 1, "wins": 2, "who": "flowkv", "rho": None, "new": 0.1}
    problems = compare_numbers(got, want)
    assert [p.split(":")[0] for p in problems] == ["auc", "gone", "ok", "wins", "new"]
    assert "changed by +0.0006, +0.12%" in problems[0] and "tolerance ±0.000501" in problems[0]
    assert "must be equal" in problems[2] and "changed by -1" in problems[3]
    assert compare_numbers({"auc": 0.50049}, {"auc": want["auc"]}) == []
