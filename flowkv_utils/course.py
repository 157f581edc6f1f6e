"""The course: the executed notebooks as HTML pages with their figures inside, and an index in reading order.

    python -m flowkv_utils.course --runs runs/default --out course/     (make course; COURSE_SET=smoke for the smoke run)

Reads the runner's executed copies in --runs (`python -m flowkv_utils.runner --set <set>` writes them to
runs/<set>/), renders each with nbconvert (JupyterLab's look, images inline: every page is one self-contained file)
and writes index.html. Per notebook, in numeric order, the index says what it teaches and what it needs first (its
first cell: the first paragraph after the title, and the **Prerequisites.** paragraph), how many exercises it ends
with, how many figures it draws, and its run time: the runner's last record of it in <runs>/timings.csv, else the
duration papermill stores in the executed copy. A notebook of the project with no executed copy there is listed with
the command that makes one; a copy whose run stopped with an error is rendered and marked.
"""

from __future__ import annotations

import argparse
import csv
import html
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

PREREQ = "**Prerequisites.**"
CHECK = re.compile(r"""exercises\.check\(\s*["']""")


@dataclass
class Lesson:
    """One executed notebook, as the index describes it."""

    stem: str
    title: str
    teaches: str  # markdown: the first paragraph of the first cell after the title
    prerequisites: str | None  # markdown, without the "Prerequisites." label; None when the notebook states none
    exercises: int
    figures: int  # image outputs
    seconds: float | None
    timing: str  # where `seconds` comes from
    failed: bool
    parameters: dict = field(default_factory=dict)  # what papermill injected


def intro(nb, stem: str = "") -> tuple[str, str, str | None]:
    """(title, what it teaches, prerequisites) from a notebook's first markdown cell."""
    md = next((c.source for c in nb.cells if c.cell_type == "markdown"), "").strip()
    lines = md.splitlines()
    title = lines[0].lstrip("#").strip() if lines and lines[0].startswith("#") else stem
    body = "\n".join(lines[1:] if lines and lines[0].startswith("#") else lines)
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", body) if p.strip()]
    prereq = next((p[len(PREREQ):].strip() for p in paragraphs if p.startswith(PREREQ)), None)
    teaching = [p for p in paragraphs if not p.startswith(PREREQ)]
    teaches = re.sub(r"^\*\*Purpose\.\*\*\s*", "", teaching[0]) if teaching else ""
    return title, teaches, prereq


def runner_timings(runs: Path) -> dict[str, tuple[float, str]]:
    """stem → (seconds, "runner, <set> set, <date>") of the last row for it in <runs>/timings.csv (the runner
    appends date, set, notebook, seconds after every run); {} without the file."""
    path = runs / "timings.csv"
    out: dict[str, tuple[float, str]] = {}
    if not path.is_file():
        return out
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if len(row) != 4:
                continue
            date, param_set, stem, seconds = row
            try:
                out[stem] = (float(seconds), f"runner, {param_set} set, {date.replace('T', ' ')}")
            except ValueError:
                continue
    return out


def set_name(runs: Path) -> str:
    """The parameter set of a runs folder: the last one its timings.csv records, else the folder's name
    (the runner writes runs/<set>/)."""
    path = runs / "timings.csv"
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    return next((r[1] for r in reversed(rows) if len(r) == 4), runs.name)


def read_lesson(path: Path, timings: dict[str, tuple[float, str]]) -> Lesson:
    nb = nbformat.read(path, as_version=4)
    title, teaches, prereq = intro(nb, path.stem)
    pm = nb.metadata.get("papermill", {})
    if path.stem in timings:
        seconds, timing = timings[path.stem]
    elif isinstance(pm.get("duration"), (int, float)):
        seconds, timing = float(pm["duration"]), f"papermill, {str(pm.get('end_time', ''))[:19].replace('T', ' ')}"
    else:
        seconds, timing = None, "no record"
    code = [c for c in nb.cells if c.cell_type == "code"]
    figures = sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))
    return Lesson(path.stem, title, teaches, prereq, sum(bool(CHECK.search(c.source)) for c in code), figures,
                  seconds, timing, bool(pm.get("exception")), dict(pm.get("parameters", {})))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "not recorded"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _md(text: str) -> str:
    from nbconvert.filters import markdown2html

    return markdown2html(text)


def _nav(lessons: list[Lesson], i: int) -> str:
    links = ['<a href="index.html">course index</a>']
    if i > 0:
        links.append(f'previous: <a href="{lessons[i - 1].stem}.html">{html.escape(lessons[i - 1].title)}</a>')
    if i + 1 < len(lessons):
        links.append(f'next: <a href="{lessons[i + 1].stem}.html">{html.escape(lessons[i + 1].title)}</a>')
    return ('<nav style="font: 14px sans-serif; padding: 8px 16px; background: #f3f3f3; border-bottom: 1px solid '
            '#ddd">' + " · ".join(links) + "</nav>")


