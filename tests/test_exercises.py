"""The notebooks' exercises: every notebook ends with two or three, each check cell is known to the registry, an
unanswered check computes nothing, and each checker accepts the answer a direct transcription of the question
gives (computed here without the checker's code) and rejects a wrong one with a hint."""

from __future__ import annotations

import math
import re

import nbformat
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from flowkv_utils import exercises, runner
from flowkv_utils.exercises import EXERCISES, check, judge
from flowkv_utils.models import shape_of

NOTEBOOKS = sorted(runner.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
pytestmark = pytest.mark.usefixtures("one_thread")  # small decodes and tensors: one torch thread
CHECK = re.compile(r"""exercises\.check\(\s*["'](\d\d\.\d+)["']""")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_ends_with_its_exercises(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    used = [m for c in code for m in CHECK.findall(c.source)]
    nb_id = path.stem[:2]
    assert used == [e.id for e in exercises.of_notebook(nb_id)], f"{path.name}: check cells {used}"
    assert 2 <= len(used) <= 3, f"{path.name}: {len(used)} exercises (two or three wanted)"
    tail = code[-len(used):]
    for c, ex_id in zip(tail, used, strict=True):  # the last code cells are the checks, unanswered
        assert c.source.startswith("answer = None  # your answer: ") and ex_id in c.source, c.source
    heading = max(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith("## Exercises"))
    assert all(c.cell_type == "markdown" or CHECK.search(c.source) for c in nb.cells[heading:]), \
        f"{path.name}: only the exercises after '## Exercises' (no solution cells)"


def test_unanswered_computes_nothing(capsys):
    for ex_id in EXERCISES:  # inputs that would fail if the expected answer were computed
        assert check(ex_id, None, pf=None, df=None, ex=None) is None  # prints, returns nothing (no cell output)
        assert judge(ex_id, None, pf=None)[0] == "not attempted"
    assert capsys.readouterr().out.count("not attempted yet") == len(EXERCISES)
    with pytest.raises(ValueError, match="unknown exercise '09.9'; known: 01.1"):
        judge("09.9", 1)


def test_wrong_types_say_what_is_wanted(capsys):
    for answer in ("eight", 2.5, float("nan")):  # said before anything is computed (pf=None)
        check("01.1", answer, pf=None)
    check("03.3", 3, df=None)
    out = capsys.readouterr().out
    assert out.count("not yet") == 4 and "should be an int (got float nan)" in out
    assert "should be an int (got str 'eight')" in out and "should be an int (got 2.5)" in out
    assert "should be a registered policy name (str)" in out and "hint:" in out


@pytest.mark.model
def test_01_answers(small_prefill):
    pf, layer = small_prefill, 2
    s = pf.shape
    assert judge("01.1", s.heads // s.kv_heads, pf=pf)[0] == "correct"
    assert judge("01.1", torch.tensor(s.heads // s.kv_heads), pf=pf)[0] == "correct"  # a 0-d tensor is fine
    assert judge("01.1", s.heads, pf=pf)[0] == "not yet"
    A, v, wo = pf.attn(layer), pf.layers[layer].v.float(), pf.w_o(layer).float()  # (H, w, n), (G, n, d), (H, d, D)
    r = s.heads // s.kv_heads
    term = sum(torch.outer(A[h, :, 0], v[0, 0] @ wo[h]) for h in range(r))  # group 0, token 0: (w, D)
    assert judge("01.2", term.norm(), pf=pf, layer=layer, g=0, j=0)[0] == "correct"
    assert judge("01.2", 1.01 * term.norm(), pf=pf, layer=layer, g=0, j=0)[0] == "not yet"
    X = A.permute(1, 0, 2).reshape(A.shape[1], -1)  # (w, H·n)
    Y = torch.einsum("hnd,hdD->hnD", v.repeat_interleave(r, 0), wo).reshape(X.shape[1], -1)  # (H·n, D)
    imp = X.norm(dim=0) * Y.norm(dim=1)
    drop = torch.ones_like(imp, dtype=torch.bool)
    drop[imp.topk(round(0.1 * imp.numel())).indices] = False
    bound = float(imp[drop].sum() / (X @ Y).norm())
    assert judge("01.3", bound, pf=pf, layer=layer, frac=0.1)[0] == "correct"
    assert judge("01.3", bound * 1.1, pf=pf, layer=layer, frac=0.1)[0] == "not yet"
    assert judge("01.3", bound, pf=pf, layer=layer, frac=0.1)[1].endswith("correct ✓")


@pytest.mark.model
def test_02_answers(small_prefill, embedded):
    pf = small_prefill
    assert judge("02.1", pf.n - (100 - 4), pf=pf, budget=100)[0] == "correct"  # n − (B − s), s = 4 sinks
    assert judge("02.1", pf.n - 100, pf=pf, budget=100)[0] == "not yet"
    layer, s = 5, pf.shape
    a = pf.attn(layer)[: s.heads // s.kv_heads].mean(1).mean(0)[: pf.n - pf.window]  # group 0, window mean, prefix
    pooled = F.max_pool1d(a[None, None], 7, stride=1, padding=3)[0, 0]
    top = [int(j) for j in (pooled == pooled.max()).nonzero().flatten()]
    assert all(judge("02.2", j, pf=pf, layer=layer, g=0)[0] == "correct" for j in top)
    assert judge("02.2", next(j for j in range(pf.n) if j not in top), pf=pf, layer=layer, g=0)[0] == "not yet"

    from flowkv_utils import explorer, viz
    from flowkv_utils.generate import generate
    from flowkv_utils.policies import get_policy

    _, tok = embedded
    ex = explorer.Explorer(pf, tok, ["flowkv"], [64], needle=viz.text_span(tok, pf.input_ids, "Agnes"),
                           reference="Agnes", max_new_tokens=6)
    out = generate(pf, get_policy("flowkv", window=pf.window)(pf, 64), max_new_tokens=6, tok=tok)
    right = int("Agnes" in tok.decode(out, skip_special_tokens=True))
    assert judge("02.3", right, ex=ex, policy="flowkv")[0] == "correct"
    assert judge("02.3", 1 - right, ex=ex, policy="flowkv")[0] == "not yet"


def sweep_table() -> pd.DataFrame:
    """A tiny sweep-shaped table: two tasks, budgets 64 and 256 and FullKV at "full"."""
    rows = []
    values = {("flowkv", "64"): 0.5, ("flowkv", "256"): 1.0, ("snapkv", "64"): 0.5, ("snapkv", "256"): 0.5,
              ("fullkv", "full"): 1.0}
    for task in ("niah", "ruler_niah_single"):
        for (policy, budget), value in values.items():
            rows.append(dict(task=task, instance=0, policy=policy, budget=budget, metric="score", value=value,
                             budget_bytes=1024.0))
    return pd.DataFrame(rows)


@pytest.mark.model
def test_03_answers(embedded):
    shape = shape_of(embedded[0])
    kib = 128 * 2 * shape.layers * shape.kv_heads * shape.head_dim * 4 / 1024
    assert judge("03.1", kib, shape=shape, budget=128)[0] == "correct"
    assert judge("03.1", kib / 2, shape=shape, budget=128)[0] == "not yet"
    df = sweep_table()
    auc = (0.5 + 1.0) / 2 * (math.log2(256) - math.log2(64)) / (math.log2(256) - math.log2(64))
    assert judge("03.2", auc, df=df, policy="flowkv")[0] == "correct"
    assert judge("03.2", 0.5, df=df, policy="flowkv")[0] == "not yet"
    assert judge("03.3", "flowkv", df=df)[0] == "correct" and judge("03.3", "SnapKV", df=df)[0] == "correct"  # a tie
    assert judge("03.3", "fullkv", df=df)[0] == "not yet"
    df.loc[(df.policy == "snapkv") & (df.budget == "64"), "value"] = 0.75
    assert judge("03.3", "snapkv", df=df)[0] == "correct" and judge("03.3", "flowkv", df=df)[0] == "not yet"


@pytest.mark.model
def test_04_answers(embedded):
    from flowkv_utils import bench

    model = embedded[0]
    s = model.config
    head_dim = s.hidden_size // s.num_attention_heads
    kv = 2 * s.num_hidden_layers * s.num_key_value_heads * head_dim * 4 * 512  # float32 K and V of 512 tokens
    floor = 1e3 * (bench.weight_bytes(model) + kv) / 10e9
    assert judge("04.1", floor, model=model, bw={"GBps": 10.0}, context=512)[0] == "correct"
    assert judge("04.1", floor * 1.01, model=model, bw={"GBps": 10.0}, context=512)[0] == "not yet"
    res = bench.load_results(runner.REPO / "results" / "gpu")
    d = res["decode"]
    row = d[(d.status == "ok") & (d.sweep == "context") & (d.batch == 1) & (d.policy == "fullkv")]
    row = row.loc[row.context.idxmax()]
    W, full = float(row.weight_bytes), float(row.full_kv_bytes)
    assert judge("04.2", (W + full) / (W + 0.01 * full), res_gpu=res, frac=0.01)[0] == "correct"
    assert judge("04.2", (W + full) / (W + 0.05 * full), res_gpu=res, frac=0.01)[0] == "not yet"
