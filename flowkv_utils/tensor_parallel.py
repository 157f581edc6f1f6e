"""Tensor parallelism over KV heads: N processes (one per device) share one decoder; rank r holds KV heads
[r·G/N, (r+1)·G/N) of every layer with their query heads (GQA groups stay whole), and the KV cache of those heads.

Layout of rank r (H query heads, G KV heads, head dim d, MLP width I; `TensorParallel` gives the ranges):

    q_proj       output rows [r·H/N·d, (r+1)·H/N·d)   column-sharded: the rank's query heads
    k/v_proj     output rows [r·G/N·d, (r+1)·G/N·d)   column-sharded: the rank's KV heads (r·G/N ... in GQA order)
    o_proj       input cols  [r·H/N·d, (r+1)·H/N·d)   row-sharded: partial output, all_reduce(sum), + bias once
    gate/up_proj output rows [r·I/N, (r+1)·I/N)       column-sharded
    down_proj    input cols  [r·I/N, (r+1)·I/N)       row-sharded: all_reduce(sum)
    embeddings, norms, rotary, lm_head                replicated

So two all_reduces per layer (attention output, MLP output), and the residual stream, hence the logits, are the
same on every rank. The MLP is sharded too: replicated, a 70B model's MLP alone would not fit one device.

A shard is an ordinary Hugging Face model whose config says H/N heads, G/N KV heads and I/N MLP width, with o_proj and
down_proj replaced by `RowParallelLinear`; so the project's own decoder path runs on it unchanged:
`capture.prefill` captures the rank's heads (a `Prefill` of G/N KV heads whose `attn_out` and `resid` are the whole
layer's, after the all_reduce), `sharded_policies.ShardedPolicy` selects their keep-set (together exactly the
unsharded keep-set; how the ranks agree is said there), and `fastdecode.FastDecoder` (fuse=False, no CUDA graph)
decodes over the rank's own ragged cache. Nothing of the cache ever leaves its rank. For long prompts
`layerwise.LayerwiseCompressor(model, ids, policy, budget, tp=tp)` as `capture.prefill`'s `on_layer` hook compresses
each layer's heads as soon as the layer is produced (the same keep-set; model-wide policies through
`sharded_policies.ShardedCascade`), so a rank holds ≈ weights + its kept budget + one layer (the command's
`--layerwise`; streaming policies only).

- `TensorParallel`: rank r of N over a model of H heads and G KV heads (N must divide G), and the collectives.
- `shard_model(model, tp)`: the rank's shard of a given model (same weights: tests compare it with the model).
- `random_shard(shape, tp, ...)`: a rank's shard of a random-weight model of `bench.shapes.SHAPES`, built directly at
  the local size (benchmarks of shapes too large for one device).
- `quant.quantize_model_(shard)`: FP8 weights for a shard (its `RowParallelLinear`s quantise themselves in place,
  `quantize_`, keeping `weight`'s name and layout); shard a dense model, then quantise.
- `python -m flowkv_utils.tensor_parallel ...` (under `torchrun --nproc-per-node N`): prefill with a policy
  (selection after it, or layer by layer inside it: `--layerwise`), timed decode, one row per rank and a total
  (`main`).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .models import shape_of
from .quant import FP8, Fp8Linear, WeightShape, check_impl, fp8_linear, quantize_rows, weight_format


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def check_divides(kv_heads: int, world_size: int) -> None:
    """ValueError unless N = world_size divides G = kv_heads (every rank holds G/N whole KV heads)."""
    if kv_heads % world_size:
        raise ValueError(f"tensor parallelism over KV heads: N={world_size} processes do not divide the G={kv_heads} "
                         f"KV heads of the model (every rank holds G/N whole KV heads with their query heads); "
                         f"use N in {divisors(kv_heads)}")


@dataclass(frozen=True)
class TensorParallel:
    """Rank `rank` of `world_size` tensor-parallel processes over a model of `heads` query heads and `kv_heads` KV
    heads (the unsharded model's). `group`: the torch.distributed process group (None: the default one; unused, and
    nothing needs initialising, when world_size is 1)."""

    heads: int
    kv_heads: int
    rank: int = 0
    world_size: int = 1
    group: object = None

    def __post_init__(self) -> None:
        for name in ("heads", "kv_heads", "rank", "world_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}={v!r}: must be an int")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank}, world_size={self.world_size}: need world_size ≥ 1 and 0 ≤ rank < "
                             "world_size")
        if self.kv_heads < 1 or self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads}, kv_heads={self.kv_heads}: the KV heads must divide the heads")
        check_divides(self.kv_heads, self.world_size)

    @classmethod
    def for_model(cls, model, rank: int = 0, world_size: int = 1, group=None) -> TensorParallel:
        s = shape_of(model)
        return cls(s.heads, s.kv_heads, rank, world_size, group)

    @property
    def local_kv_heads(self) -> int:
        return self.kv_heads // self.world_size

    @property
    def local_heads(self) -> int:
        return self.heads // self.world_size

    @property
    def kv_start(self) -> int:
        """The first KV head of this rank (its heads are kv_start .. kv_start + G/N − 1)."""
        return self.rank * self.local_kv_heads

    @property
    def head_start(self) -> int:
        return self.rank * self.local_heads

    def own(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's KV heads of a tensor whose last axis is the G KV heads: (…, G) → (…, G/N)."""
        return x[..., self.kv_start: self.kv_start + self.local_kv_heads]

    # collectives (identities in a single process) ---------------------------------------------------------------
    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place; returns x."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x stacked in rank order, (N, *x.shape), the same on every rank (x must have one shape on all)."""
        if self.world_size == 1:
            return x.unsqueeze(0)
        import torch.distributed as dist

        send = x.to(torch.uint8) if x.dtype == torch.bool else x.contiguous()  # gloo has no bool
        out = [torch.empty_like(send) for _ in range(self.world_size)]
        dist.all_gather(out, send, group=self.group)
        return torch.stack(out).to(x.dtype)

    def gather_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head rows of every rank in head order: (h, …) of the rank's h heads → (N·h, …). For score-sized rows
        only (no head_dim axis): the cache is never gathered."""
        return self.all_gather(x).flatten(0, 1)


class RowParallelLinear(WeightShape, torch.nn.Module):
    """The row-sharded half of a linear layer: y = all_reduce(x W_rᵀ) + b, x holding the rank's input features.
    `weight` (out, in/N) keeps nn.Linear's name and layout (so `capture.head_wo` reads W_O^h of the rank's heads);
    not an nn.Linear subclass, so `fastdecode.fusable` never fuses it away. `quantize_()` turns `weight` into FP8
    codes with a per-row `weight_scale` (`quant`), the same name and layout; the product is then `quant.fp8_linear`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tp: TensorParallel):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.register_parameter("weight_scale", None)  # (out,) float32 once quantised
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.tp = tp
        self.dtype_out = weight.dtype  # the activations' dtype (quant.dense_weight dequantises to it)
        self.impl = "auto"

    @classmethod
    def of(cls, linear: torch.nn.Linear, start: int, end: int, tp: TensorParallel) -> RowParallelLinear:
        """The rank's input columns [start, end) of an nn.Linear (the bias, added once after the sum, stays whole)."""
        bias = None if linear.bias is None else linear.bias.data.clone()
        return cls(linear.weight.data[:, start:end].clone(), bias, tp)

    @classmethod
    def whole(cls, module, tp: TensorParallel) -> RowParallelLinear:
        """A module that already holds only this rank's input columns (a shard built at its local size), as a
        RowParallelLinear: an nn.Linear, or a `quant.Fp8Linear` (its FP8 codes and row scales taken over as they
        are)."""
        if isinstance(module, Fp8Linear):
            bias = None if module.bias is None else module.bias.data
            out = cls(module.weight.data, bias, tp)
            out.weight_scale = torch.nn.Parameter(module.weight_scale.data, requires_grad=False)
            out.dtype_out, out.impl = module.dtype_out, module.impl
            return out
        return cls.of(module, 0, module.in_features, tp)

    def quantize_(self, impl: str = "auto") -> RowParallelLinear:
        """The shard's weight to FP8 e4m3 with per-output-row scales over its own columns (`quant.quantize_rows`),
        in place; the bias stays dense. impl: `quant.fp8_linear`'s. Returns self."""
        check_impl(impl)
        if self.weight_scale is None:
            q, scale = quantize_rows(self.weight.detach())
            self.dtype_out = self.weight.dtype
            self.weight = torch.nn.Parameter(q, requires_grad=False)
            self.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
        self.impl = impl
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale is None:
            y = F.linear(x, self.weight)
        else:
            y = fp8_linear(x, self.weight, self.weight_scale, impl=self.impl)
        y = self.tp.all_reduce_(y)
        return y if self.bias is None else y + self.bias


