"""Accuracy and fidelity versus KV budget: a resumable sweep over (task instance × policy × budget).

Each instance is prefilled ONCE; every policy and budget reuses that prefill (compression happens after it, so
only decoding differs), and only the short answer is decoded (greedy, stopping at the end of the turn).
Every finished point appends its rows to a tidy CSV (`results.TableFile`: crash-safe, locked, validated), one row
per metric, with the columns `COLUMNS`:

- identity (`KEY`): every setting that changes a row's value — the model and its weights' checksum
  (`models.fingerprint`), the task instance and its checksum (`TaskInstance.fingerprint`: prompt ids, references,
  generator settings), the seed, the policy and its full parameters (JSON), the budget (`budgets.budget_label`:
  "128", "0.05" or "full"), the observation window, the fidelity settings (JSON) and the metric. A rerun reuses
  only rows of exactly the same identity (and says how many); a table may hold several runs side by side, and
  `run_sweep` returns the rows of the run it was asked for.
- At budget "full" every policy is FullKV, so FullKV is decoded once per instance and its rows are written under
  every policy; the policy "fullkv" itself runs at "full" only. A budget that keeps everything for a prompt
  (tokens ≥ n, fraction 1.0) reuses the FullKV answer too.
- metric: the task's metric (e.g. contains, string_match_all) and, with fidelity on, `attn_rel_err` (mean over
  layers of ‖O_S − O‖_F/‖O‖_F on the window, renormalised), `attn_rel_err_heldout` (the same on held-out rows:
  the queries of FullKV's teacher-forced answer, after the window, `metrics.heldout_attention`) and
  `kl_next_token` (mean KL(full ‖ compressed) along FullKV's own answer, teacher-forced).
- A table stored before a fidelity metric existed (`ADDED_LATER`: the held-out error) resumes as it is: a point
  with every other metric is reused, without the new one (`fresh` recomputes the table with it).
- fresh=True never deletes: the old table is moved aside (`results.move_aside`, named in the output).
- Sharded over processes (`shard`, `distributed.Shard`: torchrun's rank r of N, CLI `flowkv_utils.sweep_cli`): rank r
  runs the instances r, r + N, ... (round-robin by index) and appends to its own crash-safe table
  `<stem>.rank<r>-of-<N><suffix>` beside `path` (`distributed.rank_table`); a single process writes `path` itself.
  `load_results(path)` merges `path` and its rank tables into one validated table (a key in two files is an error
  naming them). The rank tables beside a path are all of one world size: a run with N processes refuses rank tables
  of another N (resume with that N, or move them aside with `fresh`), and so does the load; `path` itself (single-
  process runs) may lie beside them. Every rank reuses every point already in any of these tables, so resuming a
  crashed sharded run with the same command redoes only the missing points.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from . import metrics
from .budgets import FULL, budget_label, parse_budget
from .capture import prefill
from .distributed import Shard, rank_table, rank_tables
from .evaluate import batched_decode, stack_keeps
from .generate import generate, teacher_forced_logits
from .models import fingerprint, shape_of
from .policies import REGISTRY, Policy, get_policy, prefill_options
from .progress import bar
from .results import TableError, TableFile, move_aside, read_tables
from .results import versions as _versions
from .tasks import TaskInstance

COLUMNS = ["model", "model_sha", "task", "instance", "instance_sha", "context_tokens", "seed", "policy",
           "policy_params", "budget", "window", "settings", "budget_fraction", "kept_entries", "budget_bytes",
           "metric", "value", "prediction", "versions", "elapsed_s"]
KEY = ["model", "model_sha", "task", "instance", "instance_sha", "seed", "policy", "policy_params", "budget",
       "window", "settings", "metric"]
POINT = [c for c in KEY if c != "metric"]  # one (instance, policy, budget) point of one run
RUN = ["model", "model_sha", "seed", "window", "settings"]  # what one run shares besides the policy parameters
NUMERIC = ["budget_fraction", "value", "elapsed_s"]
INTEGER = ["context_tokens", "seed", "window", "kept_entries", "budget_bytes"]
TIMING = ["elapsed_s"]
FIDELITY = ("attn_rel_err", "attn_rel_err_heldout", "kl_next_token")
# metrics added after tables were stored: a point of an older table that has every other metric is resumed as it
# is (its rows stay without these; `fresh` recomputes the table with them), so stored runs keep resuming in seconds
ADDED_LATER = frozenset({"attn_rel_err_heldout"})
PHASES = ("prefill", "select", "decode", "fidelity", "write")  # where a sweep's time goes (df.attrs["phases"])
PREDICTION_CHARS = 160


def table_files(path: str | Path) -> list[Path]:
    """The files that make up the table `path`: `path` itself (if present), then the per-rank tables of a sharded
    run beside it by rank (`distributed.rank_tables`). Rank tables of two world sizes are an error naming them."""
    path = Path(path)
    ranks = rank_tables(path)
    worlds = sorted({s.world_size for s in ranks.values()})
    if len(worlds) > 1:
        raise TableError(f"{path}: rank tables of runs with {' and '.join(map(str, worlds))} processes lie beside "
                         f"it ({', '.join(p.name for p in ranks)}); a table is sharded one way — move one set "
                         "away (or aside with fresh) before loading")
    return ([path] if path.exists() else []) + list(ranks)


QUESTION_MODES = ("aware", "agnostic")


def instance_sha(inst: TaskInstance, question: str = "aware") -> str:
    """The instance's key: its fingerprint, and in a question-agnostic run also where its question starts."""
    if question == "aware":
        return inst.fingerprint()
    return hashlib.sha256(f"{inst.fingerprint()}:question_at={inst.question_at}".encode()).hexdigest()[:16]


