"""Committed notebooks: no outputs, a papermill `parameters` cell of literals with help, a valid smoke set."""

from __future__ import annotations

import ast
import re

import nbformat
import papermill as pm
import pytest
import yaml

from flowkv_utils import runner

NOTEBOOKS = sorted(runner.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]
ASSIGN = re.compile(r"^[A-Za-z_]\w*\s*(:[^=]*)?=")


def parameters_cells(nb):
    return [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no numbered notebooks in {runner.NOTEBOOKS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts (strip them before committing)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    cells = parameters_cells(nb)
    assert len(cells) == 1, f"{path.name}: needs exactly one cell tagged 'parameters', found {len(cells)}"
    src = cells[0].source
    for node in ast.parse(src).body:  # literals only: papermill does not recompute derived values
        assert isinstance(node, ast.AnnAssign | ast.Assign), f"{path.name}: only assignments in the parameters cell"
        ast.literal_eval(node.value)
    lines = [ln for ln in src.splitlines() if ASSIGN.match(ln)]
    params = pm.inspect_notebook(str(path))
    # papermill silently skips a line with a second '=' (e.g. in the help text): every knob must be listed
    assert len(params) == len(lines), (f"{path.name}: papermill parses {sorted(params)} from {len(lines)} "
                                       "assignment lines — no '=' allowed in values or help comments")
    for name, p in params.items():
        assert p["inferred_type_name"] not in ("None", ""), f"{path.name}: {name} has no type annotation"
        assert p["help"], f"{path.name}: {name} has no '# help (unit, allowed values)' comment"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_smoke_parameters_known(path):
    smoke = path.parent / "params" / f"{path.stem}.smoke.yaml"
    assert smoke.is_file(), f"{path.name}: missing {smoke.relative_to(path.parent.parent)}"
    values = yaml.safe_load(smoke.read_text()) or {}
    unknown = sorted(set(values) - set(pm.inspect_notebook(str(path))))
    assert not unknown, f"{smoke.name}: unknown parameter(s) {unknown}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_no_helper_definitions(path):
    """Thin notebooks: functions and classes belong in flowkv_utils, with tests."""
    nb = nbformat.read(path, as_version=4)
    for i, c in enumerate(nb.cells):
        if c.cell_type != "code":
            continue
        src = "\n".join(ln for ln in c.source.splitlines() if not ln.lstrip().startswith(("%", "!")))
        defs = [n.name for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef | ast.ClassDef)]
        assert not defs, f"{path.name} cell {i}: defines {defs}; move them to flowkv_utils"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_saved_figure_has_a_reference_copy(path):
    """The working-tree policy (README, 'What a run changes'): a run's figures go to the untracked figures/, the
    reference run's are committed in docs/figures/ — one for every figure a notebook saves."""
    from test_notebooks import expected_figures

    reference = runner.REPO / "docs" / "figures"
    missing = [f for f in expected_figures(path) if not (reference / f).is_file()]
    assert not missing, f"{path.stem}: no reference copy in docs/figures/ of {missing}; run make reference-figures"
    assert "/figures/" in (runner.REPO / ".gitignore").read_text().split(), "figures/ must stay untracked"
