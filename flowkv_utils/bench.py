"""Benchmarks: throughput and memory of compressed-cache decoding, and the CPU timings other notebooks cite.

    python -m flowkv_utils.bench load        # embedded model: cold load (temp FLOWKV_CACHE) and warm load
    python -m flowkv_utils.bench notebooks   # each notebook headless with default parameters (flowkv_utils.runner)
    python -m flowkv_utils.bench policies    # embedded model, 4K prompt: scoring+selection / prefill, bytes kept/allocated
    python -m flowkv_utils.bench decode      # embedded model on CPU: prefill, scoring, decode per token vs the floor
    python -m flowkv_utils.bench gpu --out results/gpu   # the GPU sweep (Llama-3-8B shape, random weights) to 200K
    python -m flowkv_utils.bench scoring     # FlowKV scoring step by step at 128K (GPU), + whole prefills per slack
    python -m flowkv_utils.bench all         # load, notebooks, policies, decode (the CPU ones)

Every table is tidy CSV, one measurement per row, and every row carries the device, torch / transformers / triton
versions, the date, the command and the git commit; a JSON file beside the tables holds the same metadata plus the
measured copy bandwidth. The floor of a decode step is the bytes it must read once — the weights W (embedding
table excluded: one row is read) and the kept KV bytes — over the measured device-to-device copy bandwidth:

    floor = (W + KV_kept) / BW,     bytes-ratio speed-up bound of a policy over FullKV = (W + KV_full) / (W + KV_kept).

Speed and memory do not depend on weight values, so GPU figures use random-weight models of real shapes (said on
every row: weights = "random weights, real shape"); decode-only sweeps fill caches of the policies' real per-head
lengths with random contents. Tests never assert timings; this module only measures and prints.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import generate
from .cache import RaggedCache
from .capture import prefill
from .kernels import FastDecoder, StaticRaggedCache, ragged_attend, triton_available, work_items
from .layerwise import LayerwiseCompressor
from .models import ModelShape, shape_of

REPO = Path(__file__).resolve().parent.parent
RANDOM_WEIGHTS = "random weights, real shape"
EMBEDDED_WEIGHTS = "embedded (real weights)"

# The shapes the GPU sweep uses (Llama-3-8B: 32 layers, 32 heads, 8 KV heads, d 128, D 4096, MLP 14336, vocab 128256)
SHAPES = {
    "llama3-8b": dict(family="llama", layers=32, heads=32, kv_heads=8, head_dim=128, hidden=4096,
                      intermediate=14336, vocab=128256),
    "llama3-8b-2l": dict(family="llama", layers=2, heads=32, kv_heads=8, head_dim=128, hidden=4096,
                         intermediate=14336, vocab=128256),
    "tiny": dict(family="llama", layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64, intermediate=128,
                 vocab=128),
}

# kernel variants timed with `bench gpu --tune` (see benchmarks/NOTES.md for what each was expected to do)
TUNE = [{}, {"block": 64}, {"block": 16}, {"num_warps": 2}, {"num_warps": 8}, {"num_stages": 2}, {"num_stages": 4},
        {"waves": 4}, {"waves": 16}]

# score-kernel variants (tokens per program, columns per product, warps) timed by `tune_score_kernel`
SCORE_TUNE = [(64, 64, 4), (128, 64, 4), (64, 32, 4)]

# ---- tidy tables ---------------------------------------------------------------------------------------------
META = ["device", "device_name", "torch", "transformers", "triton", "date", "command", "git"]
MODEL_COLS = ["model", "weights", "dtype", "layers", "heads", "kv_heads", "head_dim", "hidden"]
TABLES: dict[str, list[str]] = {
    # one decode configuration: median time per step over the steps after warm-up
    "decode": MODEL_COLS + ["sweep", "policy", "budget", "context", "batch", "layout", "impl", "steps",
                            "decode_ms", "decode_ms_p10", "decode_ms_p90", "tokens_per_s", "kept_bytes",
                            "allocated_bytes", "full_kv_bytes", "weight_bytes", "bandwidth_GBps", "floor_ms",
                            "floor_ratio", "bound_speedup", "peak_alloc_bytes", "peak_reserved_bytes", "status",
                            "note"],
    # one prefill (with layer-by-layer compression by `policy`, or FullKV)
    "prefill": MODEL_COLS + ["policy", "budget", "context", "chunk", "slack", "prefill_s", "scoring_total_s",
                             "peak_alloc_bytes", "peak_reserved_bytes", "kept_bytes", "allocated_bytes",
                             "full_kv_bytes", "weight_bytes", "status", "note"],
    # scoring + selection of one policy during one prefill, against that prefill's time
    "scoring": MODEL_COLS + ["policy", "budget", "context", "slack", "scoring_s", "prefill_s", "fraction", "kept_bytes",
                             "allocated_bytes", "alloc_over_kept"],
    # one step of scoring + selection on one synthetic layer of a real shape (where the scoring time goes)
    "parts": ["shape", "part", "context", "budget", "ms_per_layer", "ms_per_model", "note"],
    # correctness of a fast path against the reference
    "check": ["what", "config", "rel_err", "tol", "ok"],
    "bandwidth": ["bytes", "ms", "GBps"],
    # the split-KV attention kernel alone, one layer, against the copy bandwidth
    "kernel": ["config", "impl", "split", "block", "num_warps", "num_stages", "kv_bytes", "us", "GBps",
               "frac_of_copy"],
    "load": ["what", "seconds", "note"],
    "notebooks": ["notebook", "param_set", "seconds", "status"],
}


def environment(command: str | None = None) -> dict:
    """The metadata every row carries."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if dev == "cuda" else (platform.processor() or platform.machine())
    try:
        import transformers
        tver = transformers.__version__
    except Exception:  # pragma: no cover
        tver = ""
    try:
        import triton
        trv = triton.__version__
    except Exception:
        trv = ""
    try:
        git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()  # '-dirty': the run used uncommitted changes
    except Exception:  # pragma: no cover
        git = ""
    cmd = command or "python -m flowkv_utils.bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return {"device": dev, "device_name": name, "torch": torch.__version__, "transformers": tver, "triton": trv,
            "date": _dt.datetime.now().isoformat(timespec="seconds"), "command": cmd, "git": git}


def row(table: str, meta: dict, **values) -> dict:
    """A row of `table` with every column (missing values None); unknown names raise, naming the known ones."""
    if table not in TABLES:
        raise ValueError(f"table={table!r}: known tables are {', '.join(TABLES)}")
    cols = TABLES[table]
    unknown = sorted(set(values) - set(cols))
    if unknown:
        raise ValueError(f"table {table!r}: unknown column(s) {', '.join(unknown)}; columns are {', '.join(cols)}")
    out = {k: meta.get(k) for k in META}
    out.update({k: values.get(k) for k in cols})
    return out


