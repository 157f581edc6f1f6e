"""What one GPU holds for a large shape (`bench scale`; Llama-3-70B by default, random weights, real shape): with
bf16 or FP8 weights, decode at long contexts for FullKV and a policy's budgets (batch 1 and the largest batch that
fits), FullKV's largest context (its out-of-memory frontier), and the compressing prefill.

The prefill of a 70B shape at 500K tokens takes longer than a device call, so it is timed on the first
`prefill_layers` layers with every layer's weights resident (the model's layer list cut for the run, its weights
kept), and extrapolated to the whole model: time × L / k (per layer the work is the same; embedding and LM head
are one row each), and peak + (L − k) × the kept bytes of one layer (by the last layer a full run also holds the
other layers' compressed caches; the working set of one layer does not grow). Each row says measured or
extrapolated. Decode caches are synthetic (`shapes.synthetic_cache`, random contents) with the budget spread
uniformly over the (layer, KV head) slots: the bytes a policy keeps are fixed by the budget; its per-head split
changes the split-KV kernel's balance, not what is read.

    python -m flowkv_utils.bench scale --out results/scale_h200            # on the GPU (defaults: 70B, fp8 + bf16)
    python -m flowkv_utils.bench scale --device cpu --shape tiny --contexts 512 1024 --prefill-contexts 1024 ...
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..budgets import resolve_budget
from ..cache import kept_bytes
from ..capture import prefill
from ..layerwise import LayerwiseCompressor
from ..models import shape_of
from ..quant import WEIGHT_FORMAT
from ..results import Recorder
from .gpu import decode_or_oom, largest_batch, largest_that_fits
from .shapes import SHAPES, WEIGHT_FORMATS, prompt_ids, shape_model
from .tables import RANDOM_WEIGHTS, model_cols
from .timing import (
    free_memory,
    full_kv_bytes,
    peak,
    reset_peak,
    start_run,
    sync,
    weight_bytes,
)

PARTS = ("decode", "batch", "frontier", "prefill")  # what a scale sweep runs (all by default)


def weights_label(fmt: str) -> str:
    """The `weights` column of a row: random weights, and in which format the layers' projections are."""
    return f"{RANDOM_WEIGHTS}; layers {WEIGHT_FORMAT if fmt == 'fp8' else fmt}"


def uniform_counts(budget, n: int, layers: int, kv_heads: int) -> torch.Tensor:
    """(L, G) per-head lengths of a budget spread evenly over the slots (FullKV: budget None, every token)."""
    if budget is None:
        return torch.full((layers, kv_heads), n, dtype=torch.long)
    return resolve_budget(budget, n, layers, kv_heads).per_slot().long()


@contextmanager
def first_layers(model, k: int):
    """The model cut to its first k decoder layers for the duration (config included); the other layers' modules,
    hence their weights on the device, are kept and put back afterwards."""
    inner, cfg = model.model, model.config
    if not 1 <= k <= len(inner.layers):
        raise ValueError(f"prefill_layers={k}: allowed is 1 ≤ k ≤ {len(inner.layers)} (the model's layers)")
    full, L = inner.layers, cfg.num_hidden_layers
    inner.layers, cfg.num_hidden_layers = torch.nn.ModuleList(list(full)[:k]), k
    try:
        yield model
    finally:
        inner.layers, cfg.num_hidden_layers = full, L


def scale_sweep(out: Path | str | None, *, shape: str = "llama3-70b", weights: tuple[str, ...] = ("fp8", "bf16"),
                contexts: tuple[int, ...] = (131072, 262144, 524288), budgets: tuple[float, ...] = (0.01, 0.05, 0.1),
                policy: str = "flowkv", batch_budget: float = 0.05, prefill_contexts: tuple[int, ...] = (131072,
                524288), prefill_layers: int = 2, chunk: int = 8192, steps: int = 10, warmup: int = 3,
                frontier_start: int = 8192, frontier_resolution: int = 4096, max_batch: int = 1024,
                parts: tuple[str, ...] = PARTS, device: str = "cuda", command: str | None = None,
                rec: Recorder | None = None) -> Recorder:
    """The scale sweep (module docstring), one model per weight format in turn: decode rows (sweep 'scale') for
    FullKV and `policy` at every budget and context, OOM rows where they do not fit; the largest batch of `policy`
    at `batch_budget` at the longest context; FullKV's frontier (sweep 'frontier', largest context of batch 1);
    prefill rows of `policy` and FullKV at `prefill_contexts` on `prefill_layers` layers, measured and
    extrapolated (table 'scale_prefill'). parts: which of `PARTS` to run."""
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"parts {bad}: allowed are {', '.join(PARTS)}")
    for fmt in weights:
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"weights {fmt!r}: allowed are {', '.join(WEIGHT_FORMATS)}")
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r}: known are {', '.join(SHAPES)}")
    for name, vals in (("contexts", contexts), ("prefill_contexts", prefill_contexts)):
        if any(int(c) < 1 for c in vals):
            raise ValueError(f"{name}={vals}: every context must be ≥ 1 token")
    t_start = time.perf_counter()
    dev, rec, log, bw, total_mem = start_run("scale", out, command, device, rec)
    meta = dict(bandwidth=bw, shape=SHAPES[shape], weights=list(weights), gpu_total_bytes=total_mem,
                prefill_layers=prefill_layers)
    rec.save_meta(**meta)
    longest = max([*contexts, *prefill_contexts])
    cap = steps + warmup + 8
    for fmt in weights:
        free_memory()
        model = shape_model(shape, dev, longest, weights=fmt, dtype=torch.bfloat16 if dev.type == "cuda"
                            else torch.float32)
        label = weights_label(fmt)
        meta[f"weight_bytes_{fmt}"] = weight_bytes(model)
        rec.save_meta(**meta)
        log(f"{shape} with {fmt} layers: {weight_bytes(model) / 1e9:.1f} GB of weights read per step")
        kw = dict(weights=label, bw=bw, cap=cap, steps=steps, warmup=warmup)
        if "decode" in parts:
            for n in contexts:
                for b in (None, *budgets):
                    _decode_or_oom(rec, model, "fullkv" if b is None else policy, b, n, **kw)
            log(f"{fmt}: decode rows done")
        if "batch" in parts:
            s = shape_of(model)
            n = max(contexts)
            largest_batch(rec, model, uniform_counts(batch_budget, n, s.layers, s.kv_heads), policy, batch_budget,
                          n, bw, cap, steps, warmup, max_batch, weights=label)
            log(f"{fmt}: largest batch done")
        if "frontier" in parts:
            fullkv_frontier(rec, model, start=frontier_start, limit=longest * 4, resolution=frontier_resolution, **kw)
            log(f"{fmt}: FullKV frontier done")
        if "prefill" in parts:
            for n in prefill_contexts:
                for p, b in ((policy, batch_budget), ("fullkv", None)):
                    layer_prefill(rec, model, n, p, b, prefill_layers, chunk, label, total_mem)
            log(f"{fmt}: prefills done")
        del model
    free_memory()
    rec.save_meta(**meta, seconds=time.perf_counter() - t_start)
    return rec


