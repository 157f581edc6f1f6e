"""How fast the accuracy sweep evaluates: points per second of `sweep.run_sweep` on a real model, the fast batched
path (`evaluate.batched_decode`) against the reference path, and whether both give the same predictions.

    python -m flowkv_utils.bench eval --model-path embedded --device cuda --dtype bfloat16 --context 8000

One 'eval' row per path: points (instances × (policy, budget)), wall seconds (prefill, selection, decoding and the
fidelity metrics included; the model load excluded), points/s, and on the check sample (the first instance, every
point) how many predictions equal the reference path's and the largest difference of each metric.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from .. import sweep
from ..budgets import parse_budget
from ..capture import prefill
from ..generate import generate, teacher_forced_logits
from ..models import fingerprint, load_model, shape_of
from ..policies import REGISTRY, STUDY, get_policy, prefill_options
from ..results import Recorder
from ..tasks import niah

BUDGETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # the study's six fractions of the prompt (plus "full" for FullKV)


def greedy_margins(model, tok, inst, points: list[tuple[str, str]], window: int = 32,
                   question: str = "aware") -> list[tuple[float, int]]:
    """For (policy, budget label) points of one instance: the reference path's smallest top-2 logit margin along its
    own greedy answer (teacher-forced, the decision to stop included) and where it occurs. A margin near float32
    rounding (≪ 1e-3) means the two paths' different summation orders can flip that token: a near-tie, not a bug."""
    if not points:
        return []
    q = inst.question_at if question == "agnostic" else inst.context_tokens
    prefix = inst.prompt_ids[0, q:] if question == "agnostic" else None
    pf = prefill(model, inst.prompt_ids[:, :q], window=window, **prefill_options([p for p, _ in points]))
    out = []
    for p, b in points:
        result = get_policy(p, **({} if REGISTRY[p].role == "reference" else {"window": window}))(pf, parse_budget(b))
        ids = generate(pf, result, inst.max_new_tokens, tok, prefix=prefix)
        top2 = teacher_forced_logits(pf, torch.tensor(ids, dtype=torch.long), result, prefix=prefix).topk(
            2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
        i = int(margin.argmin())
        out.append((float(margin[i]), i))
    return out


def eval_rate(rec: Recorder, model_path: str = "embedded", device: str = "cuda", dtype: str = "bfloat16",
              context: int = 8000, instances: int = 4, budgets=BUDGETS, reference: bool = True,
              table: Path | str | None = None, policies=STUDY, question: str = "aware") -> list[dict]:
    """Time the sweep on `instances` NIAH prompts of `context` tokens with every study policy at `budgets` (+ full),
    fidelity on: the fast path over all instances, the reference path over the first (the check sample).
    table: also keep the fast path's sweep table there (a results table like notebook 03's). policies: the study's
    by default (a subset for quick checks; the rate of the study is measured with all of them)."""
    policies = list(policies)
    budgets = [parse_budget(b) for b in budgets] + ["full"]
    model, tok = load_model(model_path, dtype=dtype, device=device)
    s = shape_of(model)
    depths = [(i + 0.5) / instances for i in range(instances)]
    insts = niah.niah(tok, [context], depths, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        def timed(path: str, sample, fast: bool):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            df = sweep.run_sweep(model, tok, sample, policies, budgets, Path(tmp) / f"{path}.csv", window=32,
                                 fidelity=True, progress=False, fast=fast, question=question)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return df, time.perf_counter() - t0

        # warm-up, not timed: the first instance with every point once, so the one-time costs a study pays once
        # per shape (Triton kernels compiled for these lengths' specialisations, CUDA graphs captured) are not
        # counted as steady-state evaluation; the timed run then redoes that instance from scratch
        sweep.run_sweep(model, tok, insts[:1], policies, budgets, Path(tmp) / "warm.csv", window=32, fidelity=True,
                        progress=False, fast=True, question=question)
        fast, t_fast = timed("fast", insts, True)
        if table:
            Path(table).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / "fast.csv", table)
        ref, t_ref = timed("ref", insts[:1], False) if reference else (None, None)
    n_pts = len(insts) * len(sweep.plan(policies, budgets))
    n_comp = len(insts) * sum(1 for _, b in sweep.plan(policies, budgets) if b != "full")
    same, diff, n_check, differ = None, None, None, None
    if ref is not None:
        a = fast[fast.instance == insts[0].instance].sort_values(sweep.KEY).reset_index(drop=True)
        b = ref.sort_values(sweep.KEY).reset_index(drop=True)
        first = a.metric == a.metric.iloc[0]  # one row per point for the prediction count
        same_rows = (a.prediction == b.prediction)[first]
        same = int(same_rows.sum())
        n_check = int(first.sum())
        differing = [(r.policy, r.budget) for r in a[first][~same_rows].itertuples()]
        margins = greedy_margins(model, tok, insts[0], differing, question=question)
        differ = ";".join(f"{p}@{b} (reference's smallest top-2 logit margin {m:.2g} at answer token {i})"
                          for (p, b), (m, i) in zip(differing, margins, strict=True))
        diff = float((a.value - b.value).abs().max())
    base = dict(model=s.name, model_sha=fingerprint(model), dtype=dtype, context=insts[0].context_tokens, question=question,
                policies=len(policies), budgets=";".join(map(str, budgets)), fidelity=True)
    phases = lambda df: {f"{k}_s": v for k, v in df.attrs["phases"].items()}  # where the time went
    rows = [rec.add("eval", **base, instances=len(insts), path="fast", points=n_pts, compressed_points=n_comp,
                    seconds=round(t_fast, 3), points_per_s=round(n_pts / t_fast, 2), check_points=n_check,
                    check_same_predictions=same, check_differs=differ, check_max_abs_diff=diff, **phases(fast),
                    note="evaluate.batched_decode: all points of an instance in one batch")]
    if ref is not None:
        pts = len(sweep.plan(policies, budgets))
        rows.append(rec.add("eval", **base, instances=1, path="reference", points=pts,
                            compressed_points=n_comp // len(insts), seconds=round(t_ref, 3),
                            points_per_s=round(pts / t_ref, 2), **phases(ref),
                            note="generate.generate one point at a time"))
    rec.save_meta(eval={"model_path": str(model_path), "device": device, "context": context})
    return rows
