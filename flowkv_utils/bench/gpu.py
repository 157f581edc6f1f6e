"""The GPU sweep (`bench gpu`): kernel timing and tuning, checks, prefill with layer-wise compression per context,
decode vs context / budget / batch / layout / implementation, the largest batch that fits, FullKV prefill peaks.

Tuning returns launch settings as values (`kernel_speed` → `SplitKVConfig`, `scoring.tune_score_kernel` →
`ScoreConfig`) that the sweep then passes to every call; meta.json records both. The batch-1 projection kernels
run with `kernels.DEFAULT_GEMV_CONFIG` (tuned by `bench gemv --tune`); the sweep records their 'gemv' rows against
cuBLAS and, at the longest context, the step without them (sweep 'impl')."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

from ..fastdecode import SplitKVAttend, StaticRaggedCache
from ..kernels import (
    DEFAULT_CONFIG,
    DEFAULT_GEMV_CONFIG,
    DEFAULT_SCORE_CONFIG,
    ScoreConfig,
    SplitKVConfig,
    choose_split,
    make_workspace,
    split_kv_triton,
    target_programs,
    triton_available,
    triton_tables,
    use_triton,
    work_items,
)
from ..layerwise import DEFAULT_SLACK
from ..models import shape_of
from ..progress import bar
from ..results import Recorder
from .checks import chunked_prefill_check, decode_parity, kernel_checks, score_checks
from .gemv import gemv_speed
from .prefill import kept_lengths, prefill_context
from .scoring import scoring_parts
from .shapes import SHAPES, shape_model, synthetic_cache
from .tables import RANDOM_WEIGHTS, model_cols
from .timing import (
    decode_row,
    eager_path,
    fast_path,
    free_memory,
    graph_us,
    profile_step,
    read_ms,
    reset_peak,
    start_run,
    time_fast_decode,
    time_generate_decode,
    weight_bytes,
)

# kernel variants timed with `bench gpu --tune`: changes to the default SplitKVConfig (benchmarks/NOTES.md says
# what each was expected to do); a "split" entry fixes the keys per work item instead
TUNE = [{}, {"block": 64}, {"block": 16}, {"num_warps": 2}, {"num_warps": 8}, {"num_stages": 2}, {"num_stages": 4},
        {"waves": 8}, {"waves": 16}, {"waves": 2}, {"block": 64, "num_stages": 4}, {"block": 64, "num_warps": 8},
        {"block": 128, "num_warps": 8, "num_stages": 2}, {"fused_combine": True}, {"fused_combine": True, "waves": 8},
        {"fused_combine": True, "waves": 2}, {"pdl": False}, {"pdl": False, "combine_items": 64, "combine_cols": 128},
        {"combine_items": 128, "combine_cols": 128}, {"combine_items": 128, "combine_cols": 64}, {"combine_cols": 16},
        {"combine_items": 128}]


def kernel_speed(rec: Recorder, bw: dict, device="cuda", n: int = 204800, budget: float = 0.05, G: int = 8,
                 r: int = 4, d: int = 128, variants: list[dict] | None = None, reps: int = 50, seed: int = 0,
                 base: SplitKVConfig = DEFAULT_CONFIG) -> SplitKVConfig:
    """Time the Triton split-KV attention of one layer (Llama-3-8B geometry by default) on full and compressed
    lengths (uniform, and ragged log-normal per-head lengths of the same total), over 8 layers' buffers (so that
    the L2 cache does not serve the reads) captured in one CUDA graph (so that Python launch costs do not count).
    variants: changes to `base` (block, num_warps, num_stages, waves) or a fixed "split". One 'kernel' row per
    (lengths, variant), written once all are timed, best=True on the variant of the least summed time; returns
    that variant's config."""
    g = torch.Generator().manual_seed(seed)
    kept = int(budget * n)
    ragged = torch.exp(torch.randn(G, generator=g))  # log-normal per-head shares
    ragged = (ragged / ragged.sum() * kept * G).round().long().clamp(min=0)
    configs = {("full", f"full n={n}"): torch.full((G,), n),
               ("uniform", f"uniform {budget:.0%}"): torch.full((G,), kept),
               ("ragged", f"ragged {budget:.0%} (log-normal heads)"): ragged}
    variants = variants or [{}]
    cfgs = [base.replace(**{k: v for k, v in var.items() if k != "split"}) for var in variants]
    totals = [0.0] * len(variants)
    rows = []
    for (lengths, name), lens in configs.items():
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
        for vi, (var, cfg) in enumerate(zip(variants, cfgs, strict=True)):
            split = var.get("split") or choose_split(N, target_programs(device, cfg), cfg.block)
            items = work_items(off, split, device)
            tabs = [triton_tables(items, *lay) for lay in layers]
            ws = make_workspace(items, G, r, d, torch.bfloat16, device)
            us = graph_us([partial(split_kv_triton, q, tab, nt, d ** -0.5, ws, cfg) for tab in tabs], reps)
            totals[vi] += us
            impl = (f"triton waves={cfg.waves}" + (" fused-combine" if cfg.fused_combine else "")
                    + ("" if cfg.pdl else " no-pdl") + f" combine={cfg.combine_items}x{cfg.combine_cols}")
            rows.append((vi, dict(config=f"{name} G={G} r={r} d={d}", lengths=lengths, impl=impl, split=split,
                                  block=cfg.block, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                  waves=cfg.waves, kv_bytes=kv_bytes, us=us, GBps=kv_bytes / us / 1e3,
                                  frac_of_copy=kv_bytes / us / 1e3 / bw["GBps"])))
        del layers, tabs, ws
        free_memory()
    best = min(range(len(variants)), key=totals.__getitem__)
    for vi, row in rows:
        rec.add("kernel", **row, best=vi == best)
    return cfgs[best]