def _keep_rows(linear: torch.nn.Linear, start: int, end: int) -> None:
    """Column sharding: keep output rows [start, end) of an nn.Linear (and of its bias), in place."""
    linear.weight = torch.nn.Parameter(linear.weight.data[start:end].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.data[start:end].clone(), requires_grad=False)
    linear.out_features = end - start


def _local_config(model, tp: TensorParallel, intermediate: int) -> None:
    """The shard's config: H/N heads, G/N KV heads, I/N MLP width, head_dim explicit (no longer hidden / heads)."""
    c = model.config
    c.head_dim = shape_of(model).head_dim
    c.num_attention_heads, c.num_key_value_heads = tp.local_heads, tp.local_kv_heads
    c.intermediate_size = intermediate // tp.world_size
    model._flowkv_tp = tp


def check_mlp_width(intermediate: int, tp: TensorParallel) -> None:
    if intermediate % tp.world_size:
        raise ValueError(f"tensor parallelism: N={tp.world_size} processes do not divide the MLP width "
                         f"I={intermediate}; use N in {divisors(intermediate)}")


def shard_model(model, tp: TensorParallel):
    """Rank tp.rank's shard of `model` (see the module docstring): a copy holding the rank's heads and MLP columns,
    with o_proj and down_proj as `RowParallelLinear`. The model itself is unchanged. A dense model only: quantise
    the shard (`quant.quantize_model_`), not the model before sharding."""
    s = shape_of(model)
    if (s.heads, s.kv_heads) != (tp.heads, tp.kv_heads):
        raise ValueError(f"model of {s.heads} heads / {s.kv_heads} KV heads, but tp is for {tp.heads} / "
                         f"{tp.kv_heads}: build it with TensorParallel.for_model(model, rank, world_size)")
    if any(p.dtype == FP8 for p in model.parameters()):
        raise ValueError("shard_model: the model has FP8 weights; shard the dense model, then quant.quantize_model_ "
                         "the shard (its row-parallel scales are then over the rank's own columns)")
    intermediate = model.config.intermediate_size
    check_mlp_width(intermediate, tp)
    local = copy.deepcopy(model)
    local.__dict__.pop("_flowkv_sha", None)  # its fingerprint is another model's
    d, h0, g0 = s.head_dim, tp.head_start, tp.kv_start
    hn, gn, i_n = tp.local_heads, tp.local_kv_heads, intermediate // tp.world_size
    for layer in local.model.layers:
        a, m = layer.self_attn, layer.mlp
        _keep_rows(a.q_proj, h0 * d, (h0 + hn) * d)
        _keep_rows(a.k_proj, g0 * d, (g0 + gn) * d)
        _keep_rows(a.v_proj, g0 * d, (g0 + gn) * d)
        a.o_proj = RowParallelLinear.of(a.o_proj, h0 * d, (h0 + hn) * d, tp)
        i0 = tp.rank * i_n
        _keep_rows(m.gate_proj, i0, i0 + i_n)
        _keep_rows(m.up_proj, i0, i0 + i_n)
        m.down_proj = RowParallelLinear.of(m.down_proj, i0, i0 + i_n, tp)
    _local_config(local, tp, intermediate)
    return local.eval().requires_grad_(False)