def render_page(path: Path, out: Path, nav: str = "") -> Path:
    """One executed notebook → <out>/<stem>.html, self-contained (images inline), with `nav` at the top."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", embed_images=True, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(path, as_version=4))
    body = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + nav, body, count=1)
    page = out / f"{path.stem}.html"
    page.write_text(body, encoding="utf-8")
    return page


def _parameters(params: dict) -> str:
    if not params:
        return "the notebook's defaults"
    short = [f"{k}={v!r}" if len(repr(v)) <= 40 else f"{k}={repr(v)[:37]}..." for k, v in params.items()]
    return ", ".join(html.escape(s) for s in short)


def index_html(lessons: list[Lesson], missing: list[str], runs: Path) -> str:
    """The index page: the lessons in reading order, then the notebooks this run lacks."""
    items = []
    for k, le in enumerate(lessons, 1):
        warn = ('<p class="warn">⚠ this run stopped with an error in this notebook: the page shows how far it got.'
                "</p>" if le.failed else "")
        prereq = _md(le.prerequisites) if le.prerequisites else "<p>none stated</p>"
        ex = f"{le.exercises} exercise{'s' if le.exercises != 1 else ''} at the end" if le.exercises else "no exercises"
        items.append(
            f'<li id="{le.stem}"><h2>{k}. <a href="{le.stem}.html">{html.escape(le.title)}</a></h2>{warn}'
            f'<div class="teaches"><b>What it teaches.</b> {_md(le.teaches)}</div>'
            f'<div class="prereq"><b>Prerequisites.</b> {prereq}</div>'
            f'<p class="meta">Run time {duration(le.seconds)} ({html.escape(le.timing)}) · {le.figures} figures · '
            f"{ex} · parameters: {_parameters(le.parameters)}</p></li>")
    absent = ""
    if missing:
        cmd = f"python -m flowkv_utils.runner {{}} --set {set_name(runs)}"
        absent = ("<h2>Not in this run</h2><ul>" + "".join(
            f"<li>{html.escape(s)}: <code>{html.escape(cmd.format(s[:2]))}</code> (then render again)</li>"
            for s in missing) + "</ul>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>FlowKV — the course</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 52em; margin: 2em auto; padding: 0 1em; color: #222 }}
ol.lessons {{ list-style: none; padding: 0 }} ol.lessons li {{ border-top: 1px solid #ddd; padding: 0.5em 0 }}
h2 {{ font-size: 1.2em; margin: 0.6em 0 0.3em }} .meta {{ color: #555; font-size: 0.9em }}
.warn {{ color: #a40000 }} .teaches p, .prereq p {{ display: inline }} code {{ font-size: 0.9em }}
</style></head><body>
<h1>FlowKV — KV-cache eviction, a course in {len(lessons)} notebook{'s' if len(lessons) != 1 else ''}</h1>
<p>Read in this order: each notebook is a short paper that runs — a claim, its formula, a check on the real model, a
figure, and what the figure shows — and ends with exercises that check their answers in the notebook. These pages are
the executed copies in <code>{html.escape(str(runs))}</code>; to work through the exercises, open the notebooks
themselves (<code>make lab</code>).</p>
<ol class="lessons">{"".join(items)}</ol>{absent}
</body></html>
"""


def build(runs: Path, out: Path, expected: list[str] | None = None) -> list[Path]:
    """Render every executed notebook of `runs` and the index into `out`; returns the pages (index first).
    `expected`: the notebook stems a complete run has (those absent are listed on the index)."""
    runs, out = Path(runs), Path(out)
    executed = sorted(runs.glob("[0-9][0-9]_*.ipynb")) if runs.is_dir() else []
    if not executed:
        raise SystemExit(f"--runs {runs}: no executed notebooks (NN_*.ipynb) there; run them first, e.g. "
                         f"`python -m flowkv_utils.runner --set {runs.name}` (it writes runs/<set>/)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {out}: cannot create it ({e.strerror}); pass a writable folder") from None
    if not os.access(out, os.W_OK):
        raise SystemExit(f"--out {out}: not writable; pass a writable folder")
    timings = runner_timings(runs)
    lessons = [read_lesson(p, timings) for p in executed]
    pages = [render_page(p, out, _nav(lessons, i)) for i, p in enumerate(executed)]
    missing = [s for s in (expected or []) if s not in {le.stem for le in lessons}]
    index = out / "index.html"
    index.write_text(index_html(lessons, missing, runs), encoding="utf-8")
    return [index, *pages]


def main(argv: list[str] | None = None) -> int:
    from .runner import discover

    ap = argparse.ArgumentParser(prog="python -m flowkv_utils.course", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/default"),
                    help="folder of the runner's executed copies (default runs/default, written by make figures)")
    ap.add_argument("--out", type=Path, default=Path("course"), help="folder for the HTML pages (default course/)")
    a = ap.parse_args(argv)
    pages = build(a.runs, a.out, expected=[p.stem for p in discover()])
    print(f"{len(pages) - 1} notebook page(s) and the index written; open {pages[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