def largest_that_fits(fits: Callable[[int], bool], start: int, limit: int, resolution: int = 1) -> int:
    """The largest x ≤ limit, a multiple of `resolution` from `start` on, with fits(x) True, for a monotone fits:
    doubling from start until one fails (or limit is passed), then bisection down to `resolution`. 0 when start
    itself does not fit. Each fits(x) runs (and records) one attempt."""
    if start < 1 or resolution < 1 or limit < start:
        raise ValueError(f"start={start}, limit={limit}, resolution={resolution}: need 1 ≤ start ≤ limit and "
                         "resolution ≥ 1")
    lo, hi, x = 0, None, start
    while hi is None and x <= limit:
        if fits(x):
            lo, x = x, x * 2
        else:
            hi = x
    if hi is None:  # everything up to the limit fitted
        if lo < limit and fits(limit):
            return limit
        hi = limit if lo < limit else None
    while hi is not None and lo >= 1 and hi - lo > resolution:
        mid = lo + max(resolution, (hi - lo) // 2 // resolution * resolution)
        if mid >= hi:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def decode_or_oom(rec: Recorder, model, counts: torch.Tensor, policy: str, budget, n: int, *, bw: dict, cap: int,
                  steps: int, warmup: int, sweep: str, batch: int = 1, weights: str = RANDOM_WEIGHTS,
                  config: SplitKVConfig = DEFAULT_CONFIG, sparse=None, layout: str = "ragged",
                  note: str | None = None) -> bool:
    """One decode row over a synthetic cache of per-head lengths `counts` (L, G) for `batch` sequences
    (`timing.decode_row`; sparse, layout, note as there), or an 'oom' row when it does not fit; True if it fitted.
    The device's memory is freed before and after."""
    s = shape_of(model)
    dev = next(model.parameters()).device
    free_memory()
    reset_peak(dev)
    try:
        sc = synthetic_cache(counts, batch, s, n, cap, model.get_input_embeddings().weight.dtype, dev, config=config)
        decode_row(rec, model, sc, weights=weights, bw=bw, policy=policy, budget=budget, context=n, sweep=sweep,
                   steps=steps, warmup=warmup, config=config, sparse=sparse, layout=layout, note=note)
        del sc
        return True
    except torch.OutOfMemoryError as e:
        rec.add("decode", **model_cols(model, weights), sweep=sweep, policy=policy, budget=budget, context=n,
                batch=batch, layout=layout, status="oom", note=str(e)[:200])
        return False
    finally:
        free_memory()


def largest_batch(rec: Recorder, model, counts: torch.Tensor, policy: str, budget, n: int, bw: dict, cap: int,
                  steps: int, warmup: int, max_batch: int = 4096, config: SplitKVConfig = DEFAULT_CONFIG,
                  weights: str = RANDOM_WEIGHTS, sparse=None, layout: str = "ragged", note: str | None = None) -> int:
    """Decode at growing batch sizes until memory runs out (doubling, then bisection); the largest that fits is
    recorded with sweep='maxbatch', the others with sweep='batch'. weights: the rows' weights label; sparse, layout,
    note: as `timing.decode_row`'s (block-sparse rows)."""
    kw = dict(bw=bw, cap=cap, steps=steps, warmup=warmup, sweep="batch", weights=weights, config=config,
              sparse=sparse, layout=layout, note=note)
    bb = None if policy == "fullkv" else budget
    attempt = lambda B: decode_or_oom(rec, model, counts, policy, bb, n, batch=B, **kw)
    lo = largest_that_fits(attempt, 1, max_batch)
    if lo >= 1:  # mark the largest with a copy of its row
        rows = [r for r in rec.rows["decode"] if r["sweep"] == "batch" and r["policy"] == policy
                and r["batch"] == lo and r["context"] == n and r["layout"] == layout and r["status"] == "ok"]
        if rows:
            r = dict(rows[-1])
            r["sweep"], r["note"] = "maxbatch", "largest batch that fits (doubling, then bisection)"
            rec.add("decode", **{k: r[k] for k in rec.schemas["decode"]})
    return lo


def gpu_sweep(out: Path | str, *, shape: str = "llama3-8b", contexts: tuple[int, ...] = (8192, 32768, 65536,
              131072, 204800), budgets: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2),
              policies: tuple[str, ...] = ("fullkv", "snapkv", "flowkv", "flowkv_global"), budget: float = 0.05,
              steps: int = 30, warmup: int = 5, fullkv_prefill: bool = True, batch_search: bool = True,
              checks: bool = True, chunk: int = 8192, command: str | None = None,
              device: str = "cuda", max_batch: int = 4096, kernel_variants: list[dict] | None = None,
              slack: float = DEFAULT_SLACK, pages: tuple[int, ...] = (16,), rec: Recorder | None = None) -> Recorder:
    """The GPU sweep (see the package docstring): kernel timing (fastest of `kernel_variants`) and score-kernel
    tuning, checks, prefill with layer-wise compression per context (scoring overhead per policy, peak memory),
    FullKV prefill peaks, decode vs context / budget / batch / layout / implementation, and the largest batch that
    fits at the longest context. Writes CSVs + meta.json to out (through `rec` when given, else its own
    recorder). pages: page sizes of the block-sparse (Quest-style) rows at `budget` over the whole resident cache
    (policy 'quest', layout 'pages<P>'), at every context and in the batch search."""
    from ..blocksparse import n_pages

    for P in pages:  # a bad page size fails here, before any measurement
        n_pages(1, P)
    t_start = time.perf_counter()
    dev, rec, log, bw, total_mem = start_run("gpu", out, command, device, rec)
    model = shape_model(shape, dev, max(contexts))
    W = weight_bytes(model)
    meta = dict(bandwidth=bw, shape=SHAPES[shape], weight_bytes=W, weights=RANDOM_WEIGHTS,
                gpu_total_bytes=total_mem)
    rec.save_meta(**meta)
    log(f"model {shape}: {W / 1e9:.2f} GB of weights read per step; bandwidth {bw['GBps']:.0f} GB/s")
    config, score_config = DEFAULT_CONFIG, DEFAULT_SCORE_CONFIG
    if dev.type == "cuda" and triton_available():
        config = kernel_speed(rec, bw, n=max(contexts), budget=budget, variants=kernel_variants)
        meta["kernel_config"] = asdict(config)
        rec.save_meta(**meta)
        log(f"kernel timing done, using {config}")
        gemv_speed(rec, bw, shape, str(dev))  # the batch-1 fused projections (default tiles) against cuBLAS
        meta["gemv_config"] = asdict(DEFAULT_GEMV_CONFIG)
        if checks and not score_checks(rec, str(dev)):
            raise SystemExit("the FlowKV score kernel disagrees with the PyTorch path (see check.csv)")
        score_config = scoring_parts(rec, shape, (min(131072, max(contexts)),), budget, device=str(dev), tune=True,
                                     extras=False)
        meta["score_config"] = asdict(score_config)
        rec.save_meta(**meta)
        log(f"score kernel tuned, using {score_config}")
    if checks:
        _checks(rec, model, shape, contexts, config, score_config)
        log("checks done")
    cap = steps + warmup + 8
    kw = dict(bw=bw, cap=cap, steps=steps, warmup=warmup, config=config)
    counts = _prefills(rec, model, contexts, budgets, policies, budget, chunk, slack, score_config, log, **kw)
    _decode_sweeps(rec, model, counts, budget, max(contexts), **kw)
    _blocksparse_rows(rec, model, counts, budget, pages, **kw)
    log("decode sweeps done")
    longest = max(contexts)
    if batch_search:
        for p in ("fullkv", "flowkv_global"):
            if (longest, p, budget) in counts:
                largest_batch(rec, model, counts[(longest, p, budget)], p, budget, longest, bw, cap, steps, warmup,
                              max_batch, config)
        if (longest, "fullkv", budget) in counts:
            for P in pages:
                largest_batch(rec, model, counts[(longest, "fullkv", budget)], "quest", budget, longest, bw, cap, steps,
                              warmup, max_batch, config, **_quest(budget, P, config))
        log("batch search done")
    if fullkv_prefill:
        for n in contexts:
            _prefill_or_oom(rec, model, n, policy="fullkv", chunk=chunk, keep_scores=False)
            free_memory()
        log("FullKV prefills done")
    meta.update(kernel_config=asdict(config), score_config=asdict(score_config))
    rec.save_meta(**meta, seconds=time.perf_counter() - t_start)
    return rec


