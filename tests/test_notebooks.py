"""Every numbered notebook runs headless with its `smoke` parameters and writes the figures it saves."""

from __future__ import annotations

import re

import nbformat
import pytest

from flowkv_utils import runner

NOTEBOOKS = sorted(runner.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
# save_figure(fig, "01", "name") with literal strings; names built at run time are not predicted
SAVE = re.compile(r"""save_figure\(\s*\w+\s*,\s*["'](\w+)["']\s*,\s*["']([\w\-.]+)["']""")


def expected_figures(path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    return sorted({f"{prefix}_{name}.{ext}" for prefix, name in SAVE.findall(src) for ext in ("png", "pdf")})


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_smoke(path, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWKV_FIGURES", str(tmp_path / "figures"))  # the runner sets it; restored afterwards
    figs = tmp_path / "figures"
    rc = runner.main([str(path), "--set", "smoke", "--figures", str(figs), "--out", str(tmp_path / "runs"),
                      "--no-progress"])
    assert rc == 0
    assert (tmp_path / "runs" / path.name).is_file(), "executed copy written"
    for name in expected_figures(path):
        f = figs / name
        assert f.is_file() and f.stat().st_size > 0, f"{path.stem} did not write {name}"