class Recorder:
    """Appends rows to <out>/<table>.csv as they are measured (a run cut short keeps what it measured) and
    keeps them in memory; `save_meta` writes <out>/meta.json."""

    def __init__(self, out: Path | str | None, meta: dict, echo: bool = True):
        self.out = Path(out) if out else None
        self.meta = meta
        self.rows: dict[str, list[dict]] = {}
        self.echo = echo
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)

    def add(self, table: str, **values) -> dict:
        r = row(table, self.meta, **values)
        self.rows.setdefault(table, []).append(r)
        if self.out:
            path = self.out / f"{table}.csv"
            new = not path.exists()
            with open(path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(r))
                if new:
                    w.writeheader()
                w.writerow(r)
        if self.echo:
            short = {k: v for k, v in values.items() if v is not None and k not in MODEL_COLS}
            print(f"[{table}] " + " ".join(f"{k}={_fmt(v)}" for k, v in short.items()), flush=True)
        return r

    def frame(self, table: str):
        import pandas as pd

        return pd.DataFrame(self.rows.get(table, []), columns=META + TABLES[table])

    def save_meta(self, **extra) -> None:
        """Write <out>/meta.json: the run's metadata plus `extra`, merged into what the file already holds."""
        if self.out:
            path = self.out / "meta.json"
            old = json.loads(path.read_text()) if path.exists() else {}
            path.write_text(json.dumps({**old, **self.meta, **extra}, indent=2, default=str))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ---- measuring -----------------------------------------------------------------------------------------------
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str | torch.device = "cpu", nbytes: int | None = None, reps: int = 10) -> dict:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written (median of reps copies)."""
    device = torch.device(device)
    nbytes = nbytes or (2 << 30 if device.type == "cuda" else 256 << 20)
    a = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for i in range(reps + 2):
        sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    t = sorted(times)[len(times) // 2]
    del a, b
    return {"bytes": 2 * nbytes, "ms": 1e3 * t, "GBps": 2 * nbytes / t / 1e9}


def weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: every parameter once, the input embedding table excluded (one row
    is read) unless it is tied to the LM head."""
    seen, total = set(), 0
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb
    for p in model.parameters():
        if id(p) in seen or (p is emb and not tied):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def model_cols(model, weights: str) -> dict:
    s = shape_of(model)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return dict(model=s.name, weights=weights, dtype=dtype, layers=s.layers, heads=s.heads, kv_heads=s.kv_heads,
                head_dim=s.head_dim, hidden=s.hidden)


def full_kv_bytes(shape: ModelShape, n: int, dtype_bytes: int) -> int:
    return shape.kv_bytes_per_token(dtype_bytes) * n


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak(device) -> tuple[int | None, int | None]:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    return None, None


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _quantiles(ms: list[float]) -> tuple[float, float, float]:
    s = sorted(ms)
    q = lambda f: s[min(len(s) - 1, max(0, int(round(f * (len(s) - 1)))))]
    return q(0.5), q(0.1), q(0.9)


def time_fast_decode(model, cache: StaticRaggedCache, steps: int = 20, warmup: int = 3, graph: bool = True,
                     impl: str = "auto", fuse: bool | None = None) -> tuple[list[float], FastDecoder]:
    """Per-step times (ms) of FastDecoder after warm-up; on CUDA each replay is timed with CUDA events."""
    cache.rewind()
    dec = FastDecoder(model, cache, impl=impl, fuse=fuse)
    cuda = cache.device.type == "cuda"
    if graph and cuda:
        dec.capture()
    ids = torch.randint(0, model.config.vocab_size, (cache.batch,), device=cache.device)
    dec.step(ids)
    for _ in range(warmup):
        dec.step()
    ms = []
    for _ in range(steps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dec.step_no_check() if dec.graph is not None else dec.step()
            b.record()
            b.synchronize()
            ms.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            dec.step()
            ms.append(1e3 * (time.perf_counter() - t0))
    return ms, dec


def time_generate_decode(model, cache: RaggedCache, steps: int = 5, warmup: int = 1, attend=None) -> list[float]:
    """Per-step times (ms) of `generate.decode` (the eager reference path; attend=None: RaggedCache.attend)."""
    dev = next(model.parameters()).device
    ms = []
    for i in range(warmup + steps):
        tok = torch.randint(0, model.config.vocab_size, (1, 1))
        sync(dev)
        t0 = time.perf_counter()
        generate.decode(model, cache, tok, attend=attend)
        sync(dev)
        if i >= warmup:
            ms.append(1e3 * (time.perf_counter() - t0))
    return ms


def decode_row(rec: Recorder, model, cache: StaticRaggedCache, *, weights: str, bw: dict, policy: str,
               budget, context: int, sweep: str, layout: str = "ragged", steps: int = 20, warmup: int = 3,
               graph: bool = True, impl: str = "auto", ms: list[float] | None = None, impl_label: str | None = None,
               note: str | None = None) -> dict:
    """Time FastDecoder on `cache` (unless ms is given) and record one decode row with its floor."""
    dev = cache.device
    if ms is None:
        ms, dec = time_fast_decode(model, cache, steps, warmup, graph, impl)
        impl_label = impl_label or f"{dec.label}{'+graph' if dec.graph is not None else ''}"
        del dec
    med, p10, p90 = _quantiles(ms)
    W = weight_bytes(model)
    kept = cache.kept_bytes()
    s = shape_of(model)
    esz = cache.layers[0].k.element_size()
    full = full_kv_bytes(s, context, esz) * cache.batch
    floor = 1e3 * (W + kept) / (bw["GBps"] * 1e9)
    pa, pr = peak(dev)
    return rec.add("decode", **model_cols(model, weights), sweep=sweep, policy=policy, budget=budget,
                   context=context, batch=cache.batch, layout=layout, impl=impl_label, steps=len(ms), decode_ms=med,
                   decode_ms_p10=p10, decode_ms_p90=p90, tokens_per_s=1e3 * cache.batch / med, kept_bytes=kept,
                   allocated_bytes=cache.allocated_bytes(), full_kv_bytes=full, weight_bytes=W,
                   bandwidth_GBps=bw["GBps"], floor_ms=floor, floor_ratio=med / floor,
                   bound_speedup=(W + full) / (W + kept), peak_alloc_bytes=pa, peak_reserved_bytes=pr,
                   status="ok", note=note)


def prompt_ids(n: int, vocab: int, tok=None, seed: int = 0) -> torch.Tensor:
    """(1, n) prompt ids: real prose (the stdlib-docstring haystack) through the tokenizer when one is given,
    else random ids (random-weight models: speed does not depend on the tokens)."""
    if tok is not None:
        try:
            from .tasks.haystack import text
            body = text()
        except Exception:  # the haystack module is optional here
            body = " ".join(f"Sentence {i} of the benchmark prompt says nothing in particular." for i in range(2000))
        ids = tok(body, return_tensors="pt")["input_ids"][0]
        reps = math.ceil(n / max(1, ids.numel()))
        return ids.repeat(reps)[:n].view(1, n)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g)