def _decode_or_oom(rec: Recorder, model, policy: str, budget, n: int, *, sweep: str = "scale", **kw) -> bool:
    """`gpu.decode_or_oom` of batch 1 over a synthetic cache of `uniform_counts`; True if it fitted."""
    s = shape_of(model)
    return decode_or_oom(rec, model, uniform_counts(budget, n, s.layers, s.kv_heads), policy, budget, n, sweep=sweep,
                         note="synthetic cache, budget spread uniformly over the (layer, KV head) slots", **kw)


def fullkv_frontier(rec: Recorder, model, *, start: int, limit: int, resolution: int, **kw) -> int:
    """FullKV's largest context at batch 1 (decode over a full synthetic cache; doubling from `start`, then
    bisection to `resolution` tokens), every attempt a row of sweep 'frontier'; returns it (0: not even start)."""
    return largest_that_fits(lambda n: _decode_or_oom(rec, model, "fullkv", None, n, sweep="frontier", **kw),
                             start, limit, resolution)


def layer_prefill(rec: Recorder, model, n: int, policy: str, budget, layers_run: int, chunk: int, weights: str,
                  device_bytes: int | None, window: int | None = None, warmup: int = 4096) -> None:
    """Prefill n tokens through the first `layers_run` layers (every layer's weights resident), compressing each
    layer as it is produced (`layerwise.LayerwiseCompressor`; FullKV keeps everything); one 'scale_prefill' row with
    the measured time and peak and their extrapolation to all L layers (module docstring), or an 'oom' row.
    window: the observation window (default 32, or half the smallest per-head budget when that is less). warmup:
    tokens of an untimed prefill of the same policy first (kernel compilation and autotuning are not prefill time)."""
    s = shape_of(model)
    L = s.layers
    window = window or resolve_budget("full" if budget is None else budget, n, L, s.kv_heads).default_window()
    dev = next(model.parameters()).device
    esz = next(model.parameters()).element_size()
    W = weight_bytes(model)
    row = dict(**model_cols(model, weights), policy=policy, budget=budget, context=n, chunk=chunk,
               layers_run=layers_run, weight_bytes=W, full_kv_bytes=full_kv_bytes(s, n, esz))
    ids = prompt_ids(n, model.config.vocab_size)
    free_memory()
    reset_peak(dev)
    def compress(ids_run: torch.Tensor, w: int) -> tuple[float, int]:  # one compressing prefill: seconds, kept bytes
        comp = LayerwiseCompressor(model, ids_run, policy, 1.0 if budget is None else budget, window=w)
        sync(dev)
        t0 = time.perf_counter()
        prefill(model, ids_run, window=w, chunk=chunk, on_layer=comp, keep_kv=False, **comp.prefill_options)
        sync(dev)
        return time.perf_counter() - t0, kept_bytes(comp.layers)

    try:
        with first_layers(model, layers_run):
            if warmup:
                w_n = min(n, warmup)
                compress(ids[:, :w_n], min(window, w_n // 2))
                free_memory()
                reset_peak(dev)
            seconds, kept = compress(ids, window)
    except torch.OutOfMemoryError as e:
        rec.add("scale_prefill", **row, status="oom", note=str(e)[:200])
        free_memory()
        return
    pa, pr = peak(dev)
    per_layer = kept / layers_run
    est_peak = None if pa is None else pa + (L - layers_run) * per_layer
    rec.add("scale_prefill", **row, seconds=seconds, seconds_per_layer=seconds / layers_run,
            seconds_extrapolated=seconds / layers_run * L, kept_bytes=kept, kept_bytes_extrapolated=per_layer * L,
            peak_alloc_bytes=pa, peak_reserved_bytes=pr, peak_extrapolated_bytes=est_peak, device_bytes=device_bytes,
            fits_extrapolated=None if est_peak is None or device_bytes is None else bool(est_peak <= device_bytes),
            status="ok", note=f"measured on {layers_run} of {L} layers (all weights resident); *_extrapolated: "
                              f"× {L}/{layers_run} (time, kept) and + {L - layers_run} layers' kept bytes (peak)")
    free_memory()