def load_results(path: str | Path) -> pd.DataFrame:
    """The results table, validated (schema, typed columns, no duplicate keys; a torn last line dropped): `path`
    merged with the per-rank tables of a sharded run beside it (`table_files`; a key in two files is an error
    naming them). budget stays text ("128", "0.05", "full"). No file gives an empty table with the columns."""
    return read_tables(table_files(path), COLUMNS, numeric=NUMERIC, integer=INTEGER, key=KEY)


def move_tables_aside(path: str | Path) -> list[tuple[Path, Path]]:
    """Move `path` and every rank table beside it aside (`results.move_aside`, never deletes): [(old, new)]."""
    path = Path(path)
    return [(p, move_aside(p)) for p in ([path] if path.exists() else []) + list(rank_tables(path))]


def versions() -> str:
    v = _versions()
    return f"torch {v['torch']}; transformers {v['transformers']}"


def model_name(model) -> str:
    return shape_of(model).name or type(model).__name__


def policy_params_json(p: Policy) -> str:
    """The policy's full parameters (window excluded: its own column) as canonical JSON; a parameter in the
    class's `recorded_when_set` only when it differs from its default."""
    params = {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.name != "window"
              and not (f.name in p.recorded_when_set and getattr(p, f.name) == f.default)}
    params = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in params.items()}
    return json.dumps(params, sort_keys=True)


def _text(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True) if tok is not None else " ".join(map(str, ids))


def _short(text: str) -> str:
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= PREDICTION_CHARS else text[: PREDICTION_CHARS - 1] + "…"


def check_budgets(budgets: Sequence) -> list:
    """Budgets in canonical form (`budgets.parse_budget`: int tokens, float fraction or "full"); an error names
    the bad one. Duplicates (e.g. 128 and "128") are an error."""
    if isinstance(budgets, (str, bytes)) or not isinstance(budgets, Sequence):
        raise TypeError(f"budgets={budgets!r}: must be a list of budgets, e.g. [64, 128, 0.05, \"full\"]")
    out = []
    for b in budgets:
        try:
            out.append(parse_budget(b))
        except (TypeError, ValueError) as e:
            raise ValueError(f"budget {b!r} in budgets: {e}") from None
    labels = [budget_label(b) for b in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"budgets={list(budgets)!r}: a budget appears twice")
    return out