# ---- one context: prefill with layer-wise compression, scoring overhead, decode of the real compressed cache ----
def prefill_context(rec: Recorder, model, n: int, *, weights: str, policy: str = "flowkv_global",
                    budget: float | int = 0.05, also: tuple[str, ...] = ("snapkv", "flowkv"), window: int = 32,
                    chunk: int | None = 8192, tok=None, keep_scores: bool = True, slack: float = 0.25):
    """Prefill n tokens compressing layer by layer with `policy` (scoring + selection of `also` timed on the same
    layers). Records a prefill row and one scoring row per policy; returns the compressor (its cache, counts)."""
    dev = next(model.parameters()).device
    s = shape_of(model)
    esz = next(model.parameters()).element_size()
    ids = prompt_ids(n, model.config.vocab_size, tok)
    free_memory()
    reset_peak(dev)
    comp = LayerwiseCompressor(model, ids, policy, budget if policy != "fullkv" else 1.0, window=window,
                               also=also if policy != "fullkv" else (), keep_scores=keep_scores, slack=slack)
    sync(dev)
    t0 = time.perf_counter()
    prefill(model, ids, window=window, chunk=chunk, on_layer=comp, keep_kv=False)
    sync(dev)
    total = time.perf_counter() - t0
    comp.finish_counts()
    hooks = sum(comp.seconds.values())
    pa, pr = peak(dev)
    kept = sum(lay.k.numel() * lay.k.element_size() * 2 for lay in comp.layers)
    alloc = sum(lay.k.untyped_storage().nbytes() + lay.v.untyped_storage().nbytes() for lay in comp.layers)
    full = full_kv_bytes(s, n, esz)
    mc = model_cols(model, weights)
    rec.add("prefill", **mc, policy=policy, budget=budget if policy != "fullkv" else None, context=n, chunk=chunk,
            slack=slack if policy == "flowkv_global" else None, prefill_s=total - hooks, scoring_total_s=hooks, peak_alloc_bytes=pa, peak_reserved_bytes=pr,
            kept_bytes=kept, allocated_bytes=alloc, full_kv_bytes=full, weight_bytes=weight_bytes(model),
            status="ok", note="layer-wise compression inside prefill; prefill_s excludes the scoring hooks")
    if policy != "fullkv":
        per_token = s.kv_bytes_per_token(esz) / s.layers / s.kv_heads  # bytes of one (ℓ, g, j) entry
        for name in comp.names:
            kb = int(comp.counts[name].sum()) * per_token
            rec.add("scoring", **mc, policy=name, budget=budget, context=n,
                    slack=slack if name == policy == "flowkv_global" else None, scoring_s=comp.seconds[name],
                    prefill_s=total - hooks, fraction=comp.seconds[name] / (total - hooks), kept_bytes=kb,
                    allocated_bytes=alloc if name == policy else None,
                    alloc_over_kept=alloc / kept if name == policy and kept else None)
    return comp


def synthetic_cache(counts: torch.Tensor, batch: int, shape: ModelShape, n: int, capacity: int, dtype, device,
                    layout: str = "ragged") -> StaticRaggedCache:
    """Random-content cache with per-head lengths counts (L, G) replicated over the batch; layout 'padded' pads
    every head of a layer to the layer's longest head (a dense (G, max) layout)."""
    if layout not in ("ragged", "padded"):
        raise ValueError(f"layout={layout!r}: allowed are 'ragged', 'padded'")
    c = counts.clone().long()
    if layout == "padded":
        c = c.amax(-1, keepdim=True).expand_as(c).clone()
    lengths = c.unsqueeze(1).expand(c.shape[0], batch, c.shape[1]).contiguous()  # (L, B, G)
    return StaticRaggedCache.from_lengths(lengths, shape.head_dim, capacity, n, dtype=dtype, device=device)


# ---- CPU sweeps (embedded model) -----------------------------------------------------------------------------
def context_sweep(model, contexts: list[int], *, policies: tuple[str, ...] = ("fullkv", "snapkv", "flowkv",
                  "flowkv_global"), budget: float | int = 0.1, batch: int = 1, steps: int = 8, warmup: int = 2,
                  window: int = 32, tok=None, weights: str = EMBEDDED_WEIGHTS, rec: Recorder | None = None,
                  bw: dict | None = None, reference_steps: int = 3) -> Recorder:
    """Per context: one prefill compressing with FlowKV (global) while timing every policy's scoring, then decode
    per policy from caches of that policy's real per-head lengths (FastDecoder; on CUDA a graph), plus the eager
    reference `generate.decode` on the real compressed cache. Works on CPU and CUDA."""
    dev = next(model.parameters()).device
    rec = rec or Recorder(None, environment(), echo=False)
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
                       impl_label="reference-eager", note="generate.decode with RaggedCache.attend (per-head loop)")
        del cache
        for p in policies:
            counts = comp.kept_counts(p, budget) if p != "flowkv_global" else comp.counts[p]
            sc = synthetic_cache(counts, batch, s, n, steps + warmup + 4, dtype, dev)
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
    from .policies import STUDY, get_policy

    rec = rec or Recorder(None, environment(), echo=False)
    dev = next(model.parameters()).device
    ids = prompt_ids(n, model.config.vocab_size, tok)
    sync(dev)
    t0 = time.perf_counter()
    pf = prefill(model, ids, window=window)
    sync(dev)
    t_pf = time.perf_counter() - t0
    mc = model_cols(model, EMBEDDED_WEIGHTS if tok is not None else RANDOM_WEIGHTS)
    for name in names or STUDY:
        pol = get_policy(name) if name == "fullkv" else get_policy(name, window=window)
        pf.drop_attention_cache()  # each policy pays for its own window attention
        sync(dev)
        t0 = time.perf_counter()
        res = pol(pf, budget)
        sync(dev)
        t = time.perf_counter() - t0
        cache = generate.build_cache(pf, res, capacity=1)
        kept, alloc = cache.kept_bytes(), cache.allocated_bytes()
        rec.add("scoring", **mc, policy=name, budget=budget, context=n, scoring_s=t, prefill_s=t_pf,
                fraction=t / t_pf, kept_bytes=kept, allocated_bytes=alloc, alloc_over_kept=alloc / kept)
        del cache, res
    return rec


