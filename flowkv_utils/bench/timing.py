"""Measuring: device synchronisation, copy bandwidth, bytes a decode step reads, peak memory, step timings, the
decode row with its floor (W + KV_kept) / BW, and one decode step's kernels under the profiler (`profile_step`)."""

from __future__ import annotations

import gc
import time

import torch

from .. import generate
from ..cache import RaggedCache
from ..fastdecode import FastDecoder, StaticRaggedCache
from ..kernels import DEFAULT_CONFIG, DEFAULT_GEMV_CONFIG, GemvConfig, SplitKVConfig
from ..models import ModelShape, shape_of
from ..results import Recorder
from .tables import model_cols


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


def matmul_rate(device: str | torch.device = "cpu", n: int | None = None, dtype: torch.dtype | None = None,
                reps: int = 10) -> dict:
    """Dense matrix-multiply rate of the device: the median time of an n × n by n × n product (2·n³ FLOPs) in `dtype`
    (default bf16 with n = 8192 on CUDA, float32 with n = 1024 on the CPU) — the peak a prefill's model-FLOPs
    utilisation is measured against."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device, reps=reps, warmup=2)
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "ms": ms, "TFLOPs": 2 * n ** 3 / (ms * 1e-3) / 1e12}


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


def full_kv_bytes(shape: ModelShape, n: int, dtype_bytes: int) -> int:
    return shape.kv_bytes_per_token(dtype_bytes) * n


def read_ms(nbytes: float, bw: dict) -> float:
    """Milliseconds to read `nbytes` once at the measured copy bandwidth `bw` (`copy_bandwidth`'s dict): the
    floor of a step that must read them."""
    return 1e3 * nbytes / (bw["GBps"] * 1e9)


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


def quantiles(ms: list[float]) -> tuple[float, float, float]:
    """(median, 10th, 90th percentile) of a list of timings (nearest rank)."""
    s = sorted(ms)
    q = lambda f: s[min(len(s) - 1, max(0, int(round(f * (len(s) - 1)))))]
    return q(0.5), q(0.1), q(0.9)


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
    return quantiles(ms)[0]


def graph_us(calls, reps: int, warmup: int = 3) -> float:
    """µs per call of a list of zero-argument CUDA callables, recorded as one CUDA graph and replayed `reps` times
    (no Python launch cost; callables over different buffers keep the L2 cache from serving the reads). `warmup`
    calls (cycling through the list) run first, outside the graph."""
    for i in range(warmup):
        calls[i % len(calls)]()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        graph.replay()
    b.record()
    b.synchronize()
    return 1e3 * a.elapsed_time(b) / (len(calls) * reps)


def time_fast_decode(model, cache: StaticRaggedCache, steps: int = 20, warmup: int = 3, graph: bool = True,
                     impl: str = "auto", fuse: bool | None = None, config: SplitKVConfig = DEFAULT_CONFIG,
                     sparse=None, gemv: bool | None = None,
                     gemv_config: GemvConfig = DEFAULT_GEMV_CONFIG) -> tuple[list[float], FastDecoder]:
    """Per-step times (ms) of FastDecoder after warm-up; on CUDA each replay is timed with CUDA events.
    sparse: None, or a function of the cache giving FastDecoder's `sparse` attention (`blocksparse.PageDecode`).
    gemv, gemv_config: FastDecoder's batch-1 fused projection kernels (None: its default) and their tiles."""
    cache.rewind()
    dec = FastDecoder(model, cache, impl=impl, fuse=fuse, config=config,
                      sparse=None if sparse is None else sparse(cache), gemv=gemv, gemv_config=gemv_config)
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


def fast_path(dec: FastDecoder) -> dict:
    """The decode-row columns saying what a FastDecoder ran (impl label, decoder, attention, fused, graph)."""
    graph = dec.graph is not None
    return dict(impl=f"{dec.label}{'+graph' if graph else ''}", decoder="fast", attention=dec.impl_used,
                fused=dec.fuse, graph=graph)


def eager_path(attention: str) -> dict:
    """The decode-row columns of `generate.decode` with attention 'reference' (RaggedCache.attend) or 'triton' /
    'torch' (fastdecode.SplitKVAttend)."""
    return dict(impl=f"{attention}-eager", decoder="eager", attention=attention, fused=False, graph=False)


def decode_row(rec: Recorder, model, cache: StaticRaggedCache, *, weights: str, bw: dict, policy: str,
               budget, context: int, sweep: str, layout: str = "ragged", steps: int = 20, warmup: int = 3,
               graph: bool = True, impl: str = "auto", config: SplitKVConfig = DEFAULT_CONFIG,
               ms: list[float] | None = None, path: dict | None = None, note: str | None = None,
               sparse=None) -> dict:
    """Time FastDecoder on `cache` (unless ms is given, timed by the caller along `path`: `fast_path` /
    `eager_path`) and record one decode row with its floor. sparse: as `time_fast_decode`'s; the floor then counts
    the bytes its attention reads (`read_bytes()`), not the cache's (which it holds whole)."""
    dev = cache.device
    read = None
    if ms is None:
        ms, dec = time_fast_decode(model, cache, steps, warmup, graph, impl, config=config, sparse=sparse)
        path = fast_path(dec)
        read = None if dec.sparse is None else dec.sparse.read_bytes()
        del dec
    med, p10, p90 = quantiles(ms)
    W = weight_bytes(model)
    kept = cache.kept_bytes()
    esz = cache.layers[0].k.element_size()
    full = full_kv_bytes(shape_of(model), context, esz) * cache.batch
    kv_read = kept if read is None else read  # bytes of KV a step reads
    floor = read_ms(W + kv_read, bw)
    pa, pr = peak(dev)
    return rec.add("decode", **model_cols(model, weights), sweep=sweep, policy=policy, budget=budget,
                   context=context, batch=cache.batch, layout=layout, **path, steps=len(ms), decode_ms=med,
                   decode_ms_p10=p10, decode_ms_p90=p90, tokens_per_s=1e3 * cache.batch / med, kept_bytes=kept,
                   allocated_bytes=cache.allocated_bytes(), full_kv_bytes=full, weight_bytes=W,
                   bandwidth_GBps=bw["GBps"], floor_ms=floor, floor_ratio=med / floor,
                   bound_speedup=(W + full) / (W + kv_read), peak_alloc_bytes=pa, peak_reserved_bytes=pr,
                   status="ok", note=note)


def start_run(what: str, out, command: str | None, device: str, rec: Recorder | None):
    """The start every GPU sweep shares: the device (a clear exit when CUDA is asked for and missing), its recorder,
    a log function stamping seconds since the start, the measured copy bandwidth and matmul rate (both recorded:
    tables 'bandwidth', 'compute'), and the device's total memory (None on the CPU). Returns (device, rec, log, bw, total_mem)."""
    from ..progress import note
    from .tables import recorder

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench {what} needs a CUDA device (torch.cuda.is_available() is False); --device cpu runs "
                         "the same sweep on the CPU (tiny shapes only)")
    rec = rec or recorder(out, command)
    t_start = time.perf_counter()
    log = lambda msg: note(f"{msg} ({time.perf_counter() - t_start:.0f} s)")
    bw = copy_bandwidth(dev)
    rec.add("bandwidth", **bw)
    rec.add("compute", **matmul_rate(dev))
    total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
    return dev, rec, log, bw, total


