"""The papermill runner: parameter names checked, named sets found, a failing notebook reported by cell."""

from __future__ import annotations

import os
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
    assert "notebook 90_tiny, parameter budgett=64" in msg and "known parameter name: x, label" in msg


def test_unknown_parameter_in_set_file_rejected(tmp_path):
    nb = write_notebook(tmp_path, "90_tiny", "print(x)", smoke="x: 2\ny: 3\n")
    with pytest.raises(SystemExit, match=r"parameter y=3: allowed: a known parameter name: x, label"):
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


def test_headless_parameters_given_where_declared(tmp_path):
    """A notebook declaring `interactive` gets False from every set, unless a set file or -p names it; others
    get nothing extra."""
    nb = write_notebook(tmp_path, "93_widgets", "print(x)", smoke="x: 2\n")
    src = nbformat.read(nb, as_version=4)
    src.cells[1].source += "\ninteractive: bool = True  # widgets"
    nbformat.write(src, nb)
    assert runner.parameters_for(nb, "default", {}) == {"interactive": False}
    assert runner.parameters_for(nb, "smoke", {}) == {"interactive": False, "x": 2}
    assert runner.parameters_for(nb, "smoke", {"interactive": True}) == {"interactive": True, "x": 2}
    plain = write_notebook(tmp_path, "94_plain", "print(x)")
    assert runner.parameters_for(plain, "default", {}) == {}


def test_failing_notebook_exits_nonzero_naming_cell(tmp_path):
    nb = write_notebook(tmp_path, "91_fails", 'raise ValueError("boom")', smoke="x: 2\n")
    proc = subprocess.run([sys.executable, "-m", "flowkv_utils.runner", str(nb), "--set", "smoke",
                           "--out", str(tmp_path / "runs"), "--figures", str(tmp_path / "figs"), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert re.search(r"notebook 91_fails, cell \d+: ValueError: boom", proc.stderr), proc.stderr[-2000:]


def test_parameter_validation_names_notebook_parameter_value_and_allowed(tmp_path):
    """Types and allowed values are checked for every selected notebook before the first one runs."""
    first = write_notebook(tmp_path, "90_first", "open('ran', 'w').write('1')")
    with pytest.raises(SystemExit, match=r"notebook 03_accuracy_vs_budget, parameter x=2: allowed: a known"):
        runner.main([str(first), "03", "-p", "x", "2", "--out", str(tmp_path / "runs"), "--no-progress"])
    nbs = ["03"]
    cases = [("budgets", "notalist", r"03_accuracy_vs_budget, parameter budgets='notalist': allowed: a value of type list"),
             ("niah_lengths", "320", r"parameter niah_lengths=320: allowed: a value of type list"),
             ("niah_lengths", "[0, 5]", r"niah_lengths=\[0, 5\]: allowed: a non-empty list of positive ints"),
             ("dtype", "float33", r"dtype='float33': allowed: float32, bfloat16, float16, float64"),
             ("fresh", "nope", r"fresh='nope': allowed: a value of type bool"),
             ("budgets", "[64, 0]", r"budgets=\[64, 0\]: allowed: a list of budgets"),
             ("policies", "[snapkv, nope]", r"policies=\['snapkv', 'nope'\]: allowed: a non-empty list of registered"),
             ("device", "gpu", r"device='gpu': allowed: cpu, cuda or cuda:N")]
    for name, value, match in cases:
        with pytest.raises(SystemExit, match=match):
            runner.main(nbs + ["-p", name, value, "--out", str(tmp_path / "runs"), "--no-progress"])
    assert not (tmp_path / "ran").exists()  # nothing ran before the checks


def test_unwritable_out_is_a_clear_error(tmp_path):
    nb = write_notebook(tmp_path, "90_tiny", "print(x)")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match=r"--out .*file/runs: cannot create it"):
        runner.main([str(nb), "--out", str(blocker / "runs"), "--no-progress"])


def test_ctrl_c_leaves_one_line_with_where_and_how_to_resume(tmp_path):
    """SIGINT during a notebook: one line naming the notebook and the running cell, what was saved, the resume
    command; no traceback."""
    import signal
    import time

    nb = write_notebook(tmp_path, "92_slow", "import time\nopen('started', 'w').write('1')\ntime.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-m", "flowkv_utils.runner", str(nb), "--out", str(tmp_path / "runs"),
                             "--no-progress"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while not (tmp_path / "started").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted:")]
    assert len(lines) == 1 and "notebook 92_slow, cell 2 was running" in lines[0] and "resume with: python -m flowkv_utils.runner" in lines[0]
    assert "Traceback" not in err, err[-2000:]


def test_progress_inside_a_notebook_reaches_the_runners_terminal(tmp_path, monkeypatch, capsys):
    """A bar drawn by long work inside a notebook (`progress.bar`) is relayed to the runner's stderr as it runs,
    not left in the executed copy only."""
    monkeypatch.setenv("FLOWKV_FIGURES", str(tmp_path))
    body = "from flowkv_utils.progress import bar\nfor _ in bar(range(5), desc='tiny work', unit='pt'):\n    pass"
    nb = write_notebook(tmp_path, "91_bar", body)
    out = tmp_path / "runs"
    assert runner.main([str(nb), "--out", str(out), "--figures", str(tmp_path / "figs")]) == 0
    err = capsys.readouterr().err
    assert "tiny work" in err and "5/5" in err
    executed = nbformat.read(out / "91_bar.ipynb", as_version=4)
    assert "tiny work" not in str(executed.cells[-1].outputs)  # the bar went to the terminal instead


def test_progress_channel_is_stderr_outside_the_runner(monkeypatch):
    import sys

    from flowkv_utils import progress

    monkeypatch.delenv(progress.ENV, raising=False)
    assert progress.channel() is sys.stderr
