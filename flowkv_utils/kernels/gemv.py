"""Batch-1 decode projections as Triton matrix–vector kernels with their neighbours' elementwise work fused in.

At batch 1 each of a Llama layer's four products (q/k/v, o, gate/up, down) reads its weight once, so the step is
bound by bytes. cuBLAS runs each product as its own kernel (plus split-K reductions for the 4096-row outputs), and
the RMSNorms, RoPE, cache writes, SiLU·up and residual adds run as further small kernels between them: ≈ 16 kernels
a layer, whose launch gaps and small reads cost ≈ 0.7 ms of a 5 ms step (benchmarks/NOTES.md, the decode profile).
Here a layer is four kernels, each one product with the work around it:

- `qkv_rope`:     x̂ = RMSNorm(x)·γ; [q; k; v] = W_qkv x̂; RoPE on q and k; q → a buffer, k and v → the cache tail
                  at slot `used`;
- `gate_up_silu`: x̂ = RMSNorm(h)·γ; a = SiLU(W_gate x̂) · (W_up x̂);
- `residual`:     h + W x (the o and down projections).

RoPE and SiLU·up pair row i with row i + half (half = d/2 within a head for RoPE, the MLP width for gate/up), so a
program owns `rows` such pairs and needs no other program's output. Rounding follows the unfused step where it
rounds (LlamaRMSNorm's float32 statistics and bf16 output, the product rounded to the model dtype, HF RoPE's three
rounded bf16 operations, SiLU then the product, the residual add); only the order of each product's float32
accumulation differs from cuBLAS's. The readable reference of all three is the fused PyTorch step in
`fastdecode` (`fused_pre_attention`, `fused_post_attention`), which the GPU tests compare against.

Launch settings are a `GemvConfig` value (one `GemvTile` per projection) passed in, never a module global. A leaf
module: it imports nothing else of the project.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._triton import built, replace_fields


@dataclass(frozen=True)
class GemvTile:
    """Launch settings of one projection's kernel. rows: output rows (row pairs for `qkv_rope`/`gate_up_silu`)
    per program; block_k: input elements per loop step; num_warps, num_stages as in Triton."""

    rows: int = 4
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 2

    def replace(self, **changes) -> GemvTile:
        """A copy with some settings changed; unknown names raise, naming the known ones."""
        return replace_fields(self, **changes)


@dataclass(frozen=True)
class GemvConfig:
    """One `GemvTile` per projection of the fused batch-1 step. The defaults are the fastest of `bench gemv --tune`
    on the H200 for Llama-3-8B's widths (benchmarks/NOTES.md)."""

    qkv: GemvTile = field(default_factory=lambda: GemvTile(rows=1, block_k=2048))
    o: GemvTile = field(default_factory=lambda: GemvTile(rows=4, block_k=2048))
    gate_up: GemvTile = field(default_factory=lambda: GemvTile(rows=1, block_k=2048))
    down: GemvTile = field(default_factory=lambda: GemvTile(rows=4, block_k=512, num_warps=8))

    def replace(self, **changes) -> GemvConfig:
        """A copy with some projections' tiles changed; unknown names raise, naming the known ones."""
        return replace_fields(self, **changes)


DEFAULT_GEMV_CONFIG = GemvConfig()
PROJECTIONS = ("qkv", "o", "gate_up", "down")


def _build() -> dict:
    from . import _gemv_triton as k

    return {"qkv_rope": k.qkv_rope_kernel, "gate_up_silu": k.gate_up_silu_kernel, "residual": k.residual_kernel}


