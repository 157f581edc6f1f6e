"""What users would run instead, timed in the same run as the project's decode (`bench peers`; issue 14): Hugging
Face transformers' own decode (eager over a `DynamicCache`, and `StaticCache` under `torch.compile`), PyTorch's
SDPA and FlexAttention decode kernels over one layer's cache, and FlashInfer's batch decode where it is installed
(else a row saying why not). Each row states what it computes (`what`, `note`), so the comparison is like for like:

- `hf_eager`: `model(token, past_key_values=DynamicCache)` per step, the whole model (random weights, real shape),
  the cache filled with n random tokens per layer; DynamicCache appends by concatenation (what transformers does).
- `hf_compiled`: the same over a `StaticCache` of n + steps slots, the forward `torch.compile(mode="reduce-overhead")`
  (CUDA graphs); compile time is reported separately, not in the step.
- `sdpa`: `F.scaled_dot_product_attention` of one layer's decode query (1 × H heads over G KV heads, GQA) over the
  full cache of n tokens, and over a pre-gathered dense 5 % of it (what an eviction policy's cache would be if
  every head kept the same count); bytes = the K and V read.
- `flex`: FlexAttention over the full cache with a block mask that keeps the same fraction of 128-token pages per
  KV head (block-sparse, as Quest reads), compiled.
- `flashinfer`: `flashinfer.BatchDecodeWithPagedKVCacheWrapper` over the full cache, if the package imports.

Floors and bandwidth are the same as the decode table's: bytes read once over the measured copy bandwidth.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models import shape_of
from ..progress import note
from ..results import Recorder
from .shapes import SHAPES, shape_model
from .tables import RANDOM_WEIGHTS, recorder
from .timing import (
    copy_bandwidth,
    free_memory,
    full_kv_bytes,
    median_ms,
    peak,
    quantiles,
    read_ms,
    reset_peak,
    sync,
    weight_bytes,
)

PEERS = ("hf_eager", "hf_compiled", "sdpa", "flex", "flashinfer")


def _row(rec: Recorder, what: str, n: int, ms: float | None, kv_read: int, bw: dict, *, weights: int = 0,
         batch: int = 1, status: str = "ok", note: str = "", extra_s: float | None = None) -> dict:
    """One peers row: the step's time against its floor (weights + KV read) / copy bandwidth."""
    floor = read_ms(weights + kv_read, bw)
    ok = ms is not None and status == "ok"
    gbps = (weights + kv_read) / (ms * 1e-3) / 1e9 if ok else None
    return rec.add("peers", what=what, context=n, batch=batch, ms=ms if ok else None,
                   tokens_per_s=1e3 * batch / ms if ok else None, kv_read_bytes=kv_read, weight_bytes=weights,
                   GBps=gbps, frac_of_copy=gbps / bw["GBps"] if ok else None,
                   floor_ms=floor, floor_ratio=ms / floor if ok else None, setup_s=extra_s,
                   peak_alloc_bytes=peak(bw.get("device", "cpu"))[0], status=status, note=note[:300])


def _random_kv(G: int, n: int, d: int, dtype, device, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(batch, G, n, d, generator=g, dtype=dtype, device=device) for _ in range(2))


def sdpa_rows(rec: Recorder, shape: dict, n: int, budget: float, bw: dict, device, dtype=torch.bfloat16,
              reps: int = 50) -> None:
    """SDPA decode of one layer over the full cache and over a pre-gathered dense `budget` of it."""
    H, G, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    k, v = _random_kv(G, n, d, dtype, device)
    q = torch.randn(1, H, 1, d, dtype=dtype, device=device)
    for label, m in (("full cache", n), (f"dense {budget:.0%} of the cache (pre-gathered)", max(1, round(budget * n)))):
        kk, vv = k[:, :, :m].contiguous(), v[:, :, :m].contiguous()
        ms = median_ms(lambda kk=kk, vv=vv: F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True), device,
                       reps=reps, warmup=5)
        _row(rec, "sdpa", n, ms, 2 * kk.numel() * kk.element_size(), bw,
             note=f"one layer, q 1 × {H} heads over {G} KV heads, {label}: {m} tokens per KV head")
        del kk, vv