def median_ms(fn, device, reps: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in ms, the device synchronised around every call."""
    ms = []
    for i in range(warmup + reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            ms.append(1e3 * (time.perf_counter() - t0))
    return _quantiles(ms)[0]


def scoring_parts(rec: Recorder, shape: str = "llama3-8b", contexts: tuple[int, ...] = (131072,),
                  budget: float = 0.05, window: int = 32, device: str = "cuda", reps: int = 5,
                  tune: bool = False, extras: bool = True) -> Recorder:
    """Where FlowKV's scoring + selection time goes, one synthetic layer of a real shape at a time (random bf16
    q/k/v and W_O): window attention, the Gram-form score, the layer's top-k, the per-layer norm, and the global
    cascade (one `add` per layer of the model, each followed by the per-layer count read-back a compressor does).
    SnapKV's score + per-head top-k is timed on the same window attention for comparison; tune: also time the
    score kernel's launch-setting variants (`kernels.SCORE_CONFIG`); extras: also the kernel at other product
    precisions (information only)."""
    from .policies.flowkv import gram_blocks

    cfg = SHAPES[shape]
    dev = torch.device(device)
    dt = torch.bfloat16 if dev.type != "cpu" else torch.float32
    gen = torch.Generator(device=dev).manual_seed(0)
    H, d, D = cfg["heads"], cfg["head_dim"], cfg["hidden"]
    gram = gram_blocks(torch.randn(H, d, D, device=dev, dtype=dt, generator=gen) * D ** -0.5, cfg["kv_heads"])
    for n in contexts:
        _parts_at(rec, shape, n, gram, budget, window, dt, gen, reps, tune, extras)
        free_memory()
    return rec


def _parts_at(rec: Recorder, shape: str, n: int, gram: torch.Tensor, budget: float, window: int, dt, gen,
              reps: int, tune: bool, extras: bool) -> None:
    """`scoring_parts` at one context n (random inputs drawn here, freed on return)."""
    from .attention import window_attention
    from .budgets import check_window, resolve_budget
    from .policies.base import snap_scores, topk_flat, topk_per_row
    from .policies.flowkv import GlobalCascade, flowkv_scores

    cfg = SHAPES[shape]
    H, G, d, D, L = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["hidden"], cfg["layers"]
    dev = gram.device
    m = n - window
    b = resolve_budget(budget, n, L, G)
    check_window(n, window, int(b.per_slot().min()), "flowkv")
    q = torch.randn(H, window, d, device=dev, dtype=dt, generator=gen)
    k = torch.randn(G, n, d, device=dev, dtype=dt, generator=gen)
    v = torch.randn(G, n, d, device=dev, dtype=dt, generator=gen)
    resid = torch.randn(window, D, device=dev, dtype=dt, generator=gen)
    A = window_attention(q, k, d ** -0.5)
    s = flowkv_scores(A, v, gram, m)
    layer_total = int(b.per_slot()[0].sum()) - window * G
    slots = (b.per_slot()[0] - window).to(dev)
    parts = {
        "window attention (H, w, n), float32": lambda: window_attention(q, k, d ** -0.5),
        "flowkv score (Gram form), as used": lambda: flowkv_scores(A, v, gram, m),
        "flowkv score, PyTorch path": lambda: flowkv_scores(A, v, gram, m, impl="torch"),
        "flowkv layer top-k (stable sort)": lambda: topk_flat(s, layer_total),
        "per-layer norm N2 (host read)": lambda: float(resid.float().norm()),
        "snapkv score + per-head top-k": lambda: topk_per_row(snap_scores(A, G, window), slots),
    }
    if extras and dev.type == "cuda" and triton_available():  # for information: other product precisions
        from .kernels import flowkv_scores_triton
        for prec in ("tf32x3", "tf32"):
            parts[f"flowkv score, Triton {prec} products [not used]"] = \
                lambda prec=prec: flowkv_scores_triton(A, v, gram, m, precision=prec)
    if tune and dev.type == "cuda" and triton_available():  # before the timings: 'as used' is the fastest
        tune_score_kernel(rec, A, v, gram, m, reps, f"{shape}, n={n}")
    for part, fn in parts.items():
        t = median_ms(fn, dev, reps)
        rec.add("parts", shape=shape, part=part, context=n, budget=budget, ms_per_layer=t, ms_per_model=t * L)
    k_total = int(b.total) - window * L * G
    scales = torch.rand(L, generator=torch.Generator().manual_seed(1)).tolist()

    def cascade():
        c = GlobalCascade(k_total)
        for li in range(L):
            c.add(li, s * (0.5 + scales[li]))
            torch.stack(list(c.kept_counts().values())).tolist()
    t = median_ms(cascade, dev, max(1, reps // 2))
    rec.add("parts", shape=shape, part="global cascade add + counts", context=n, budget=budget,
            ms_per_layer=t / L, ms_per_model=t, note=f"{L} adds of {G * m} entries, k = {k_total}")


def tune_score_kernel(rec: Recorder, A, v, gram, m: int, reps: int = 5, label: str = "") -> dict:
    """Time the score kernel's launch-setting variants on one layer's inputs, keep the fastest in
    `kernels.SCORE_CONFIG` (and return it); one 'parts' row per variant."""
    from . import kernels
    from .policies.flowkv import flowkv_scores

    base = dict(kernels.SCORE_CONFIG)
    best, best_t = base, float("inf")
    for tokens, cols, warps in SCORE_TUNE:
        cfg = dict(base, tokens=tokens, cols=cols, num_warps=warps)
        kernels.SCORE_CONFIG.update(cfg)
        name = f"score kernel tokens={tokens} cols={cols} warps={warps}"
        try:
            t = median_ms(lambda: flowkv_scores(A, v, gram, m), A.device, reps)
        except Exception as e:  # e.g. triton's OutOfResources (shared memory): that variant does not run here
            rec.add("parts", shape=label, part=name, context=A.shape[-1], note=f"failed: {str(e)[:120]}")
            continue
        rec.add("parts", shape=label, part=name, context=A.shape[-1], ms_per_layer=t, note="launch-setting variant")
        if t < best_t:
            best, best_t = cfg, t
    kernels.SCORE_CONFIG.update(best)
    return {k: best[k] for k in ("tokens", "cols", "num_warps")}


def shape_model(shape: str, device, longest: int, dtype=torch.bfloat16, layers: int | None = None):
    """A random-weight model of one of SHAPES (optionally with fewer layers), positions for `longest` + 4096
    tokens, named "<shape>[ N layers] (random weights, real shape)" so every row and figure says so."""
    from .models import random_model

    cfg = SHAPES[shape]
    model = random_model(cfg["family"], layers or cfg["layers"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"],
                         cfg["hidden"], vocab=cfg["vocab"], intermediate=cfg["intermediate"], dtype=dtype,
                         device=str(device), max_positions=longest + 4096)
    model.config._name_or_path = f"{shape}{f' {layers} layers' if layers else ''} ({RANDOM_WEIGHTS})"
    return model


def scoring_prefills(rec: Recorder, shape: str = "llama3-8b", contexts: tuple[int, ...] = (131072,),
                     budget: float = 0.05, slacks: tuple[float, ...] = (0.0,), device: str = "cuda",
                     chunk: int = 8192) -> Recorder:
    """Whole-model prefills of a random-weight model of `shape` compressing with FlowKV (global) layer by layer,
    once per re-packing slack: the scoring rows (every policy's share of prefill) and peak memory of each."""
    dev = torch.device(device)
    model = shape_model(shape, dev, max(contexts), torch.bfloat16 if dev.type == "cuda" else torch.float32)
    warm = min(8192, min(contexts))  # first calls pay for library initialisation: not recorded
    prefill_context(Recorder(None, rec.meta, echo=False), model, warm, weights=RANDOM_WEIGHTS, budget=budget,
                    chunk=chunk)
    for n in contexts:
        for slack in slacks:
            prefill_context(rec, model, n, weights=RANDOM_WEIGHTS, budget=budget, chunk=chunk, slack=slack,
                            keep_scores=False)
            free_memory()
    del model
    free_memory()
    return rec


def load_times(rec: Recorder) -> Recorder:
    """Embedded model: cold load (dequantise into a temporary FLOWKV_CACHE) and warm load (cached)."""
    from .models import load_model

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
    from . import runner

    out = REPO / "runs" / f"bench-{param_set}"
    for nb in runner.discover(names):
        try:
            (stem, secs), = runner.run([nb], param_set, {}, out, out / "figures", progress=False)
            rec.add("notebooks", notebook=stem, param_set=param_set, seconds=secs, status="ok")
        except SystemExit as e:
            rec.add("notebooks", notebook=nb.stem, param_set=param_set, seconds=None, status=f"failed: {e}")
    return rec


# ---- GPU sweep -----------------------------------------------------------------------------------------------
def kernel_checks(rec: Recorder, device="cuda", seed: int = 0) -> bool:
    """Split-KV (Triton when available, and the torch version) against RaggedCache.attend on fresh random inputs:
    uneven head lengths, empty heads, several tail fills, GQA groups of 1–8, head dims 64/128, bf16."""
    from .cache import RaggedLayer

    torch.manual_seed(seed)
    impls = ["torch"] + (["triton"] if triton_available() and torch.device(device).type == "cuda" else [])
    ok_all = True
    configs = [  # (G, r, d, lengths, used)
        (8, 4, 128, [20000, 0, 1, 4097, 333, 12000, 64, 5], 0),
        (8, 4, 128, [100] * 8, 7),
        (2, 4, 64, [0, 0], 3),
        (3, 3, 64, [1, 2, 3], 0),
        (4, 8, 128, [50000, 10, 0, 777], 15),
        (8, 1, 128, [513, 1024, 2047, 1, 0, 64, 65, 4096], 2),
    ]
    for G, r, d, lens, used in configs:
        lengths = torch.tensor(lens)
        off = torch.zeros(G + 1, dtype=torch.long)
        off[1:] = torch.cumsum(lengths, 0)
        N, cap = int(off[-1]), 16
        bf = torch.bfloat16
        k, v = (torch.randn(N, d, dtype=bf, device=device) for _ in range(2))
        tk, tv = (torch.randn(G, cap, d, dtype=bf, device=device) for _ in range(2))
        cache = RaggedCache([RaggedLayer(k, v, off, tk, tv)], next_pos=N)
        cache.used = used
        q = torch.randn(G * r, 1, d, dtype=bf, device=device)
        ref = cache.attend(0, q.double(), 1, d ** -0.5) if device == "cpu" else None
        if ref is None:  # float64 reference through the same code on upcast inputs
            lay64 = RaggedLayer(k.double(), v.double(), off, tk.double(), tv.double())
            c64 = RaggedCache([lay64], next_pos=N)
            c64.used = used
            ref = c64.attend(0, q.double(), 1, d ** -0.5)
        for impl in impls:
            out = ragged_attend(cache, 0, q, 1, d ** -0.5, impl=impl)
            err = float((out.double() - ref).norm() / ref.norm())
            ok = bool(torch.isfinite(out).all()) and err < 1e-2
            ok_all &= ok
            rec.add("check", what=f"split-KV {impl} vs RaggedCache.attend (float64)",
                    config=f"G={G} r={r} d={d} lengths={lens} tail={used + 1}", rel_err=err, tol=1e-2, ok=ok)
    return ok_all


def score_checks(rec: Recorder, device="cuda") -> bool:
    """FlowKV's score kernel (Triton) against the PyTorch Gram form (itself tested against the direct
    transcription) on fresh random inputs: GQA groups of 1–8, head dims 64/80/128, windows 8–32, bf16 values."""
    from .policies.flowkv import flowkv_scores, gram_blocks

    ok_all = True
    for G, r, d, D, w, n in [(8, 4, 128, 4096, 32, 70000), (3, 3, 64, 576, 32, 5000), (2, 1, 128, 256, 17, 999),
                             (4, 8, 80, 2560, 8, 3001)]:
        A = torch.softmax(torch.randn(G * r, w, n, device=device) * 3, -1)
        v = torch.randn(G, n, d, device=device, dtype=torch.bfloat16)
        gram = gram_blocks(torch.randn(G * r, d, D, device=device, dtype=torch.bfloat16) * D ** -0.5, G)
        m = n - w
        ref = flowkv_scores(A, v, gram, m, impl="torch")
        out = flowkv_scores(A, v, gram, m, impl="triton")
        err = float((out.double() - ref.double()).norm() / ref.double().norm())
        ok = bool(torch.isfinite(out).all()) and err < 1e-4
        ok_all &= ok
        rec.add("check", what="FlowKV score Triton vs PyTorch (float32)", config=f"G={G} r={r} d={d} D={D} w={w} "
                f"n={n}", rel_err=err, tol=1e-4, ok=ok)
    return ok_all


def kernel_speed(rec: Recorder, bw: dict, device="cuda", n: int = 204800, budget: float = 0.05, G: int = 8,
                 r: int = 4, d: int = 128, variants: list[dict] | None = None, reps: int = 50,
                 seed: int = 0) -> tuple[list[dict], list[float]]:
    """Time the Triton split-KV attention of one layer (Llama-3-8B geometry by default) on full and compressed
    lengths (uniform, and ragged log-normal per-head lengths of the same total), over 8 layers' buffers (so that
    the L2 cache does not serve the reads) captured in one CUDA graph (so that Python launch costs do not count). variants: dicts overriding kernels.CONFIG (block, num_warps,
    num_stages, waves) or a fixed split. Returns (the variants' full configs, their summed times in µs)."""
    from .kernels import choose_split, make_workspace, split_kv_triton, triton_tables

    g = torch.Generator().manual_seed(seed)
    kept = int(budget * n)
    ragged = torch.exp(torch.randn(G, generator=g))  # log-normal per-head shares
    ragged = (ragged / ragged.sum() * kept * G).round().long().clamp(min=0)
    configs = {f"full n={n}": torch.full((G,), n), f"uniform {budget:.0%}": torch.full((G,), kept),
               f"ragged {budget:.0%} (log-normal heads)": ragged}
    from . import kernels

    variants = variants or [{}]
    totals = [0.0] * len(variants)
    for name, lens in configs.items():
        off = torch.zeros(G + 1, dtype=torch.long)
        off[1:] = torch.cumsum(lens, 0)
        N = int(off[-1])
        layers = [(torch.randn(N, d, dtype=torch.bfloat16, device=device),
                   torch.randn(N, d, dtype=torch.bfloat16, device=device),
                   torch.randn(G, 64, d, dtype=torch.bfloat16, device=device),
                   torch.randn(G, 64, d, dtype=torch.bfloat16, device=device)) for _ in range(8)]
        q = torch.randn(G, r, d, dtype=torch.bfloat16, device=device)
        nt = torch.tensor([1], device=device)
        kv_bytes = 2 * N * d * 2
        for vi, var in enumerate(variants):
            cfg = {**kernels.CONFIG, **{k: v for k, v in var.items() if k != "split"}}
            split = var.get("split") or choose_split(N, cfg["waves"] * torch.cuda.get_device_properties(
                device).multi_processor_count, cfg["block"])
            items = work_items(off, split, device)
            tabs = [triton_tables(items, *lay) for lay in layers]
            ws = make_workspace(items, G, r, d, torch.bfloat16, device)
            kw = {k: cfg[k] for k in ("num_warps", "num_stages", "block")}
            for i in range(3):
                split_kv_triton(q, tabs[i % 8], nt, d ** -0.5, ws, **kw)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()  # 8 calls (one per layer buffer) in a graph: no Python launch cost
            with torch.cuda.graph(graph):
                for i in range(8):
                    split_kv_triton(q, tabs[i], nt, d ** -0.5, ws, **kw)
            graph.replay()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(reps):
                graph.replay()
            b.record()
            b.synchronize()
            us = 1e3 * a.elapsed_time(b) / (8 * reps)
            del graph
            totals[vi] += us
            rec.add("kernel", config=f"{name} G={G} r={r} d={d}", impl=f"triton waves={cfg['waves']}", split=split,
                    block=cfg["block"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], kv_bytes=kv_bytes,
                    us=us, GBps=kv_bytes / us / 1e3, frac_of_copy=kv_bytes / us / 1e3 / bw["GBps"])
        del layers, tabs, ws
        free_memory()
    return [{**kernels.CONFIG, **v} for v in variants], totals


def decode_parity(rec: Recorder, model, n: int, budget=0.05, steps: int = 4, window: int = 32,
                  tol: float | None = 3e-2) -> bool:
    """Whole-model check: FastDecoder (graph) logits vs generate.decode with the reference attention, on the real
    compressed cache of an n-token prefill (FlowKV global), over a few greedy steps. tol=None records the error
    without judging it (deep random-weight models amplify bf16 rounding: compare with `chunked_prefill_check`'s
    error on the same model, two exact computations that differ only in rounding)."""
    dev = next(model.parameters()).device
    ids = prompt_ids(n, model.config.vocab_size, seed=1)
    comp = LayerwiseCompressor(model, ids, "flowkv_global", budget, window=window)
    prefill(model, ids, window=window, chunk=4096, on_layer=comp, keep_kv=False)
    ref_cache = comp.cache(capacity=steps + 1)
    fast = StaticRaggedCache.from_ragged([ref_cache], capacity=steps + 4)
    dec = FastDecoder(model, fast)
    if dev.type == "cuda":
        dec.capture()
    ok_all = True
    tok = torch.randint(0, model.config.vocab_size, (1,))
    for i in range(steps):
        ref = generate.decode(model, ref_cache, tok.view(1, 1))[-1]
        got = dec.step(tok.to(dev))[0].float()
        err = float((got - ref).norm() / ref.norm())
        ok = bool(torch.isfinite(got).all()) and (tol is None or err < tol)
        ok_all &= ok
        if tol is None:
            ok = "info" if ok else False
        rec.add("check", what=f"FastDecoder ({dec.label}{'+graph' if dec.graph else ''}) vs generate.decode "
                f"reference, logits", config=f"{shape_of(model).name} n={n} budget={budget} step={i}",
                rel_err=err, tol=tol, ok=ok)
        tok = ref.argmax().view(1).cpu()
    del comp, ref_cache, fast, dec
    free_memory()
    return ok_all


def chunked_prefill_check(rec: Recorder, model, n: int, chunk: int, tol: float | None = 2e-2) -> bool:
    """Chunked prefill equals unchunked (last-token logits) and does not hold n × n: peak memory of each."""
    dev = next(model.parameters()).device
    ids = prompt_ids(n, model.config.vocab_size, seed=2)
    out = {}
    for c in (None, chunk):
        free_memory()
        reset_peak(dev)
        base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
        pf = prefill(model, ids, window=32, chunk=c, keep_kv=False)
        pa, _ = peak(dev)
        out[c] = (pf.logits.float(), (pa or 0) - base)
        del pf
    err = float((out[chunk][0] - out[None][0]).norm() / out[None][0].norm())
    ok = bool(torch.isfinite(out[chunk][0]).all()) and (tol is None or err < tol)
    rec.add("check", what="chunked prefill logits vs unchunked",
            config=f"{shape_of(model).name} n={n} chunk={chunk} peak_extra_bytes unchunked={out[None][1]} "
                   f"chunked={out[chunk][1]}", rel_err=err, tol=tol, ok=ok if tol is not None else "info")
    return ok


def gpu_sweep(out: Path | str, *, shape: str = "llama3-8b", contexts: tuple[int, ...] = (8192, 32768, 65536,
              131072, 204800), budgets: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2),
              policies: tuple[str, ...] = ("fullkv", "snapkv", "flowkv", "flowkv_global"), budget: float = 0.05,
              steps: int = 30, warmup: int = 5, fullkv_prefill: bool = True, batch_search: bool = True,
              checks: bool = True, chunk: int = 8192, command: str | None = None,
              device: str = "cuda", max_batch: int = 4096, kernel_variants: list[dict] | None = None,
              slack: float = 0.25) -> Recorder:
    """The GPU sweep (see the module docstring): checks, prefill with layer-wise compression per context
    (scoring overhead per policy, peak memory), FullKV prefill peaks, decode vs context / budget / batch / layout /
    implementation, and the largest batch that fits at the longest context. Writes CSVs + meta.json to out."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench gpu needs a CUDA device (torch.cuda.is_available() is False); "
                         "--device cpu runs the same sweep on the CPU (tiny shapes only)")
    rec = Recorder(out, environment(command))
    t_start = time.perf_counter()
    bw = copy_bandwidth(dev)
    rec.add("bandwidth", **bw)
    cfg = SHAPES[shape]
    model = shape_model(shape, dev, max(contexts))
    s = shape_of(model)
    W = weight_bytes(model)
    total_mem = torch.cuda.get_device_properties(0).total_memory if dev.type == "cuda" else None
    rec.save_meta(bandwidth=bw, shape=cfg, weight_bytes=W, weights=RANDOM_WEIGHTS, gpu_total_bytes=total_mem)
    print(f"model {shape}: {W / 1e9:.2f} GB of weights read per step; bandwidth {bw['GBps']:.0f} GB/s "
          f"({time.perf_counter() - t_start:.0f} s)", flush=True)
    from . import kernels

    if dev.type == "cuda" and triton_available():
        cfgs, totals = kernel_speed(rec, bw, n=max(contexts), budget=budget, variants=kernel_variants)
        best = cfgs[min(range(len(cfgs)), key=totals.__getitem__)]
        kernels.CONFIG.update({k: best[k] for k in kernels.CONFIG})
        rec.save_meta(bandwidth=bw, shape=cfg, weight_bytes=W, weights=RANDOM_WEIGHTS, gpu_total_bytes=total_mem,
                      kernel_config=dict(kernels.CONFIG))
        print(f"kernel timing done, using {kernels.CONFIG} ({time.perf_counter() - t_start:.0f} s)", flush=True)
        if checks and not score_checks(rec, str(dev)):
            raise SystemExit("the FlowKV score kernel disagrees with the PyTorch path (see check.csv)")
        scoring_parts(rec, shape, (min(131072, max(contexts)),), budget, device=str(dev), tune=True, extras=False)
        rec.save_meta(bandwidth=bw, shape=cfg, weight_bytes=W, weights=RANDOM_WEIGHTS, gpu_total_bytes=total_mem,
                      kernel_config=dict(kernels.CONFIG), score_config=dict(kernels.SCORE_CONFIG))
        print(f"score kernel tuned, using {kernels.SCORE_CONFIG} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    if checks:
        ok = kernel_checks(rec, device=str(dev))
        # whole-model parity is judged on a 2-layer model of the same shape; the deep model's errors are recorded
        # next to its bf16 noise floor (chunked vs unchunked prefill: two exact computations, different rounding)
        small = shape_model(shape, dev, max(contexts), layers=2)
        n_chk = min(4096, min(contexts))
        ok &= decode_parity(rec, small, n_chk)
        ok &= chunked_prefill_check(rec, small, 2 * n_chk, chunk=max(64, n_chk // 2))
        del small
        free_memory()
        if s.layers > 2:
            decode_parity(rec, model, n_chk, tol=None)
            chunked_prefill_check(rec, model, 2 * n_chk, chunk=max(64, n_chk // 2), tol=None)
        print(f"checks done ({time.perf_counter() - t_start:.0f} s)", flush=True)
        if not ok:
            raise SystemExit("a fast path disagrees with the reference (see check.csv): no timings recorded")
    wl = RANDOM_WEIGHTS
    cap = steps + warmup + 8
    counts: dict[tuple, torch.Tensor] = {}
    longest = max(contexts)
    for n in contexts:
        try:
            comp = prefill_context(rec, model, n, weights=wl, policy="flowkv_global", budget=budget,
                                   also=("snapkv", "flowkv"), chunk=chunk, slack=slack)
        except torch.OutOfMemoryError as e:
            rec.add("prefill", **model_cols(model, wl), policy="flowkv_global", budget=budget, context=n,
                    chunk=chunk, status="oom", note=str(e)[:200])
            free_memory()
            continue
        for p in policies:
            for b in (budgets if n == longest else (budget,)):
                if p == "fullkv" and b != budget:
                    continue
                counts[(n, p, b)] = comp.kept_counts(p, b) if not (p == "flowkv_global" and b == budget) \
                    else comp.counts[p].clone()
        # decode of the real compressed cache (batch 1), and its first step against the reference
        cache = comp.cache(capacity=cap)
        sc = StaticRaggedCache.from_ragged([cache], capacity=cap)
        decode_row(rec, model, sc, weights=wl, bw=bw, policy="flowkv_global", budget=budget, context=n,
                   sweep="real", steps=steps, warmup=warmup, note="the cache prefill really kept (not synthetic)")
        if n == longest:
            ms = time_generate_decode(model, cache, steps=3)
            decode_row(rec, model, sc, weights=wl, bw=bw, policy="flowkv_global", budget=budget, context=n,
                       sweep="impl", ms=ms, impl_label="reference-eager",
                       note="generate.decode + RaggedCache.attend (per-head Python loop)")
            ms = time_generate_decode(model, cache, steps=3, attend=ragged_attend)
            decode_row(rec, model, sc, weights=wl, bw=bw, policy="flowkv_global", budget=budget, context=n,
                       sweep="impl", ms=ms, impl_label="triton-eager",
                       note="generate.decode + kernels.ragged_attend (Python per layer)")
        del sc, cache, comp
        free_memory()
        print(f"context {n} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    # decode vs context and budget (synthetic contents, real per-head lengths), FullKV included
    for (n, p, b), c in sorted(counts.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        sweep = "context" if b == budget else "budget"
        try:
            sc = synthetic_cache(c, 1, s, n, cap, torch.bfloat16, dev)
            decode_row(rec, model, sc, weights=wl, bw=bw, policy=p, budget=None if p == "fullkv" else b, context=n,
                       sweep=sweep, steps=steps, warmup=warmup)
            if n == longest and b == budget and p in ("flowkv_global", "fullkv"):
                ms, dec = time_fast_decode(model, sc, steps=10, warmup=2, graph=False)
                bb = None if p == "fullkv" else b
                decode_row(rec, model, sc, weights=wl, bw=bw, policy=p, budget=bb, context=n, sweep="impl",
                           ms=ms, impl_label=f"{dec.label} (no graph)", note="FastDecoder without CUDA graph")
                ms, dec = time_fast_decode(model, sc, steps=steps, warmup=warmup, fuse=False)
                decode_row(rec, model, sc, weights=wl, bw=bw, policy=p, budget=bb, context=n, sweep="impl",
                           ms=ms, impl_label=f"{dec.label}{'+graph' if dec.graph is not None else ''}",
                           note="model modules via run_layer (no fusion)")
                del dec
            if n == longest and b == budget and p in ("flowkv", "flowkv_global"):
                del sc
                free_memory()
                sc = synthetic_cache(c, 1, s, n, cap, torch.bfloat16, dev, layout="padded")
                decode_row(rec, model, sc, weights=wl, bw=bw, policy=p, budget=b, context=n, sweep="layout",
                           layout="padded", steps=steps, warmup=warmup,
                           note="every head padded to its layer's longest head (dense per-layer layout)")
            del sc
        except torch.OutOfMemoryError as e:
            rec.add("decode", **model_cols(model, wl), sweep=sweep, policy=p, budget=b, context=n, batch=1,
                    status="oom", note=str(e)[:200])
        free_memory()
    print(f"decode sweeps done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    if batch_search:
        for p in ("fullkv", "flowkv_global"):
            if (longest, p, budget) in counts:
                largest_batch(rec, model, counts[(longest, p, budget)], p, budget, longest, bw, cap, steps, warmup,
                              max_batch)
        print(f"batch search done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    if fullkv_prefill:
        for n in contexts:
            try:
                comp = prefill_context(rec, model, n, weights=wl, policy="fullkv", chunk=chunk, keep_scores=False)
                del comp
            except torch.OutOfMemoryError as e:
                rec.add("prefill", **model_cols(model, wl), policy="fullkv", context=n, chunk=chunk, status="oom",
                        note=str(e)[:200])
            free_memory()
        print(f"FullKV prefills done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    rec.save_meta(bandwidth=bw, shape=cfg, weight_bytes=W, weights=RANDOM_WEIGHTS, gpu_total_bytes=total_mem,
                  kernel_config=dict(kernels.CONFIG), score_config=dict(kernels.SCORE_CONFIG),
                  seconds=time.perf_counter() - t_start)
    return rec


def largest_batch(rec: Recorder, model, counts: torch.Tensor, policy: str, budget, n: int, bw: dict, cap: int,
                  steps: int, warmup: int, max_batch: int = 4096) -> int:
    """Decode at growing batch sizes until memory runs out (doubling, then bisection); the largest that fits is
    recorded with sweep='maxbatch', the others with sweep='batch'."""
    s = shape_of(model)
    dev = next(model.parameters()).device

    def attempt(B: int) -> bool:
        free_memory()
        reset_peak(dev)
        try:
            sc = synthetic_cache(counts, B, s, n, cap, torch.bfloat16, dev)
            decode_row(rec, model, sc, weights=RANDOM_WEIGHTS, bw=bw, policy=policy,
                       budget=None if policy == "fullkv" else budget, context=n, sweep="batch", steps=steps,
                       warmup=warmup)
            del sc
            return True
        except torch.OutOfMemoryError:
            rec.add("decode", **model_cols(model, RANDOM_WEIGHTS), sweep="batch", policy=policy, budget=budget,
                    context=n, batch=B, status="oom")
            return False
        finally:
            free_memory()

    lo, hi = 0, None
    B = 1
    while hi is None:
        if attempt(B):
            lo, B = B, B * 2
        else:
            hi = B
        if B > max_batch:
            break
    while hi is not None and hi - lo > 1 and lo >= 1:
        mid = (lo + hi) // 2
        if attempt(mid):
            lo = mid
        else:
            hi = mid
    if lo >= 1:  # re-time the largest and mark it
        rows = [r for r in rec.rows["decode"] if r["sweep"] == "batch" and r["policy"] == policy
                and r["batch"] == lo and r["status"] == "ok"]
        if rows:
            r = dict(rows[-1])
            r["sweep"], r["note"] = "maxbatch", "largest batch that fits (doubling, then bisection)"
            rec.add("decode", **{k: r[k] for k in TABLES["decode"]})
    return lo


# ---- reading stored results (notebook 04) -------------------------------------------------------------------
def load_results(folder: Path | str) -> dict:
    """The tables a `bench gpu --out folder` run wrote: {'meta': dict, '<table>': DataFrame, ...}."""
    import pandas as pd

    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(f"{folder}: no meta.json — create it with "
                                f"`python -m flowkv_utils.bench gpu --out {folder}` on a CUDA machine")
    out: dict = {"meta": json.loads((folder / "meta.json").read_text())}
    for table in TABLES:
        f = folder / f"{table}.csv"
        if f.is_file():
            out[table] = pd.read_csv(f)
    return out


def oom_frontier(prefill_rows, capacity_bytes: float) -> dict[str, float]:
    """Per policy, the context at which prefill peak memory would reach the device's capacity, extrapolated along
    the straight line through the two longest measured contexts (peak memory grows linearly with n)."""
    out = {}
    for policy, g in prefill_rows[prefill_rows.status == "ok"].groupby("policy"):
        g = g.sort_values("context").tail(2)
        if len(g) < 2:
            continue
        (n0, p0), (n1, p1) = g[["context", "peak_alloc_bytes"]].to_numpy(dtype=float)
        slope = (p1 - p0) / (n1 - n0)  # bytes per prompt token
        out[policy] = n1 + (capacity_bytes - p1) / slope if slope > 0 else float("inf")
    return out


def bars(res: dict, budget: float = 0.05, scoring_context: int = 131072):
    """The project's throughput bars, computed from stored results (printed, never asserted): decode step vs floor
    at the longest context, the FlowKV speed-up against the bytes-ratio bound, throughput at the largest batch,
    scoring overhead at `scoring_context`, ragged allocated vs kept bytes. Returns a DataFrame (bar, value, target,
    reached; reached None where there is no target)."""
    import pandas as pd

    d = res["decode"][res["decode"].status == "ok"]
    n = int(d.context.max())
    ctx = d[(d.sweep == "context") & (d.context == n) & (d.batch == 1)]
    full = ctx[ctx.policy == "fullkv"].iloc[0]
    rows = []
    for pol in ("fullkv", "flowkv", "flowkv_global"):
        r = ctx[(ctx.policy == pol) & ((ctx.budget == budget) | (pol == "fullkv"))]
        if len(r):
            r = r.iloc[0]
            rows.append((f"decode step / floor, {pol}, n={n}, batch 1", r.floor_ratio, "≤ 1.3", r.floor_ratio <= 1.3))
    for pol in ("flowkv", "flowkv_global"):
        r = ctx[(ctx.policy == pol) & (ctx.budget == budget)]
        if len(r):
            r = r.iloc[0]
            frac = (full.decode_ms / r.decode_ms) / r.bound_speedup
            rows.append((f"{pol} speed-up over FullKV / bytes-ratio bound ({full.decode_ms / r.decode_ms:.2f}× of "
                         f"{r.bound_speedup:.2f}×), n={n}", frac, "≥ 0.8", frac >= 0.8))
    mb = d[d.sweep == "maxbatch"].set_index("policy")
    if {"fullkv", "flowkv_global"} <= set(mb.index):
        f, k = mb.loc["fullkv"], mb.loc["flowkv_global"]
        rows.append((f"tokens/s at the largest batch, n={n}: FlowKV {budget:.0%} (B={k.batch}) / FullKV "
                     f"(B={f.batch}) = {k.tokens_per_s:.0f} / {f.tokens_per_s:.0f}", k.tokens_per_s / f.tokens_per_s,
                     "≥ 10", k.tokens_per_s / f.tokens_per_s >= 10))
    if "scoring" in res:
        sc = res["scoring"]
        for pol in ("flowkv", "flowkv_global", "snapkv"):
            r = sc[(sc.policy == pol) & (sc.context == scoring_context)]
            if len(r):
                v = float(r.fraction.iloc[0])
                rows.append((f"{pol} scoring+selection / prefill, n={scoring_context}", v, "≤ 0.05", v <= 0.05))
    rag = d[d.layout == "ragged"]
    worst = float((rag.allocated_bytes / rag.kept_bytes).max())
    rows.append(("ragged cache allocated / kept bytes (worst row)", worst, "≤ 1.05", worst <= 1.05))
    return pd.DataFrame(rows, columns=["bar", "value", "target", "reached"])


# ---- CLI -----------------------------------------------------------------------------------------------------
def _embedded(device: str = "cpu"):
    from .models import load_model

    return load_model("embedded", device=device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flowkv_utils.bench", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("load", "notebooks", "policies", "decode", "gpu", "scoring", "all"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, default=None, help="folder for CSV + meta.json (default runs/bench/<cmd>)")
        if name == "notebooks":
            p.add_argument("--set", dest="param_set", default="default")
            p.add_argument("names", nargs="*")
        if name == "policies":
            p.add_argument("--n", type=int, default=4096, help="prompt tokens")
            p.add_argument("--budget", type=float, default=0.05, help="fraction of the prompt (or tokens if ≥ 1)")
        if name == "decode":
            p.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096])
            p.add_argument("--budget", type=float, default=0.1)
            p.add_argument("--steps", type=int, default=8)
        if name == "scoring":
            p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
            p.add_argument("--contexts", type=int, nargs="+", default=[131072])
            p.add_argument("--budget", type=float, default=0.05)
            p.add_argument("--slacks", type=float, nargs="*", default=[0.0, 0.25],
                           help="also prefill the whole model once per slack (FlowKV global re-packing)")
            p.add_argument("--device", default="cuda")
            p.add_argument("--tune", action="store_true", help="time launch-setting variants of the score kernel")
        if name == "gpu":
            p.add_argument("--slack", type=float, default=0.25, help="FlowKV global re-packing slack (layerwise)")
            p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
            p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 65536, 131072, 204800])
            p.add_argument("--steps", type=int, default=30)
            p.add_argument("--quick", action="store_true", help="no FullKV prefills, no batch search")
            p.add_argument("--no-checks", action="store_true")
            p.add_argument("--device", default="cuda", help="cuda (the sweep) or cpu (a dry run on a tiny shape)")
            p.add_argument("--max-batch", type=int, default=4096)
            p.add_argument("--tune", action="store_true", help="time several kernel block/warps/stages variants")
            p.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2])
    a = ap.parse_args(argv)
    cmds = ["load", "policies", "decode", "notebooks"] if a.cmd == "all" else [a.cmd]
    for cmd in cmds:
        out = a.out if (a.out and a.cmd != "all") else (a.out or REPO / "runs" / "bench") / cmd
        rec = Recorder(out, environment())
        print(f"== bench {cmd} → {out}", flush=True)
        if cmd == "load":
            load_times(rec)
        elif cmd == "notebooks":
            notebook_times(rec, getattr(a, "param_set", "default"), getattr(a, "names", None) or None)
        elif cmd == "policies":
            model, tok = _embedded()
            b = getattr(a, "budget", 0.05)
            policies_overhead(model, tok, getattr(a, "n", 4096), int(b) if b >= 1 else b, rec=rec)
        elif cmd == "decode":
            model, tok = _embedded()
            bw = copy_bandwidth("cpu")
            rec.add("bandwidth", **bw)
            b = getattr(a, "budget", 0.1)
            context_sweep(model, getattr(a, "contexts", [512, 1024, 2048, 4096]), budget=int(b) if b >= 1 else b,
                          tok=tok, rec=rec, bw=bw, steps=getattr(a, "steps", 8))
        elif cmd == "scoring":
            if torch.device(a.device).type == "cuda" and triton_available() and not score_checks(rec, a.device):
                raise SystemExit("the FlowKV score kernel disagrees with the PyTorch path (see check.csv)")
            scoring_parts(rec, a.shape, tuple(a.contexts), a.budget, device=a.device, tune=a.tune)
            if a.slacks:
                scoring_prefills(rec, a.shape, tuple(a.contexts), a.budget, tuple(a.slacks), device=a.device)
        elif cmd == "gpu":
            rec = gpu_sweep(out, shape=a.shape, contexts=tuple(a.contexts), steps=a.steps, budgets=tuple(a.budgets),
                            fullkv_prefill=not a.quick, batch_search=not a.quick, checks=not a.no_checks,
                            device=a.device, max_batch=a.max_batch, kernel_variants=TUNE if a.tune else None,
                            slack=a.slack)
        rec.save_meta()
        print(summary(rec))
    return 0


def summary(rec: Recorder) -> str:
    """A short printed table of what was measured (the last lines of a run)."""
    lines = []
    for table, rows in rec.rows.items():
        lines.append(f"-- {table}: {len(rows)} rows")
    d = rec.rows.get("decode", [])
    for r in d[-12:]:
        if r["status"] == "ok":
            lines.append(f"  {r['sweep']:<8} {r['policy']:<13} b={_fmt(r['budget']):<5} n={r['context']:<7} "
                         f"B={r['batch']:<4} {r['impl']:<22} {r['decode_ms']:8.2f} ms  {r['tokens_per_s']:9.1f} tok/s"
                         f"  floor×{r['floor_ratio']:.2f}")
    for r in rec.rows.get("check", []):
        if not r["ok"]:
            lines.append(f"  CHECK FAILED: {r['what']} {r['config']} rel {r['rel_err']:.2e}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