def _fit(tile: GemvTile, n_rows: int, K: int, what: str) -> tuple[int, int]:
    """The (rows, block_k) a launch uses: the kernels use no masks, so each setting is halved until it divides the
    rows (row pairs) and the input width K (Llama-3's widths take the defaults as they are). Settings must be
    powers of two (Triton block shapes)."""
    for name, v in (("rows", tile.rows), ("block_k", tile.block_k)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{what}: GemvTile.{name}={v}; allowed: a power of two")
    rows, bk = tile.rows, tile.block_k
    while n_rows % rows:
        rows //= 2
    while K % bk:
        bk //= 2
    if bk < 16:
        raise ValueError(f"{what}: input width {K} is not a multiple of 16 (the kernels' smallest block)")
    return rows, bk


def _vector(x: torch.Tensor, what: str, n: int | None = None) -> torch.Tensor:
    """x as one contiguous vector (a view: the kernels may write through it); n: the elements it must hold."""
    if not x.is_contiguous() or (n is not None and x.numel() != n):
        raise ValueError(f"{what}: shape {tuple(x.shape)} must be contiguous" + (f" with {n} elements" if n else "")
                         + " (the batch-1 kernels take one sequence's vector)")
    return x.view(-1)


def qkv_rope(x: torch.Tensor, ln_w: torch.Tensor, eps: float, w_qkv: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor, used: torch.Tensor, H: int, G: int,
             d: int, q_out: torch.Tensor, tile: GemvTile | None = None) -> torch.Tensor:
    """Norm, one q/k/v product, RoPE and the tail write for one sequence, in one kernel. x (D elements, e.g.
    (1, 1, D)) the layer's input, w_qkv ((H + 2G)·d, D), cos/sin (d elements) for this position, tail_k/v
    (G, capacity, d) contiguous, used a 1-element int64 device tensor (the slot to write). Writes q into q_out
    (H·d elements, e.g. (G, H/G, d); returned) and k, v into the tails."""
    tile = tile or DEFAULT_GEMV_CONFIG.qkv
    K = x.numel()
    if w_qkv.shape != ((H + 2 * G) * d, K) or not w_qkv.is_contiguous():
        raise ValueError(f"qkv_rope: w_qkv {tuple(w_qkv.shape)} must be a contiguous (({H} + 2·{G})·{d}, {K})")
    if tail_k.shape[0] != G or not (tail_k.is_contiguous() and tail_v.is_contiguous()):
        raise ValueError(f"qkv_rope: tails must be contiguous ({G}, capacity, {d}); got {tuple(tail_k.shape)}")
    rows, bk = _fit(tile, d // 2, K, "qkv_rope")  # a program's pairs lie in one head: rows divides d/2
    kern = built("gemv", _build)["qkv_rope"]
    kern[((H + 2 * G) * d // 2 // rows,)](
        _vector(x, "qkv_rope x"), ln_w, w_qkv, _vector(cos, "cos", d), _vector(sin, "sin", d),
        _vector(q_out, "q_out", H * d), tail_k, tail_v, used, eps, tail_k.stride(0), K=K, H=H, G=G, D=d, BP=rows,
        BK=bk, num_warps=tile.num_warps, num_stages=tile.num_stages)
    return q_out


def gate_up_silu(h: torch.Tensor, ln_w: torch.Tensor, eps: float, w_gate_up: torch.Tensor, out: torch.Tensor,
                 tile: GemvTile | None = None) -> torch.Tensor:
    """Norm, one gate/up product and SiLU(gate)·up for one sequence, in one kernel. h (D elements), w_gate_up
    (2·inter, D) (gate rows first); writes out (inter elements) and returns it."""
    tile = tile or DEFAULT_GEMV_CONFIG.gate_up
    K = h.numel()
    inter = w_gate_up.shape[0] // 2
    if w_gate_up.shape != (2 * inter, K) or not w_gate_up.is_contiguous():
        raise ValueError(f"gate_up_silu: w_gate_up {tuple(w_gate_up.shape)} must be a contiguous (2·inter, {K})")
    rows, bk = _fit(tile, inter, K, "gate_up_silu")
    kern = built("gemv", _build)["gate_up_silu"]
    kern[(inter // rows,)](_vector(h, "gate_up_silu h"), ln_w, w_gate_up, _vector(out, "gate_up_silu out", inter),
                           eps, K=K, INTER=inter, BP=rows, BK=bk, num_warps=tile.num_warps,
                           num_stages=tile.num_stages)
    return out


def residual(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, out: torch.Tensor,
             tile: GemvTile | None = None) -> torch.Tensor:
    """out = h + W x for one sequence, in one kernel (the o and down projections with their residual add).
    x (K elements), w (N, K) contiguous, h and out (N elements); returns out. out may be h (each program reads and
    writes only its own rows: an in-place residual update), never x. tile: None takes the down projection's."""
    tile = tile or DEFAULT_GEMV_CONFIG.down
    N, K = w.shape
    if not w.is_contiguous():
        raise ValueError(f"residual: w {tuple(w.shape)} must be contiguous")
    rows, bk = _fit(tile, N, K, "residual")
    kern = built("gemv", _build)["residual"]
    kern[(N // rows,)](_vector(x, "residual x", K), w, _vector(h, "residual h", N), _vector(out, "residual out", N),
                       K=K, BN=rows, BK=bk, num_warps=tile.num_warps, num_stages=tile.num_stages)
    return out