def _prefill_or_oom(rec: Recorder, model, n: int, *, policy: str, budget=None, chunk: int, **kw):
    """`prefill_context` after one untimed prefill of the same length (steady state), or a prefill row with status
    'oom' (and None) when the device runs out of memory."""
    try:
        return prefill_context(rec, model, n, weights=RANDOM_WEIGHTS, policy=policy, chunk=chunk, warmup=1,
                               **({} if budget is None else {"budget": budget}), **kw)
    except torch.OutOfMemoryError as e:
        rec.add("prefill", **model_cols(model, RANDOM_WEIGHTS), policy=policy, budget=budget, context=n,
                chunk=chunk, status="oom", note=str(e)[:200])
        free_memory()
        return None


def _checks(rec: Recorder, model, shape: str, contexts, config: SplitKVConfig, score_config: ScoreConfig) -> None:
    """Kernel and whole-model checks; a failed judged check stops the sweep before any timing."""
    dev = next(model.parameters()).device
    ok = kernel_checks(rec, device=str(dev), config=config)
    # whole-model parity is judged on a 2-layer model of the same shape; the deep model's errors are recorded
    # next to its bf16 noise floor (chunked vs unchunked prefill: two exact computations, different rounding)
    small = shape_model(shape, dev, max(contexts), layers=2)
    n_chk = min(4096, min(contexts))
    ok &= decode_parity(rec, small, n_chk, config=config, score_config=score_config)
    ok &= chunked_prefill_check(rec, small, 2 * n_chk, chunk=max(64, n_chk // 2))
    del small
    free_memory()
    if shape_of(model).layers > 2:
        decode_parity(rec, model, n_chk, tol=None, config=config, score_config=score_config)
        chunked_prefill_check(rec, model, 2 * n_chk, chunk=max(64, n_chk // 2), tol=None)
    if not ok:
        raise SystemExit("a fast path disagrees with the reference (see check.csv): no timings recorded")


def _prefills(rec: Recorder, model, contexts, budgets, policies, budget: float, chunk: int, slack: float,
              score_config: ScoreConfig, log, *, bw: dict, cap: int, steps: int, warmup: int,
              config: SplitKVConfig) -> dict[tuple, torch.Tensor]:
    """Per context: prefill compressing with FlowKV (global), decode of the cache it really kept (and at the
    longest context the eager paths); returns the per-head lengths {(n, policy, budget): (L, G)} to decode."""
    counts: dict[tuple, torch.Tensor] = {}
    longest = max(contexts)
    wl = RANDOM_WEIGHTS
    for n in bar(contexts, desc="prefill + decode per context", unit="context"):
        comp = _prefill_or_oom(rec, model, n, policy="flowkv_global", budget=budget, chunk=chunk,
                               also=tuple(q for q in policies if q not in ("fullkv", "flowkv_global")), slack=slack,
                               score_config=score_config)
        if comp is None:
            continue
        for p in policies:
            for b in (budgets if n == longest else (budget,)):
                if p == "fullkv" and b != budget:
                    continue
                counts[(n, p, b)] = kept_lengths(comp, p, b)
        # decode of the real compressed cache (batch 1), and the eager paths on it
        cache = comp.cache(capacity=cap)
        sc = StaticRaggedCache.from_ragged([cache], capacity=cap, config=config)
        row = dict(weights=wl, bw=bw, policy="flowkv_global", budget=budget, context=n)
        decode_row(rec, model, sc, **row, sweep="real", steps=steps, warmup=warmup, config=config,
                   note="the cache prefill really kept (not synthetic)")
        if n == longest:
            ms = time_generate_decode(model, cache, steps=3)
            decode_row(rec, model, sc, **row, sweep="impl", ms=ms, path=eager_path("reference"),
                       note="generate.decode + RaggedCache.attend (per-head Python loop)")
            ms = time_generate_decode(model, cache, steps=3, attend=SplitKVAttend(config=config))
            decode_row(rec, model, sc, **row, sweep="impl", ms=ms,
                       path=eager_path("triton" if use_triton("auto", cache.layers[0].k) else "torch"),
                       note="generate.decode + fastdecode.SplitKVAttend (Python per layer)")
        del sc, cache, comp
        free_memory()
        log(f"context {n} done")
    return counts


def _quest(budget: float, page: int, config: SplitKVConfig) -> dict:
    """decode_row / largest_batch arguments of a block-sparse (Quest-style) row."""
    from ..blocksparse import PageDecode

    return dict(sparse=lambda c: PageDecode(c, budget, page, config=config), layout=f"pages{page}",
                note=f"block-sparse (Quest-style, page {page}): the whole cache resident, each step reads the "
                     f"top ⌈B/{page}⌉ pages per KV head, their bounds and the tail; floor: weights + those bytes")


def _blocksparse_rows(rec: Recorder, model, counts: dict[tuple, torch.Tensor], budget: float,
                      pages: tuple[int, ...], *, bw: dict, cap: int, steps: int, warmup: int,
                      config: SplitKVConfig) -> None:
    """Block-sparse decode at every context with a FullKV count (its whole cache resident), batch 1, per page size."""
    for (n, p, b), c in sorted(counts.items()):
        if p != "fullkv" or b != budget:
            continue
        for P in pages:
            decode_or_oom(rec, model, c, "quest", budget, n, bw=bw, cap=cap, steps=steps, warmup=warmup,
                          sweep="context", config=config, **_quest(budget, P, config))


def _decode_sweeps(rec: Recorder, model, counts: dict[tuple, torch.Tensor], budget: float, longest: int, *,
                   bw: dict, cap: int, steps: int, warmup: int, config: SplitKVConfig) -> None:
    """Decode vs context and budget (synthetic contents, real per-head lengths), FullKV included; at the longest
    context also without the CUDA graph, without fusion, and in the padded layout."""
    s = shape_of(model)
    dev = next(model.parameters()).device
    for (n, p, b), c in sorted(counts.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        sweep = "context" if b == budget else "budget"
        bb = None if p == "fullkv" else b
        row = dict(weights=RANDOM_WEIGHTS, bw=bw, policy=p, budget=bb, context=n)
        try:
            sc = synthetic_cache(c, 1, s, n, cap, torch.bfloat16, dev, config=config)
            decode_row(rec, model, sc, **row, sweep=sweep, steps=steps, warmup=warmup, config=config)
            if n == longest and b == budget and p in ("flowkv_global", "fullkv"):
                ms, dec = time_fast_decode(model, sc, steps=10, warmup=2, graph=False, config=config)
                decode_row(rec, model, sc, **row, sweep="impl", ms=ms,
                           path={**fast_path(dec), "impl": f"{dec.label} (no graph)"},
                           note="FastDecoder without CUDA graph")
                ms, dec = time_fast_decode(model, sc, steps=steps, warmup=warmup, fuse=False, config=config)
                decode_row(rec, model, sc, **row, sweep="impl", ms=ms, path=fast_path(dec),
                           note="model modules via run_layer (no fusion)")
                del dec
                ms, dec = time_fast_decode(model, sc, steps=steps, warmup=warmup, gemv=False, config=config)
                decode_row(rec, model, sc, **row, sweep="impl", ms=ms, path=fast_path(dec),
                           note="fused step without the batch-1 projection kernels (cuBLAS + compiled elementwise)")
                del dec
            if n == longest and b == budget and p in ("flowkv", "flowkv_global"):
                del sc
                free_memory()
                sc = synthetic_cache(c, 1, s, n, cap, torch.bfloat16, dev, layout="padded", config=config)
                decode_row(rec, model, sc, **row, sweep="layout", layout="padded", steps=steps, warmup=warmup,
                           config=config,
                           note="every head padded to its layer's longest head (dense per-layer layout)")
            del sc
        except torch.OutOfMemoryError as e:
            rec.add("decode", **model_cols(model, RANDOM_WEIGHTS), sweep=sweep, policy=p, budget=b, context=n,
                    batch=1, status="oom", note=str(e)[:200])
        free_memory()


def decode_profile(out: Path | str | None, *, shape: str = "llama3-8b", context: int = 204800,
                   budgets: tuple = (None, 0.05), steps: int = 10, warmup: int = 3, device: str = "cuda",
                   config: SplitKVConfig = DEFAULT_CONFIG, command: str | None = None,
                   rec: Recorder | None = None) -> tuple[Recorder, str]:
    """Where the batch-1 decode step's time goes at `context` tokens: a random-weight model of `shape`, per budget
    (None: FullKV; a fraction: every KV head keeps that share of the prompt — at equal bytes the policy does not
    change the step) one synthetic cache, `timing.profile_step` on it. Records one 'profile' row per kernel name,
    with the floor of its group (matmul: the weights W / BW; attention: the kept KV / BW), and returns the recorder
    and a text summary per group: µs per step, share of the step, multiple of the group's floor."""
    dev, rec, log, bw, _ = start_run("profile", out, command, device, rec)
    model = shape_model(shape, dev, context, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    s = shape_of(model)
    W = weight_bytes(model)
    dtype = model.get_input_embeddings().weight.dtype
    lines = [f"decode step under the profiler: {shape} ({RANDOM_WEIGHTS}), {context} tokens, batch 1, device "
             f"{device}; copy bandwidth {bw['GBps']:.0f} GB/s; weights {W / 1e9:.2f} GB"]
    for b in budgets:
        kept = context if b is None else max(1, round(b * context))
        sc = synthetic_cache(torch.full((s.layers, s.kv_heads), kept), 1, s, context, steps * 2 + warmup + 8, dtype,
                             dev, config=config)
        step_ms, mode, rows = profile_step(model, sc, steps, warmup, config)
        kv = sc.kept_bytes()
        floors = {"matmul": 1e3 * read_ms(W, bw), "attention (split-KV)": 1e3 * read_ms(kv, bw)}  # µs
        floor_ms = read_ms(W + kv, bw)
        policy = "fullkv" if b is None else "uniform"
        for r in rows:
            rec.add("profile", **model_cols(model, RANDOM_WEIGHTS), policy=policy, budget=b, context=context, batch=1,
                    mode=mode, step_ms=step_ms, floor_ms=floor_ms, group_floor_us=floors.get(r["group"]), **r)
        groups: dict[str, float] = {}
        for r in rows:
            groups[r["group"]] = groups.get(r["group"], 0.0) + r["us_per_step"]
        label = "FullKV" if b is None else f"every head {b:g} of the prompt"
        lines += ["", f"{label}: step {step_ms:.3f} ms = {step_ms / floor_ms:.2f} x its floor {floor_ms:.3f} ms "
                      f"(profiled: {mode}; the profiled names sum to {sum(groups.values()) / 1e3:.3f} ms)"]
        for g, us in sorted(groups.items(), key=lambda kv: -kv[1]):
            f = floors.get(g)
            lines.append(f"  {g:<24} {us:9.1f} us/step  {us / (1e3 * step_ms):6.1%}"
                         + (f"  {us / f:5.2f} x its floor ({f:.1f} us)" if f else ""))
        lines += [f"    {r['us_per_step']:8.1f} us  {r['calls_per_step']:6.1f} calls  {r['kernel'][:90]}" for r in rows[:12]]
        log(f"profiled {label}")
        del sc
        free_memory()
    text = "\n".join(lines)
    if rec.out is not None:
        Path(rec.out).mkdir(parents=True, exist_ok=True)
        (Path(rec.out) / "profile_decode.txt").write_text(text + "\n")
    return rec, text