def plan(policies: Sequence[str], budgets: Sequence) -> list[tuple[str, int | float | str]]:
    """The (policy, budget) points run for every instance: fullkv at "full" only, the others at every budget."""
    if isinstance(policies, (str, bytes)) or not isinstance(policies, Sequence):
        raise TypeError(f"policies={policies!r}: must be a list of policy names")
    for p in policies:
        if p not in REGISTRY:
            raise ValueError(f"unknown policy {p!r}: registered are {', '.join(REGISTRY)}")
    budgets = check_budgets(budgets)
    return [(p, b) for p in policies for b in budgets if REGISTRY[p].role != "reference" or b == FULL]


def run_settings(fidelity: bool = True, kl_tokens: int = 16, question: str = "aware") -> str:
    """The `settings` column of a run's rows (JSON): what besides model, seed, window, instance and policy decides
    its values (the question mode only when agnostic, so older aware tables keep their identity)."""
    return json.dumps({"fidelity": fidelity, "kl_tokens": kl_tokens,
                       **({"question": question} if question == "agnostic" else {})}, sort_keys=True)


def run_sweep(model, tok, instances: Sequence[TaskInstance], policies: Sequence[str], budgets: Sequence,
              path: str | Path, seed: int = 0, window: int = 32, fidelity: bool = True,
              policy_params: dict[str, dict] | None = None, kl_tokens: int = 16, progress: bool = True,
              on_row: Callable[[dict], None] | None = None, fresh: bool = False,
              fast: bool | None = None, shard: Shard | None = None, question: str = "aware") -> pd.DataFrame:
    """Run every (instance, policy, budget) point whose rows are not yet in `path`, appending rows; returns the
    rows of this run (these instances, policies, budgets and settings), old and new.

    shard: run only this process's share of the instances (`Shard.take`), appending to its rank table
    (`distributed.rank_table`), and return only their rows; None: every instance, in `path` (see the module
    docstring). fresh is refused in a sharded run: move the tables aside once (`move_tables_aside`), before the
    ranks start (`sweep_cli --fresh` does).

    seed: the seed the instances were built with (recorded, part of the key; also seeds torch). window:
    observation window of the prefill, passed to every policy unless policy_params says otherwise.
    policy_params: {policy name: constructor kwargs}. kl_tokens: length of the teacher-forced continuation
    (FullKV's answer) for the KL. fresh: move the existing table aside first (never deletes). on_row(row) is
    called after each row is safely on disk (progress displays, tests).
    question: "aware" (the whole prompt is prefilled and compressed: the question is inside the observation
    window) or "agnostic" (only the context before the instance's `question_at` is prefilled and compressed; the
    question is then fed over the compressed cache and kept in full, as kvpress evaluates). Recorded in the
    settings (so the two are never mixed in one comparison); context_tokens is then the compressed context's
    length, and budgets are fractions or tokens of it."""
    if not isinstance(fresh, bool):
        raise TypeError(f"fresh={fresh!r}: must be true or false")
    shard = Shard() if shard is None else shard
    if not isinstance(shard, Shard):
        raise TypeError(f"shard={shard!r}: must be a distributed.Shard (or None for a single process)")
    if fresh and shard.world_size > 1:
        raise ValueError(f"fresh=True in a sharded run ({shard.label}): ranks would move each other's tables; move "
                         "them aside once before the ranks start (sweep.move_tables_aside)")
    if not isinstance(fidelity, bool):
        raise TypeError(f"fidelity={fidelity!r}: must be true or false")
    if fast is None:
        fast = next(model.parameters()).device.type == "cuda"
    for name, v in (("seed", seed), ("window", window), ("kl_tokens", kl_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "seed" else 1):
            raise ValueError(f"{name}={v!r}: must be an int ≥ {0 if name == 'seed' else 1}")
    if question not in QUESTION_MODES:
        raise ValueError(f"question={question!r}: allowed are {', '.join(QUESTION_MODES)} (aware: the question is "
                         "compressed with the context; agnostic: the context is compressed before the question)")
    agnostic = question == "agnostic"
    points = plan(policies, budgets)
    policy_params = policy_params or {}
    for p in policy_params:
        if p not in REGISTRY:
            raise ValueError(f"policy_params names unknown policy {p!r}: registered are {', '.join(REGISTRY)}")
    pols = {p: get_policy(p, **({} if REGISTRY[p].role == "reference" else {"window": window}),
                          **policy_params.get(p, {})) for p in dict.fromkeys(p for p, _ in points)}
    shape = shape_of(model)
    for inst in instances:  # every budget must fit every prompt (window included) before anything is computed
        if agnostic and inst.question_at is None:
            raise ValueError(f"instance {inst.task}/{inst.instance}: question='agnostic' needs to know where the "
                             "question starts, and this task does not say (question_at is None): use 'aware'")
        if agnostic and inst.question_at <= window:
            raise ValueError(f"instance {inst.task}/{inst.instance}: question='agnostic' needs the context before the "
                             f"question ({inst.question_at} tokens) to be longer than the window {window}")
        for p, b in points:
            try:
                pols[p].budget_for(inst.question_at if agnostic else inst.context_tokens, shape.layers,
                                   shape.kv_heads, b)
            except ValueError as e:
                raise ValueError(f"instance {inst.task}/{inst.instance} ({inst.context_tokens} tokens), budget "
                                 f"{budget_label(b)}: {e}") from None
    path = Path(path)
    if fresh:
        for old, new in move_tables_aside(path):
            print(f"fresh: moved the old table {old} aside to {new}", flush=True)
    other = [p.name for p, s in rank_tables(path).items() if s.world_size != shard.world_size]
    if other and shard.world_size > 1:
        raise ValueError(f"{path}: {shard.world_size} processes, but rank tables of another number of processes "
                         f"lie beside it ({', '.join(other)}): resume with that many processes, or move them aside "
                         "(fresh)")
    mine = shard.take(instances)
    ident = {"model": model_name(model), "model_sha": fingerprint(model), "seed": seed, "window": window,
             "settings": run_settings(fidelity, kl_tokens, question)}
    out = TableFile(rank_table(path, shard), COLUMNS)  # validates (and locks) the file before anything is computed
    try:
        old = load_results(path)  # every rank table too: a point any process finished is not run again
        done = set(map(tuple, old[KEY].astype(str).itertuples(index=False))) if len(old) else set()
        metric_names = lambda inst: [inst.metric] + (list(FIDELITY) if fidelity else [])
        isha = {id(inst): instance_sha(inst, question) for inst in mine}

        def key(inst, p, b, m):
            return tuple(str(x) for x in (ident["model"], ident["model_sha"], inst.task, inst.instance,
                                          isha[id(inst)], seed, p, policy_params_json(pols[p]), budget_label(b),
                                          window, ident["settings"], m))

        todo = [(inst, [(p, b) for p, b in points if not all(key(inst, p, b, m) in done for m in metric_names(inst)
                                                             if m not in ADDED_LATER)])
                for inst in mine]
        total = len(mine) * len(points)
        remaining = sum(len(t) for _, t in todo)
        who = f" ({shard.label}: {len(mine)} of {len(instances)} instances → {out.path.name})" \
            if shard.world_size > 1 else ""
        if progress:
            print(f"sweep{who}: {total} points ({len(mine)} instances × {len(points)} (policy, budget)); "
                  f"{total - remaining} reused from {path}, {remaining} to run", flush=True)
        desc = "sweep" if shard.world_size == 1 else f"sweep {shard.label}"
        ctx = _Context(out, bar(total=total, initial=total - remaining, disable=not progress, desc=desc,
                                 unit="pt"), ident, fidelity, pols, kl_tokens, versions(), done, on_row, key, isha,
                       fast, {p: policy_params_json(pol) for p, pol in pols.items()}, agnostic=agnostic)
        try:
            for inst, pts in todo:
                if pts:
                    _run_instance(model, tok, inst, pts, metric_names(inst), ctx)
        finally:
            ctx.bar.close()
    finally:
        out.close()
    df = load_results(path)
    phases = {k: round(v, 3) for k, v in ctx.phases.items()}
    wanted = {key(inst, p, b, m) for inst in mine for p, b in points for m in metric_names(inst)}
    mask = [k in wanted for k in map(tuple, df[KEY].astype(str).itertuples(index=False))]
    df = df[mask].reset_index(drop=True)
    df.attrs["phases"] = phases  # seconds this call spent per phase (PHASES), new points only
    return df


@dataclass
class _Context:
    """What every point of a sweep shares."""

    out: TableFile
    bar: object  # tqdm progress bar
    ident: dict
    fidelity: bool
    policies: dict
    kl_tokens: int
    versions: str
    done: set
    on_row: Callable[[dict], None] | None
    key: Callable
    isha: dict
    fast: bool
    params_json: dict = dataclasses.field(default_factory=dict)  # {policy: policy_params_json}
    agnostic: bool = False  # question-agnostic: the context is prefilled and compressed, the question fed after
    phases: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))  # seconds per phase