def random_shard(shape: str, tp: TensorParallel, dtype=torch.float32, device="cpu", longest: int = 4096,
                 seed: int = 0, layers: int | None = None, weights: str = "bf16"):
    """Rank tp.rank's shard of a random-weight model of `bench.shapes.SHAPES[shape]` (optionally with fewer layers),
    built at the local size (the full model is never held). Every rank draws from the same seed, so the replicated
    parts (embeddings, norms, lm_head) agree, as they must; speed and memory do not depend on the weight values.
    weights: "bf16" (every weight in `dtype`) or "fp8" (the layers' projections in FP8, `bench.shapes.random_fp8_model`:
    a Llama-3-70B shard on one GPU)."""
    from .bench.shapes import SHAPES, random_builder
    from .bench.tables import RANDOM_WEIGHTS

    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r}: known are {', '.join(SHAPES)}")
    cfg = SHAPES[shape]
    if (cfg["heads"], cfg["kv_heads"]) != (tp.heads, tp.kv_heads):
        raise ValueError(f"shape {shape} has {cfg['heads']} heads / {cfg['kv_heads']} KV heads, tp is for "
                         f"{tp.heads} / {tp.kv_heads}")
    check_mlp_width(cfg["intermediate"], tp)
    build = random_builder(weights)
    model = build(cfg["family"], layers or cfg["layers"], tp.local_heads, tp.local_kv_heads, cfg["head_dim"],
                  cfg["hidden"], vocab=cfg["vocab"], intermediate=cfg["intermediate"] // tp.world_size, seed=seed,
                  dtype=dtype, device=str(device), max_positions=longest + 4096)
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        a.o_proj = RowParallelLinear.whole(a.o_proj, tp)
        m.down_proj = RowParallelLinear.whole(m.down_proj, tp)
    _local_config(model, tp, cfg["intermediate"])
    model.config._name_or_path = f"{shape}{f' {layers} layers' if layers else ''} ({RANDOM_WEIGHTS})"
    return model


