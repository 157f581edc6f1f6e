"""The batch-1 projection kernels (`kernels.gemv`) against cuBLAS, one projection of a model shape at a time
(`bench gemv`, and inside `bench gpu`): each fused kernel's launch-setting variants and a plain cuBLAS product
(`torch.nn.functional.linear`, nothing fused) over the same bytes, 8 layers' weights in one CUDA graph so that
neither the L2 cache nor Python launch costs count. One 'gemv' row per (projection, variant); the fastest
variant of each projection is marked best, and `gemv_speed` returns those tiles as a `GemvConfig`."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from ..kernels.gemv import DEFAULT_GEMV_CONFIG, PROJECTIONS, GemvConfig, gate_up_silu, qkv_rope, residual
from ..results import Recorder
from .shapes import SHAPES
from .timing import graph_us

# variants timed per projection: changes to that projection's default GemvTile (benchmarks/NOTES.md); a
# variant equal to one already timed is skipped
GEMV_TUNE = [{}, {"rows": 1}, {"rows": 2}, {"rows": 4}, {"rows": 8}, {"block_k": 512}, {"block_k": 1024},
             {"block_k": 2048}, {"num_warps": 2}, {"num_warps": 4}, {"num_warps": 8}, {"num_stages": 1},
             {"num_stages": 3}, {"rows": 1, "block_k": 2048}, {"rows": 8, "block_k": 256},
             {"rows": 16, "block_k": 256}]


def _projection(name: str, s: dict, w, dev, dt) -> Callable:
    """The fused-kernel call(tile) of projection `name` over weight w (random inputs), for the shape dict s."""
    D, H, G, d, inter = s["hidden"], s["heads"], s["kv_heads"], s["head_dim"], s["intermediate"]
    ln = torch.ones(D, dtype=dt, device=dev)
    if name == "qkv":
        x = torch.randn(D, dtype=dt, device=dev)
        cos, sin = torch.rand(d, dtype=dt, device=dev), torch.rand(d, dtype=dt, device=dev)
        tk, tv = (torch.zeros(G, 8, d, dtype=dt, device=dev) for _ in range(2))
        used, q = torch.zeros(1, dtype=torch.long, device=dev), torch.empty(G, H // G, d, dtype=dt, device=dev)
        return lambda t: qkv_rope(x, ln, 1e-5, w, cos, sin, tk, tv, used, H, G, d, q, t)
    if name == "gate_up":
        x, out = torch.randn(D, dtype=dt, device=dev), torch.empty(inter, dtype=dt, device=dev)
        return lambda t: gate_up_silu(x, ln, 1e-5, w, out, t)
    x = torch.randn(w.shape[1], dtype=dt, device=dev)
    h = torch.randn(w.shape[0], dtype=dt, device=dev)
    return lambda t: residual(x, w, h, h, t)


def _row(name: str, shape: str, N: int, K: int, bw: dict, impl: str, us: float, tile=None, **extra) -> dict:
    nbytes = N * K * 2
    return dict(shape=shape, projection=name, rows_out=N, width=K, weight_bytes=nbytes, impl=impl,
                rows=tile and tile.rows, block_k=tile and tile.block_k, num_warps=tile and tile.num_warps,
                num_stages=tile and tile.num_stages, us=us, GBps=nbytes / us / 1e3,
                frac_of_copy=nbytes / us / 1e3 / bw["GBps"], **extra)


def gemv_speed(rec: Recorder, bw: dict, shape: str = "llama3-8b", device="cuda", variants: list[dict] | None = None,
               reps: int = 30, base: GemvConfig = DEFAULT_GEMV_CONFIG, seed: int = 0) -> GemvConfig:
    """Time every projection of `shape` (bf16, random weights) as cuBLAS and as the fused kernel with each variant
    (changes to base's tile for it; None: the default tile only). Records 'gemv' rows and returns the fastest tile
    of each projection."""
    s = SHAPES[shape]
    D, H, G, d, inter = s["hidden"], s["heads"], s["kv_heads"], s["head_dim"], s["intermediate"]
    dims = {"qkv": ((H + 2 * G) * d, D), "o": (D, H * d), "gate_up": (2 * inter, D), "down": (D, inter)}
    dt, dev = torch.bfloat16, torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    best = {}
    for name in PROJECTIONS:
        N, K = dims[name]
        ws = [torch.randn(N, K, dtype=dt, device=dev, generator=gen) * K ** -0.5 for _ in range(8)]
        x = torch.randn(K, dtype=dt, device=dev)
        us = graph_us([partial(torch.nn.functional.linear, x, w) for w in ws], reps)
        rec.add("gemv", **_row(name, shape, N, K, bw, "cublas linear (product only)", us, best=False))
        fused = [_projection(name, s, w, dev, dt) for w in ws]
        timed = []
        tiles = []
        for var in variants or [{}]:
            tile = getattr(base, name).replace(**var)
            if tile not in tiles:
                tiles.append(tile)
        for tile in tiles:
            try:
                timed.append((graph_us([partial(f, tile) for f in fused], reps), tile, None))
            except Exception as e:  # a variant that does not compile or launch is recorded, not fatal
                timed.append((float("nan"), tile, f"{type(e).__name__}: {str(e)[:160]}"))
        ok = [t for t in timed if t[2] is None]
        top = min(ok, key=lambda t: t[0])[1] if ok else getattr(base, name)
        for us, tile, err in timed:
            rec.add("gemv", **_row(name, shape, N, K, bw, "triton fused", us, tile, best=tile == top and err is None,
                                   note=err))
        best[name] = top
        del ws, fused
        torch.cuda.empty_cache()
    return GemvConfig(**best)
