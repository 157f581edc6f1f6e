"""The CPU benchmarks (embedded model; they run on CUDA too): decode vs context per policy, every policy's scoring
overhead on one prompt, model load times, notebook run times."""

from __future__ import annotations

import os
import tempfile
import time

from ..cache import RaggedCache
from ..capture import prefill
from ..fastdecode import StaticRaggedCache
from ..models import shape_of
from ..results import REPO, Recorder
from .prefill import kept_lengths, prefill_context
from .shapes import prompt_ids, synthetic_cache
from .tables import EMBEDDED_WEIGHTS, RANDOM_WEIGHTS, model_cols, recorder
from .timing import copy_bandwidth, decode_row, eager_path, free_memory, sync, time_generate_decode


def context_sweep(model, contexts: list[int], *, policies: tuple[str, ...] = ("fullkv", "snapkv", "flowkv",
                  "flowkv_global"), budget: float | int = 0.1, batch: int = 1, steps: int = 8, warmup: int = 2,
                  window: int = 32, tok=None, weights: str = EMBEDDED_WEIGHTS, rec: Recorder | None = None,
                  bw: dict | None = None, reference_steps: int = 3) -> Recorder:
    """Per context: one prefill compressing with FlowKV (global) while timing every policy's scoring, then decode
    per policy from caches of that policy's real per-head lengths (FastDecoder; on CUDA a graph), plus the eager
    reference `generate.decode` on the real compressed cache. Works on CPU and CUDA."""
    dev = next(model.parameters()).device
    rec = rec or recorder(None, echo=False)
    bw = bw or copy_bandwidth(dev)
    s = shape_of(model)
    dtype = next(model.parameters()).dtype
    for n in contexts:
        comp = prefill_context(rec, model, n, weights=weights, policy="flowkv_global", budget=budget,
                               also=tuple(p for p in policies if p not in ("fullkv", "flowkv_global")),
                               window=window, tok=tok, chunk=None if dev.type == "cpu" else 8192)
        cache = comp.cache(capacity=steps + warmup + 4)
        if reference_steps:
            ms = time_generate_decode(model, cache, reference_steps)
            decode_row(rec, model, StaticRaggedCache.from_ragged([cache], 4), weights=weights, bw=bw,
                       policy="flowkv_global", budget=budget, context=n, sweep="impl", ms=ms,
                       path=eager_path("reference"),
                       note="generate.decode with RaggedCache.attend (per-head loop)")
        del cache
        for p in policies:
            sc = synthetic_cache(kept_lengths(comp, p, budget), batch, s, n, steps + warmup + 4, dtype, dev)
            decode_row(rec, model, sc, weights=weights, bw=bw, policy=p, budget=None if p == "fullkv" else budget,
                       context=n, sweep="context", steps=steps, warmup=warmup)
            del sc
        del comp
        free_memory()
    return rec


def policies_overhead(model, tok, n: int = 4096, budget: float | int = 0.05, window: int = 32,
                      names: list[str] | None = None, rec: Recorder | None = None) -> Recorder:
    """Every study policy on one real prompt of n tokens: scoring+selection time as a fraction of the prefill,
    and the bytes its ragged cache keeps vs allocates."""
    from ..policies import REGISTRY, STUDY, get_policy, prefill_options

    rec = rec or recorder(None, echo=False)
    dev = next(model.parameters()).device
    ids = prompt_ids(n, model.config.vocab_size, tok)
    sync(dev)
    t0 = time.perf_counter()
    pf = prefill(model, ids, window=window, **prefill_options(names or STUDY))  # H2O: every query (memory only)
    sync(dev)
    t_pf = time.perf_counter() - t0
    mc = model_cols(model, EMBEDDED_WEIGHTS if tok is not None else RANDOM_WEIGHTS)
    for name in names or STUDY:
        pol = get_policy(name) if REGISTRY[name].role == "reference" else get_policy(name, window=window)
        pf.forget()  # each policy pays for its own window attention
        sync(dev)
        t0 = time.perf_counter()
        res = pol(pf, budget)
        sync(dev)
        t = time.perf_counter() - t0
        cache = RaggedCache.from_prefill(pf, res, capacity=1)
        kept, alloc = cache.kept_bytes(), cache.allocated_bytes()
        rec.add("scoring", **mc, policy=name, budget=budget, context=n, scoring_s=t, prefill_s=t_pf,
                fraction=t / t_pf, kept_bytes=kept, allocated_bytes=alloc, alloc_over_kept=alloc / kept)
        del cache, res
    return rec


def load_times(rec: Recorder) -> Recorder:
    """Embedded model: cold load (dequantise into a temporary FLOWKV_CACHE) and warm load (cached)."""
    from ..models import load_model

    old = os.environ.get("FLOWKV_CACHE")
    with tempfile.TemporaryDirectory(prefix="flowkv-cold-") as tmp:
        os.environ["FLOWKV_CACHE"] = tmp
        try:
            for what in ("cold", "warm"):
                t0 = time.perf_counter()
                load_model("embedded")
                rec.add("load", what=what, seconds=time.perf_counter() - t0,
                        note="dequantise GGUF + load" if what == "cold" else "cached HF directory")
        finally:
            if old is None:
                os.environ.pop("FLOWKV_CACHE", None)
            else:
                os.environ["FLOWKV_CACHE"] = old
    return rec


def notebook_times(rec: Recorder, param_set: str = "default", names: list[str] | None = None) -> Recorder:
    """Each notebook headless through flowkv_utils.runner (its own parameter set), one row per notebook."""
    from .. import runner

    out = REPO / "runs" / f"bench-{param_set}"
    for nb in runner.discover(names):
        try:
            (stem, secs), = runner.run([nb], param_set, {}, out, out / "figures", progress=False)
            rec.add("notebooks", notebook=stem, param_set=param_set, seconds=secs, status="ok")
        except SystemExit as e:
            rec.add("notebooks", notebook=nb.stem, param_set=param_set, seconds=None, status=f"failed: {e}")
    return rec