def flex_rows(rec: Recorder, shape: dict, n: int, budget: float, bw: dict, device, dtype=torch.bfloat16,
              page: int = 128, reps: int = 50) -> None:
    """FlexAttention decode of one layer with a block mask keeping `budget` of the 128-token pages per KV head."""
    H, G, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    pages = math.ceil(n / page)
    kp = max(1, math.ceil(budget * n / page))
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        k, v = _random_kv(G, n, d, dtype, device)
        q = torch.randn(1, H, 1, d, dtype=dtype, device=device)
        g = torch.Generator(device=device).manual_seed(1)
        kept = torch.zeros(G, pages, dtype=torch.bool, device=device)
        kept.scatter_(1, torch.rand(G, pages, generator=g, device=device).topk(kp, dim=1).indices, True)
        kept[:, -1] = True
        r = H // G

        def mask_mod(b, h, q_idx, kv_idx):
            return kept[h // r, kv_idx // page]

        t0 = time.perf_counter()
        bm = create_block_mask(mask_mod, 1, H, 1, n, device=device, BLOCK_SIZE=page)
        attend = torch.compile(flex_attention)
        out = attend(q, k, v, block_mask=bm, enable_gqa=True)
        sync(device)
        setup = time.perf_counter() - t0
        ms = median_ms(lambda: attend(q, k, v, block_mask=bm, enable_gqa=True), device, reps=reps, warmup=5)
        kv = 2 * G * min(n, int(kept.sum()) * page // G) * d * k.element_size()
        _row(rec, "flex", n, ms, kv, bw, extra_s=setup,
             note=f"one layer, FlexAttention (compiled) with a block mask of {kp} of {pages} pages of {page} tokens "
                  f"per KV head (random pages, the last always), q 1 × {H} heads over {G} KV heads")
        del out
    except Exception as e:  # a compile or kernel limitation of this torch: recorded, not hidden
        _row(rec, "flex", n, None, 0, bw, status="failed", note=f"{type(e).__name__}: {e}")


def flashinfer_rows(rec: Recorder, shape: dict, n: int, bw: dict, device, dtype=torch.bfloat16, page: int = 16,
                    reps: int = 50) -> None:
    """FlashInfer's batch decode over the full cache (paged, `page` tokens a page), or a row saying why not."""
    try:
        import flashinfer
    except ImportError as e:
        _row(rec, "flashinfer", n, None, 0, bw, status="unavailable",
             note=f"flashinfer does not import on this machine ({e}); no release of it is carried: the wheel is "
                  "100+ MB with its own CUDA dependencies, the source release needs a JIT build")
        return
    H, G, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    try:
        pages = math.ceil(n / page)
        kv = torch.randn(pages, 2, page, G, d, dtype=dtype, device=device)
        ws = torch.empty(128 << 20, dtype=torch.uint8, device=device)
        wrap = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
        indptr = torch.tensor([0, pages], dtype=torch.int32, device=device)
        indices = torch.arange(pages, dtype=torch.int32, device=device)
        last = torch.tensor([n - (pages - 1) * page], dtype=torch.int32, device=device)
        wrap.plan(indptr, indices, last, H, G, d, page, data_type=dtype)
        q = torch.randn(1, H, d, dtype=dtype, device=device)
        ms = median_ms(lambda: wrap.run(q, kv), device, reps=reps, warmup=5)
        _row(rec, "flashinfer", n, ms, 2 * G * n * d * kv.element_size(), bw,
             note=f"one layer, flashinfer {flashinfer.__version__} batch decode, full cache in pages of {page}")
    except Exception as e:
        _row(rec, "flashinfer", n, None, 0, bw, status="failed", note=f"{type(e).__name__}: {e}")


def _hf_step_times(model, cache, n: int, steps: int, warmup: int, forward) -> list[float]:
    dev = next(model.parameters()).device
    tok = torch.randint(0, model.config.vocab_size, (1, 1), device=dev)
    ms = []
    for i in range(warmup + steps):
        pos = torch.tensor([n + i], device=dev)
        sync(dev)
        t0 = time.perf_counter()
        forward(input_ids=tok, past_key_values=cache, cache_position=pos, position_ids=pos.view(1, 1),
                use_cache=True)
        sync(dev)
        if i >= warmup:
            ms.append(1e3 * (time.perf_counter() - t0))
    return ms


def hf_rows(rec: Recorder, model, n: int, bw: dict, steps: int = 10, warmup: int = 3,
            which: tuple[str, ...] = ("hf_eager", "hf_compiled")) -> None:
    """transformers' own decode of the whole model: eager over a DynamicCache ('hf_eager'), and compiled over a
    StaticCache ('hf_compiled')."""
    from transformers import DynamicCache, StaticCache

    s = shape_of(model)
    dev = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype
    W = weight_bytes(model)
    kv_bytes = full_kv_bytes(s, n, torch.tensor([], dtype=dtype).element_size())
    kinds = [(w, m) for w, m in (("hf_eager", None), ("hf_compiled", "reduce-overhead")) if w in which]
    for what, mode in kinds:
        free_memory()
        reset_peak(dev)
        try:
            t0 = time.perf_counter()
            if mode is None:
                cache = DynamicCache(config=model.config)
                for li in range(s.layers):
                    cache.update(*_random_kv(s.kv_heads, n, s.head_dim, dtype, dev, seed=li), li)
                forward = model.forward
            else:
                cache = StaticCache(config=model.config, max_cache_len=n + warmup + steps + 1)
                pos = torch.arange(n, device=dev)
                for li in range(s.layers):
                    cache.update(*_random_kv(s.kv_heads, n, s.head_dim, dtype, dev, seed=li), li,
                                 {"cache_position": pos})
                forward = torch.compile(model.forward, mode=mode, fullgraph=True)
            with torch.no_grad():
                ms = _hf_step_times(model, cache, n, steps, warmup, forward)
            setup = time.perf_counter() - t0 - sum(ms) / 1e3
            med = quantiles(ms)[0]
            _row(rec, what, n, med, kv_bytes, bw, weights=W, extra_s=setup,
                 note=("eager forward over DynamicCache (appends by concatenation)" if mode is None else
                       f"StaticCache, forward torch.compile(mode={mode!r}, fullgraph=True); setup_s includes the "
                       "compile") + f"; {model.config._attn_implementation} attention; {RANDOM_WEIGHTS}")
        except torch.OutOfMemoryError as e:
            _row(rec, what, n, None, kv_bytes, bw, weights=W, status="oom", note=str(e))
        except Exception as e:  # e.g. a transformers version whose cache API differs: recorded, not hidden
            _row(rec, what, n, None, kv_bytes, bw, weights=W, status="failed", note=f"{type(e).__name__}: {e}")
        finally:
            cache = forward = None
            free_memory()


def peers_sweep(out: Path | str | None, *, shape: str = "llama3-8b", contexts: tuple[int, ...] = (131072, 204800),
                budget: float = 0.05, peers: tuple[str, ...] = PEERS, steps: int = 10, device: str = "cuda",
                command: str | None = None, rec: Recorder | None = None) -> Recorder:
    """Every peer of `peers` at every context (module docstring); rows into the 'peers' table."""
    bad = [p for p in peers if p not in PEERS]
    if bad:
        raise ValueError(f"peers {bad}: allowed are {', '.join(PEERS)}")
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r}: known are {', '.join(SHAPES)}")
    dev = torch.device(device)
    rec = rec or recorder(out, command)
    bw = {**copy_bandwidth(dev), "device": str(dev)}
    rec.add("bandwidth", **{k: bw[k] for k in ("bytes", "ms", "GBps")})
    rec.save_meta(bandwidth=bw, shape=SHAPES[shape], weights=RANDOM_WEIGHTS)
    cfg = SHAPES[shape]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = shape_model(shape, dev, max(contexts), dtype=dtype) if {"hf_eager", "hf_compiled"} & set(peers) else None
    for n in contexts:
        if "sdpa" in peers:
            sdpa_rows(rec, cfg, n, budget, bw, dev, dtype)
        if "flex" in peers:
            flex_rows(rec, cfg, n, budget, bw, dev, dtype)
        if "flashinfer" in peers:
            flashinfer_rows(rec, cfg, n, bw, dev, dtype)
        if model is not None:
            hf_rows(rec, model, n, bw, steps=steps, which=peers)
        free_memory()
        note(f"peers at {n} tokens done")
    return rec
