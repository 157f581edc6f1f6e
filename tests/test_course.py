"""The course: executed notebooks → one self-contained HTML page each and an index in reading order, with what each
teaches, its prerequisites and its run time (the runner's record, else papermill's)."""

from __future__ import annotations

import re

import nbformat
import pytest

from flowkv_utils import course, runner

NOTEBOOKS = sorted(runner.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def lesson(folder, stem: str, teaches: str, prereq: str, body: str):
    """A tiny notebook: a first cell with title, purpose and prerequisites, a parameters cell, one cell of `body`."""
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    params = nbformat.v4.new_code_cell("x: int = 1  # a number")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {stem} · a lesson\n\n**Purpose.** {teaches}\n\n"
                                              f"**Prerequisites.** {prereq}"),
                params, nbformat.v4.new_code_cell(body)]
    path = folder / f"{stem}.ipynb"
    nbformat.write(nb, path)
    return path


FIGURE = ("import matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
          "import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0])\nplt.title('a line')\nplt.show()\n"
          "from flowkv_utils import exercises\nexercises.check('01.1', None)")


def test_course_of_a_runner_run(tmp_path, monkeypatch):
    """Two notebooks run by the runner, as `make course` finds them; a third one of the project not run."""
    monkeypatch.setenv("FLOWKV_FIGURES", str(tmp_path / "figs"))  # the runner sets them; restored afterwards
    monkeypatch.setenv("FLOWKV_NUMBERS", str(tmp_path / "runs"))
    src = tmp_path / "src"
    src.mkdir()
    a = lesson(src, "01_first", "Why lines fall.", "none.", FIGURE)
    b = lesson(src, "02_second", "What comes *next*.", "notebook 01.", "print(x)")
    runs = tmp_path / "runs" / "smoke"
    assert runner.main([str(a), str(b), "--out", str(runs), "--no-progress"]) == 0
    pages = course.build(runs, tmp_path / "course", expected=["01_first", "02_second", "03_third"])
    assert [p.name for p in pages] == ["index.html", "01_first.html", "02_second.html"]
    index = pages[0].read_text()
    assert index.index('href="01_first.html"') < index.index('href="02_second.html"')  # reading order
    assert "Why lines fall." in index and "What comes <em>next</em>." in index and "notebook 01." in index
    seconds = {row.split(",")[2]: float(row.split(",")[3]) for row in (runs / "timings.csv").read_text().split()}
    assert f"Run time {course.duration(seconds['01_first'])} (runner, default set," in index
    assert "1 exercise at the end" in index and "no exercises" in index and "1 figures" in index
    assert "python -m flowkv_utils.runner 03 --set default" in index  # lacking: the set the run used
    first = pages[1].read_text()
    assert "data:image/png;base64," in first and "exercise 01.1" in first  # the figure inline, the outputs
    assert '<a href="index.html">course index</a>' in first and 'next: <a href="02_second.html">' in first
    assert not re.search(r"<(img|script)[^>]+src=\"(?!data:|https?:)", first), "a page must not need local files"


def test_run_time_from_papermill_without_a_timing_record(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    path = lesson(runs, "01_first", "Things.", "none.", "print(1)")
    nb = nbformat.read(path, as_version=4)
    nb.metadata["papermill"] = {"duration": 150.0, "end_time": "2026-01-02T03:04:05.6", "exception": True,
                                "parameters": {"x": 2}}
    nbformat.write(nb, path)
    index = course.build(runs, tmp_path / "out")[0].read_text()
    assert "Run time 2.5 min (papermill, 2026-01-02 03:04:05)" in index and "parameters: x=2" in index
    assert "this run stopped with an error" in index


def test_no_executed_notebooks_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"--runs .*nothing: no executed notebooks .* flowkv_utils\.runner --set nothing"):
        course.build(tmp_path / "nothing", tmp_path / "out")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebooks_say_what_they_teach_and_need(path):
    title, teaches, prereq = course.intro(nbformat.read(path, as_version=4))
    assert title.startswith(path.stem[:2]) and len(teaches) > 80, (title, teaches)
    assert prereq, f"{path.name}: its first cell needs a '**Prerequisites.**' paragraph (the course index shows it)"
