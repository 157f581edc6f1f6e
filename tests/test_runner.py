"""The papermill runner: parameter names checked, named sets found, a failing notebook reported by cell."""

from __future__ import annotations

import re
import subprocess
import sys

import nbformat
import pytest

from flowkv_utils import runner


def write_notebook(folder, stem: str, body: str, smoke: str | None = None):
    """A tiny notebook with a `parameters` cell (x, label) and one cell of `body`."""
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    params = nbformat.v4.new_code_cell('x: int = 1  # a number\nlabel: str = "a"  # a name')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# tiny"), params, nbformat.v4.new_code_cell(body)]
    path = folder / f"{stem}.ipynb"
    nbformat.write(nb, path)
    if smoke is not None:
        (folder / "params").mkdir(exist_ok=True)
        (folder / "params" / f"{stem}.smoke.yaml").write_text(smoke)
    return path


def test_unknown_parameter_rejected_naming_known(tmp_path):
    nb = write_notebook(tmp_path, "90_tiny", "print(x)")
    with pytest.raises(SystemExit) as e:
        runner.main([str(nb), "-p", "budgett", "64", "--out", str(tmp_path / "runs"), "--no-progress"])
    msg = str(e.value.code)
    assert "unknown parameter(s) budgett" in msg and "known: x, label" in msg


def test_unknown_parameter_in_set_file_rejected(tmp_path):
    nb = write_notebook(tmp_path, "90_tiny", "print(x)", smoke="x: 2\ny: 3\n")
    with pytest.raises(SystemExit, match=r"unknown parameter\(s\) y; known: x, label"):
        runner.main([str(nb), "--set", "smoke", "--out", str(tmp_path / "runs"), "--no-progress"])


def test_missing_parameter_set(tmp_path):
    nb = write_notebook(tmp_path, "90_tiny", "print(x)")
    with pytest.raises(SystemExit, match=r"no parameter set 'nosuch'.*90_tiny\.nosuch\.yaml missing"):
        runner.main([str(nb), "--set", "nosuch", "--out", str(tmp_path / "runs"), "--no-progress"])


def test_unknown_notebook_name_lists_available():
    with pytest.raises(SystemExit, match="no notebook matches 'zz_nothing'; available:"):
        runner.discover(["zz_nothing"])


def test_parse_value():
    assert runner.parse_value("64") == 64 and runner.parse_value("[64, 128]") == [64, 128]
    assert runner.parse_value("true") is True and runner.parse_value("0.05") == 0.05


def test_successful_run_applies_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWKV_FIGURES", str(tmp_path))  # the runner sets it; restored afterwards
    nb = write_notebook(tmp_path, "90_tiny", "assert (x, label) == (3, 'b'), (x, label)", smoke="x: 3\n")
    out = tmp_path / "runs"
    assert runner.main([str(nb), "--set", "smoke", "-p", "label", "b", "--out", str(out),
                        "--figures", str(tmp_path / "figs"), "--no-progress"]) == 0
    executed = nbformat.read(out / "90_tiny.ipynb", as_version=4)
    assert executed.metadata["papermill"]["parameters"] == {"x": 3, "label": "b"}
    assert (out / "timings.csv").read_text().count("90_tiny") == 1


def test_failing_notebook_exits_nonzero_naming_cell(tmp_path):
    nb = write_notebook(tmp_path, "91_fails", 'raise ValueError("boom")', smoke="x: 2\n")
    proc = subprocess.run([sys.executable, "-m", "flowkv_utils.runner", str(nb), "--set", "smoke",
                           "--out", str(tmp_path / "runs"), "--figures", str(tmp_path / "figs"), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert re.search(r"notebook 91_fails, cell \d+: ValueError: boom", proc.stderr), proc.stderr[-2000:]