# kernel-name patterns of each part of a decode step (first match wins; names lower-cased); `kernel_group`
KERNEL_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention (split-KV)", ("split_kernel", "combine_kernel", "split_kv")),
    ("matmul", ("gemm", "gemv", "qkv_rope_kernel", "gate_up_silu_kernel", "residual_kernel", "nvjet", "cutlass", "xmma", "cublas", "aten::linear", "aten::mm", "aten::addmm",
                "aten::matmul", "aten::bmm")),
    ("compiled elementwise", ("triton_", "compiledfunction", "torch-compiled")),
    ("copies and fills", ("memcpy", "memset", "copy_", "fill_", "aten::copy", "aten::fill", "aten::index_put")),
)


def kernel_group(name: str) -> str:
    """The part of a decode step a kernel (or, on the CPU, a top-level operator) belongs to: one of
    `KERNEL_GROUPS`' names, or "other"."""
    low = name.lower()
    for group, patterns in KERNEL_GROUPS:
        if any(p in low for p in patterns):
            return group
    return "other"


def profile_step(model, cache: StaticRaggedCache, steps: int = 10, warmup: int = 3,
                 config: SplitKVConfig = DEFAULT_CONFIG) -> tuple[float, str, list[dict]]:
    """Where one FastDecoder step's time goes: the step timed as `time_fast_decode` does (CUDA graph on CUDA), then
    `steps` more steps under `torch.profiler`. On CUDA the kernels' device time, per kernel name (the graph's replays
    when the profiler sees inside them, mode "graph"; else the same step without a graph, mode "eager"); on the CPU
    the top-level operators' time (mode "cpu"). Returns (median step ms, mode, rows), one row per name: group
    (`kernel_group`), kernel, calls_per_step, us_per_step, share (of the median step)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if steps < 1:
        raise ValueError(f"steps={steps}: profile at least one step")
    ms, dec = time_fast_decode(model, cache, steps, warmup, graph=True, config=config)
    step_ms = quantiles(ms)[0]
    cuda = cache.device.type == "cuda"

    def trace(run) -> dict[str, list[float]]:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(steps):
                run()
            sync(cache.device)
        per: dict[str, list[float]] = {}
        for e in prof.events():
            if cuda and e.device_type != DeviceType.CUDA:
                continue
            if not cuda and e.cpu_parent is not None:  # top-level operators only: no time counted twice
                continue
            per.setdefault(e.name, []).append(e.time_range.elapsed_us())
        return per

    mode = "graph" if (cuda and dec.graph is not None) else ("eager" if cuda else "cpu")
    per = trace(dec.step_no_check if dec.graph is not None else dec.step)
    if cuda and not per:  # the profiler did not see inside the graph: the same step without one
        cache.rewind()
        del dec  # its graph and fused weights, before the second decoder makes its own
        free_memory()
        dec = FastDecoder(model, cache, config=config)
        dec.step(torch.zeros(cache.batch, dtype=torch.long, device=cache.device))
        mode, per = "eager", trace(dec.step)
    rows = [dict(group=kernel_group(name), kernel=name[:200], calls_per_step=len(t) / steps,
                 us_per_step=sum(t) / steps, share=sum(t) / steps / (1e3 * step_ms)) for name, t in per.items()]
    return step_ms, mode, sorted(rows, key=lambda r: -r["us_per_step"])