# ---------------------------------------------------------------------------------------------- the command line
def parser() -> argparse.ArgumentParser:
    from .bench.shapes import SHAPES
    from .budgets import BUDGET_HELP, parse_budget
    from .policies import REGISTRY

    ap = argparse.ArgumentParser(prog="python -m flowkv_utils.tensor_parallel",
                                 description="Tensor-parallel prefill + policy + timed decode of a random-weight shape; "
                                             "start N ranks with `torchrun --nproc-per-node N -m "
                                             "flowkv_utils.tensor_parallel ...` (a plain run is one rank).")
    ap.add_argument("--shape", default="tiny", choices=list(SHAPES), help="model shape (bench.shapes.SHAPES)")
    ap.add_argument("--layers", type=int, default=None, help="use only this many layers of the shape")
    ap.add_argument("--context", type=int, default=256, help="prompt tokens")
    ap.add_argument("--budget", type=parse_budget, default=0.05, help=BUDGET_HELP)
    ap.add_argument("--policy", default="flowkv", choices=list(REGISTRY))
    ap.add_argument("--window", type=int, default=None,
                    help="observation window (default 32, or half the smallest per-head budget when that is less)")
    ap.add_argument("--layerwise", action="store_true",
                    help="compress each layer as the prefill produces it (layerwise.LayerwiseCompressor(tp=...)): "
                         "the rank never holds its whole dense cache; streaming policies only")
    ap.add_argument("--chunk", type=int, default=None,
                    help="prefill queries / MLP rows in chunks of this many tokens (long prompts; default all at once)")
    ap.add_argument("--graph", action=argparse.BooleanOptionalAction, default=None,
                    help="capture the decode step as one CUDA graph, all_reduces included (default: on CUDA)")
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed decode steps first")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="'cuda' (each rank its cuda:LOCAL_RANK, nccl) or 'cpu' (gloo)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--weights", default="bf16", choices=["bf16", "fp8"],
                    help="fp8: the layers' projections in FP8 e4m3 with per-row scales (quant.Fp8Linear; activations "
                         "in --dtype): what lets a Llama-3-70B shape fit one GPU")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def run(args: argparse.Namespace, tp: TensorParallel, device: torch.device) -> dict:
    """One rank: prefill its shard, select with the sharded policy (after the prefill, or layer by layer inside it:
    --layerwise), decode `steps` greedy tokens; its row."""
    import torch.distributed as dist

    from .bench.shapes import prompt_ids
    from .bench.timing import peak, reset_peak, sync
    from .budgets import resolve_budget
    from .capture import prefill
    from .fastdecode import FastDecoder, StaticRaggedCache
    from .layerwise import LayerwiseCompressor
    from .policies import get_policy, prefill_options
    from .sharded_policies import ShardedPolicy

    for name in ("context", "steps", "chunk"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)}: must be ≥ 1")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model = random_shard(args.shape, tp, dtype, device, args.context + args.warmup + args.steps, args.seed,
                         args.layers, args.weights)
    ids = prompt_ids(args.context, model.config.vocab_size, seed=args.seed)
    b = resolve_budget(args.budget, args.context, model.config.num_hidden_layers, tp.kv_heads)
    window = args.window or b.default_window()
    sharded = ShardedPolicy(get_policy(args.policy, window=window), tp)
    reset_peak(device)
    capacity = args.warmup + args.steps
    t0 = time.perf_counter()
    if args.layerwise:  # each layer's rank heads compressed as soon as it is produced: its dense K/V dropped
        comp = LayerwiseCompressor(model, ids, args.policy, args.budget, window=window, tp=tp)
        pf = prefill(model, ids, window=window, chunk=args.chunk, on_layer=comp, keep_kv=False,
                     **comp.prefill_options)
        cache = StaticRaggedCache.from_ragged([comp.cache(0)], capacity)
        del comp
    else:
        pf = prefill(model, ids, window=window, chunk=args.chunk, **prefill_options([sharded.policy]))
        result = sharded(pf, args.budget)
        values = None if result.values is None else [result.values]
        cache = StaticRaggedCache.from_keeps(pf, result.keep.unsqueeze(0), values, capacity)
        del result, values
    first = pf.logits.argmax().view(1)
    del pf  # only the rank's compressed cache stays
    sync(device)
    prefill_s = time.perf_counter() - t0
    dec = FastDecoder(model, cache, impl="auto", fuse=False, compile=False)  # o_proj/MLP all_reduce: not fusable
    graph = device.type == "cuda" if args.graph is None else args.graph
    if graph:
        if device.type != "cuda":
            raise ValueError(f"--graph on {device.type}: CUDA graphs need --device cuda")
        dec.capture()
    tok = first
    for _ in range(args.warmup):
        tok = dec.step(tok).argmax(-1)
    cache.rewind()
    sync(device)
    if tp.world_size > 1:
        dist.barrier()
    t0 = time.perf_counter()
    tok = first
    for _ in range(args.steps):
        tok = dec.step(tok).argmax(-1)
    sync(device)
    ms = (time.perf_counter() - t0) / args.steps * 1e3
    return dict(rank=tp.rank, heads=f"{tp.kv_start}-{tp.kv_start + tp.local_kv_heads - 1}",
                entries=sum(int(lay.offsets[-1]) for lay in cache.layers), kept_bytes=cache.kept_bytes(), ms=ms,
                prefill_s=prefill_s, peak=peak(device)[0],
                window=window, exchanges=sharded.plan.exchanges, model=model.config._name_or_path, graph=graph,
                weights=weight_format(model))


