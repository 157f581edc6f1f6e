"""Exercises at the end of every notebook, and the checker that answers "correct" or "not yet: hint".

Each notebook states its exercises in markdown and gives one code cell per exercise:

    answer = None  # your answer: ...
    exercises.check("02.1", answer, pf=pf, budget=budget)

`check` computes the expected answer from the library, on the objects of this run (never a typed-in number), only
once an answer is given (`judge` returns the verdict instead of printing it): with `answer = None` it prints "not attempted yet" and computes nothing, which is what a
headless run (the runner, the smoke tests) sees. A wrong answer prints a hint, never the solution, and raises
nothing, so "run all" goes on. Solutions are not in the notebooks; the expected values below are what they compute.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

KINDS = {"int": "an int", "float": "a number", "name": "a registered policy name (str)"}


@dataclass(frozen=True)
class Exercise:
    """One exercise: what kind of answer it takes, how the library computes it, and the hint a wrong one gets."""

    id: str  # "<notebook>.<k>", e.g. "02.1"
    title: str  # the question in a few words (the notebook's markdown states it in full)
    kind: str  # "int" | "float" | "name" (the answer's type; KINDS)
    expected: Callable[..., object]  # keyword inputs → the answer, or a set of equally right answers (ties)
    hint: str
    rtol: float = 1e-3  # relative tolerance of "float" answers


# ---- the expected answers, computed from the library ------------------------------------------------------


def _gqa_terms(pf) -> int:
    from .decomposition import kv_entry_inner_mask

    s = pf.shape
    return int(kv_entry_inner_mask(s.heads, s.kv_heads, pf.n, 0, 0).sum())


def _entry_score(pf, layer: int, g: int = 0, j: int = 0) -> float:
    from .decomposition import kv_entry_contribution_norms

    return float(kv_entry_contribution_norms(pf, layer, j + 1)[g, j])


def _dkm_bound(pf, layer: int, frac: float) -> float:
    from .decomposition import inner_selection_errors

    (row,) = [r for r in inner_selection_errors(pf, layer, [frac]) if r["selector"] == "product"]
    return row["bound"]


def _first_recent(pf, budget) -> int:
    from .policies import get_policy

    policy = get_policy("streamingllm")
    keep = policy(pf, budget).keep[0, 0]  # (n,) the same positions in every head and layer
    return policy.sinks + int(keep[policy.sinks:].nonzero()[0, 0])


def _snapkv_best(pf, layer: int, g: int = 0) -> set[int]:
    from .policies import get_policy

    s = get_policy("snapkv", window=pf.window).layer_scores(pf, layer)[g]  # (n − w,) pooled prefix scores
    return set((s == s.max()).nonzero().flatten().tolist())  # max-pooling makes plateaus: any top token counts


def _explorer_correct(ex, policy: str) -> int:
    if ex.reference is None:
        raise ValueError("this explorer has no reference answer to judge the answers by")
    return sum(bool(ex.correct(policy, b)) for b in ex.budgets)


def _kib(shape, budget: int) -> float:
    return budget * shape.kv_bytes_per_token(4) / 1024


def _auc(df, policy: str) -> float:
    from .analysis import auc_table

    auc = auc_table(df)
    if policy not in auc.index:
        raise ValueError(f"policy {policy!r} is not in this run's table (it has {', '.join(auc.index)})")
    return float(auc.loc[policy, "average"])


def _best_at_smallest(df) -> set[str]:
    from .analysis import accuracy_table
    from .policies import REGISTRY

    acc = accuracy_table(df)
    acc = acc[(acc.task == "average") & acc.budget.map(math.isfinite)
              & acc.policy.map(lambda p: REGISTRY[p].role != "reference")]
    at = acc[acc.budget == acc.budget.min()]
    return set(at.policy[at.value == at.value.max()])


def _floor_ms(model, bw: dict, context: int) -> float:
    from .bench.timing import full_kv_bytes, read_ms, weight_bytes
    from .models import shape_of

    kv = full_kv_bytes(shape_of(model), context, next(model.parameters()).element_size())
    return read_ms(weight_bytes(model) + kv, bw)


def _bound(res_gpu: dict, frac: float) -> float:
    d = res_gpu["decode"]
    d = d[(d.status == "ok") & (d.sweep == "context") & (d.batch == 1) & (d.policy == "fullkv")]
    row = d[d.context == d.context.max()].iloc[0]
    W, F = float(row.weight_bytes), float(row.full_kv_bytes)
    return (W + F) / (W + frac * F)


EXERCISES: dict[str, Exercise] = {e.id: e for e in [
    Exercise("01.1", "rank-one terms deleted with one KV entry", "int", _gqa_terms,
             "a KV entry (g, j) is read by every query head of its group (section 2); how many query heads share one "
             "KV head in this model? (`pf.shape`)"),
    Exercise("01.2", "FlowKV's score of one KV entry, by its definition", "float", _entry_score,
             "for each query head h of group g (heads g·r … g·r + r − 1, r = H/G), P_h[j] = V_g[j] @ W_O^h "
             "(`pf.layers[l].v[g, j] @ pf.w_o(l)[h]`); sum the outer products A_h[:, j] ⊗ P_h[j] "
             "(`torch.outer(pf.attn(l)[h, :, j], P)`) over those heads, then take the Frobenius norm", rtol=1e-4),
    Exercise("01.3", "the DKM bound of the output-aware top fraction", "float", _dkm_bound,
             "X, Y = dc.mm_factors(pf, l); the importance of inner index i is ‖X[:, i]‖·‖Y[i, :]‖ (dc.inner_products); "
             "keep the top round(frac·H·n) (dc.topk_mask), sum the importances of the others and divide by ‖X @ Y‖_F"),
    Exercise("02.1", "StreamingLLM's earliest recent token", "int", _first_recent,
             "StreamingLLM keeps s = 4 sinks and B − s recent tokens of an n-token prompt (`pf.n`): the recent ones "
             "end at position n − 1"),
    Exercise("02.2", "SnapKV's top prefix token, by hand", "int", _snapkv_best,
             "a_h = pf.attn(l)[h].mean(0) for the query heads h of KV head 0 (h < H/G); average them over the group, "
             "keep the prefix j < n − w, then max-pool with width 7 and 'same' padding "
             "(F.max_pool1d(x[None, None], 7, stride=1, padding=3)); the answer is the argmax"),
    Exercise("02.3", "budgets at which FlowKV still answers", "int", _explorer_correct,
             "for each budget of `ex.budgets`, `ex.update('flowkv', b, 0)` (or the explorer's controls) shows the "
             "answer and ✓ when it contains the value; count the ✓"),
    Exercise("03.1", "KiB of KV cache at a token budget", "float", _kib,
             "B tokens per KV head in each of L layers and G KV heads, each entry a key and a value of d float32 "
             "numbers (4 bytes): `shape.layers`, `shape.kv_heads`, `shape.head_dim`; 1 KiB = 1024 bytes"),
    Exercise("03.2", "the area under an accuracy curve, by hand", "float", _auc,
             "take the policy's rows of `acc` with task 'average' and a finite budget, sorted by budget; with "
             "x = log2(budget), sum the trapezoids (y_i + y_{i+1})/2·(x_{i+1} − x_i) and divide by x_max − x_min "
             "(one budget alone: its accuracy)"),
    Exercise("03.3", "the best policy at the smallest budget", "name", _best_at_smallest,
             "rows of `acc` with task 'average' at the smallest finite budget of this run, FullKV left out: the "
             "policy (its registry name, e.g. 'snapkv') with the highest value"),
    Exercise("04.1", "the byte floor of one FullKV decode step", "float", _floor_ms,
             "W = bench.weight_bytes(model) (the embedding table excluded); KV = 2·L·G·d·(bytes per number)·n "
             "(`shape.kv_bytes_per_token(model's element size) * n`); t = (W + KV) / (bw['GBps']·1e9) s, in ms"),
    Exercise("04.2", "the bytes-ratio bound of a smaller cache", "float", _bound,
             "at the longest context of the stored run, the FullKV row (batch 1) of res_gpu['decode'] holds "
             "weight_bytes W and full_kv_bytes F; the bound is (W + F) / (W + frac·F)"),
]}


def _scalar(answer):
    """A one-element tensor or array → its Python value; anything else unchanged."""
    numel = getattr(answer, "numel", None)
    if callable(numel) and numel() == 1:  # a torch tensor
        return answer.item()
    if getattr(answer, "size", None) == 1 and hasattr(answer, "item"):  # a numpy array or scalar
        return answer.item()
    return answer


def _wrong_type(ex: Exercise, answer) -> str | None:
    """What is wrong with the answer's type, or None when it is of the exercise's kind."""
    got = f"got {type(answer).__name__} {answer!r}"
    if ex.kind == "name":
        return None if isinstance(answer, str) else f"the answer should be {KINDS['name']} ({got})"
    if isinstance(answer, bool) or not isinstance(answer, numbers.Real) or not math.isfinite(answer):
        return f"the answer should be {KINDS[ex.kind]} ({got})"
    if ex.kind == "int" and float(answer) != int(answer):
        return f"the answer should be {KINDS['int']} (got {answer!r})"
    return None


def _right(ex: Exercise, answer, expected) -> bool:
    want = expected if isinstance(expected, set) else {expected}
    if ex.kind == "name":
        return answer.strip().lower().replace("-", "_") in want
    if ex.kind == "int":
        return int(answer) in want
    return any(math.isclose(float(answer), float(w), rel_tol=ex.rtol, abs_tol=1e-12) for w in want)


def judge(exercise_id: str, answer, **inputs) -> tuple[str, str]:
    """(verdict, message) for `answer` to exercise `exercise_id`: verdict "not attempted" (answer None: nothing is
    computed), "correct" or "not yet" (the message then says what is wrong with the answer's type, if anything, and
    gives the hint). The expected answer is computed from `inputs`, the notebook's objects."""
    if exercise_id not in EXERCISES:
        raise ValueError(f"unknown exercise {exercise_id!r}; known: {', '.join(EXERCISES)}")
    ex = EXERCISES[exercise_id]
    head = f"exercise {ex.id} ({ex.title})"
    if answer is None:
        return "not attempted", f"{head} · not attempted yet: set `answer` in this cell and run it again"
    answer = _scalar(answer)
    why = _wrong_type(ex, answer)  # said before anything is computed
    if why is None and _right(ex, answer, ex.expected(**inputs)):
        return "correct", f"{head} · correct ✓"
    return "not yet", f"{head} · not yet: {why + '; ' if why else ''}hint: {ex.hint}"


def check(exercise_id: str, answer, **inputs) -> None:
    """Print the one line `judge` says (the cell of every exercise calls this; it raises nothing on a wrong answer,
    so running all cells goes on)."""
    print(judge(exercise_id, answer, **inputs)[1])


def of_notebook(notebook: str) -> list[Exercise]:
    """The exercises of one notebook ("02"), in order."""
    return [e for e in EXERCISES.values() if e.id.split(".")[0] == notebook]