@torch.no_grad()
def _run_instance(model, tok, inst: TaskInstance, pts: list, metric_names: list[str], ctx: _Context) -> None:
    """One prefill, then every (policy, budget) point: its keep-set, its answer and its fidelity. FullKV's answer
    (and the fidelity references) are computed once; a policy's budget-independent scores once for all its budgets
    (`Prefill.memo`), so a point's selection time is its policy's total over its points. Fast path (`ctx.fast`):
    all points' answers and teacher-forced logits decode as one batch (`evaluate.batched_decode`) and the fidelity
    metrics run batched; a point's elapsed_s is then its selection time plus its share of the batch. Reference
    path: one point at a time (`generate.generate`, `teacher_forced_logits`, `metrics.attention_output_errors`).
    The instance's rows are written together (one fsync; a crash leaves whole rows, and a rerun redoes the rest)."""
    seed, window, fidelity, kl_tokens = ctx.ident["seed"], ctx.ident["window"], ctx.fidelity, ctx.kl_tokens
    phase = ctx.phases
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    q = inst.question_at if ctx.agnostic else inst.context_tokens
    question = inst.prompt_ids[0, q:] if ctx.agnostic else None  # fed after the compressed context, kept in full
    pf = prefill(model, inst.prompt_ids[:, :q], window=window, **prefill_options(ctx.policies.values()))
    s = pf.shape
    entry_bytes = 2 * s.head_dim * pf.layers[0].k.element_size()  # K and V of one (layer, head, token)
    n_all = s.layers * s.kv_heads * pf.n
    prefill_s = time.perf_counter() - t0
    phase["prefill"] += prefill_s
    results, elapsed = {}, {}
    for p in dict.fromkeys(p for p, _ in pts):  # keep-sets (None: keeps everything, FullKV's answer)
        mine = [(q, b) for q, b in pts if q == p]
        t1 = time.perf_counter()
        for k in mine:
            r = None
            if REGISTRY[p].role != "reference" and k[1] != FULL:
                r = ctx.policies[p](pf, k[1])
                r = None if r.budget.full else r
            results[k] = r
        share = (time.perf_counter() - t1) / len(mine)
        elapsed.update({k: share for k in mine})
    phase["select"] += time.perf_counter() - t0 - prefill_s
    compressed = [k for k, r in results.items() if r is not None]
    answers, vals = {}, {k: {} for k in compressed}
    t1 = time.perf_counter()
    ref_out = [metrics.window_output(pf, li) for li in range(s.layers)] if fidelity and compressed else None
    phase["fidelity"] += time.perf_counter() - t1
    t1 = time.perf_counter()
    if ctx.fast:
        points = [None] + [results[k] for k in compressed]
        keeps = stack_keeps(pf, points)  # (1 + P, L, G, n): FullKV, then every compressed point
        out = batched_decode(pf, points, inst.max_new_tokens, tok, kl_tokens=kl_tokens if fidelity else 0,
                             keeps=keeps, prefix=question)
        full_ids = out.answers[0]
        answers = dict(zip(compressed, out.answers[1:], strict=True))
        t2 = time.perf_counter()
        phase["decode"] += t2 - t1
        if fidelity and compressed:
            kl = metrics.kl_divergence(out.logits[:1, 1:], out.logits[1:, 1:]).mean(-1).cpu()  # (P,)
            merged = [r.values for r in points[1:]]
            err = metrics.attention_output_errors_batch(pf, keeps[1:], merged, ref_out).mean(1)  # (P,)
            held = metrics.heldout_attention(pf, out.continuation, question)
            err_h = metrics.attention_output_errors_batch(pf, keeps[1:], merged, attn=held).mean(1)  # (P,)
            for i, k in enumerate(compressed):
                vals[k] = {"attn_rel_err": float(err[i]), "attn_rel_err_heldout": float(err_h[i]),
                           "kl_next_token": float(kl[i])}
        phase["fidelity"] += time.perf_counter() - t2
        share = (time.perf_counter() - t1) / (len(compressed) + 1)
        full_s = prefill_s + share
        for k in compressed:
            elapsed[k] += share
    else:
        full_ids = generate(pf, None, inst.max_new_tokens, tok, prefix=question)
        full_tf = None
        if fidelity:
            first = pf.logits if question is None else teacher_forced_logits(
                pf, torch.zeros(0, dtype=torch.long), None, prefix=question)[0]
            cont = torch.tensor((full_ids or [int(first.argmax())])[:kl_tokens])
            full_tf = teacher_forced_logits(pf, cont, None, prefix=question)
            held = metrics.heldout_attention(pf, cont, question) if compressed else None
        full_s = prefill_s + time.perf_counter() - t1
        for k in compressed:  # one point at a time: the definitions
            t2 = time.perf_counter()
            result = results[k]
            answers[k] = generate(pf, result, inst.max_new_tokens, tok, prefix=question)
            t3 = time.perf_counter()
            if fidelity:
                vals[k]["attn_rel_err"] = float(metrics.attention_output_errors(pf, result.keep, result.values,
                                                                                ref_out).mean())
                vals[k]["attn_rel_err_heldout"] = float(metrics.attention_output_errors(
                    pf, result.keep, result.values, attn=held).mean())
                comp = teacher_forced_logits(pf, cont, result, prefix=question)
                vals[k]["kl_next_token"] = float(metrics.kl_divergence(full_tf[1:], comp[1:]).mean())
            elapsed[k] += time.perf_counter() - t2
            phase["decode"] += t3 - t2
            phase["fidelity"] += time.perf_counter() - t3
        phase["decode"] += full_s - prefill_s
    full_text = _text(tok, full_ids)

    t1 = time.perf_counter()
    rows = []
    for p, b in pts:
        result = results[(p, b)]
        if result is None:  # the full cache: FullKV's answer, zero error by definition
            text, kept, v = full_text, n_all, dict.fromkeys(FIDELITY, 0.0)
            point_s = full_s if REGISTRY[p].role == "reference" else elapsed[(p, b)]
        else:
            text, kept, v = _text(tok, answers[(p, b)]), result.total_kept, dict(vals[(p, b)])
            point_s = elapsed[(p, b)]
        v[inst.metric] = metrics.score(inst.metric, text, inst.references,
                                       all_classes=inst.meta.get("all_classes", ()),
                                       cut_first_line=inst.meta.get("cut_first_line", False))
        for m in metric_names:
            if ctx.key(inst, p, b, m) in ctx.done:  # a point cut short by a crash
                continue
            rows.append({**ctx.ident, "task": inst.task, "instance": inst.instance,
                         "instance_sha": ctx.isha[id(inst)], "context_tokens": pf.n, "policy": p,
                         "policy_params": ctx.params_json[p], "budget": budget_label(b),
                         "budget_fraction": kept / n_all, "kept_entries": kept, "budget_bytes": kept * entry_bytes,
                         "metric": m, "value": v[m], "prediction": _short(text), "versions": ctx.versions,
                         "elapsed_s": round(point_s, 3)})
    ctx.out.write_many(rows)
    phase["write"] += time.perf_counter() - t1
    if ctx.on_row is not None:
        for row in rows:
            ctx.on_row(row)
    ctx.bar.update(len(pts))