def table(rows: list[dict], args: argparse.Namespace, backend: str) -> str:
    """The printed result: a settings line, one row per rank, the total (kept: sums; ms/token, prefill: the slowest
    rank's, as every step waits for all; peak: the sum over devices)."""
    mib = 2.0 ** 20
    r0 = rows[0]
    peak = lambda p: "-" if p is None else f"{p / mib:.1f}"
    ranks = f"{len(rows)} rank{'s' if len(rows) > 1 else ''}"
    lines = [f"tensor-parallel decode: {r0['model']}, layers {r0['weights']}, {ranks} ({backend}), context {args.context}, "
             f"budget {args.budget}, policy {args.policy} (window {r0['window']}; ranks exchange: {r0['exchanges']}"
             f"{', layer by layer' if args.layerwise else ''}), "
             f"{'layer-wise' if args.layerwise else 'one-shot'} compression{f', chunk {args.chunk}' if args.chunk else ''}"
             f", {args.steps} steps{' (CUDA graph)' if r0['graph'] else ''}",
             f"{'':8}{'kv heads':>10}{'kept entries':>14}{'kept MiB':>10}{'ms/token':>10}{'prefill s':>11}"
             f"{'peak MiB':>10}"]
    for r in rows:
        lines.append(f"{'rank ' + str(r['rank']):<8}{r['heads']:>10}{r['entries']:>14}{r['kept_bytes'] / mib:>10.3f}"
                     f"{r['ms']:>10.2f}{r['prefill_s']:>11.2f}{peak(r['peak']):>10}")
    peaks = [r["peak"] for r in rows]
    lines.append(f"{'total':<8}{ranks:>10}{sum(r['entries'] for r in rows):>14}"
                 f"{sum(r['kept_bytes'] for r in rows) / mib:>10.3f}{max(r['ms'] for r in rows):>10.2f}"
                 f"{max(r['prefill_s'] for r in rows):>11.2f}{peak(None if None in peaks else sum(peaks)):>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .bench.shapes import SHAPES
    from .distributed import Shard, device_for, process_group

    args = parser().parse_args(argv)
    try:
        shard = Shard.from_env()
        device = device_for(args.device, shard)
        cfg = SHAPES[args.shape]
        tp = TensorParallel(cfg["heads"], cfg["kv_heads"], shard.rank, shard.world_size)
    except ValueError as e:
        print(f"tensor_parallel: error: {e}", file=sys.stderr)
        return 2
    with process_group(shard, device, timeout_s=1800):
        try:
            row = run(args, tp, device)
        except ValueError as e:
            print(f"tensor_parallel ({shard.label}): error: {e}", file=sys.stderr)
            return 2
        rows = [row]
        if shard.world_size > 1:
            import torch.distributed as dist

            rows = [None] * shard.world_size
            dist.all_gather_object(rows, row)
        if shard.main:
            print(table(rows, args, ("nccl on cuda" if device.type == "cuda" else "gloo on cpu")
                        if shard.world_size > 1 else f"one process on {device.type}"), flush=True)
        if shard.world_size > 1:  # no rank tears the group down while another still uses it (gloo aborts then)
            dist.barrier()
    return 0


if __name__ == "__main__":
    code = main()
    # gloo's worker threads can abort the interpreter's own teardown after a clean run ("terminate called without an
    # active exception", about 1 run in 10 with 2 CPU processes); everything is printed and the group destroyed by
    # now, so the process ends here without running C++ static destructors
    sys.stdout.flush()
    sys.stderr.flush()
    import os

    os._exit(code)
