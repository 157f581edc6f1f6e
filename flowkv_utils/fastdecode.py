"""Fast decode over the ragged compressed cache: split-KV attention plugged into the decoder, a static batched
cache, and a decode step that is captured once as a CUDA graph.

- `SplitKVAttend`: `generate.decode(..., attend=SplitKVAttend())` — the split-KV kernel (`kernels.split_kv`) for
  one sequence's `cache.RaggedCache`, work items cut once per layer (the prefix never changes after prefill).
- `StaticRaggedCache`: B sequences in the one ragged layout of `cache.py` (segments = (sequence, KV head)), in fixed
  buffers, the tail length and RoPE positions held on the device.
- `FastDecoder`: one greedy step for the batch (embed → per layer: norm, q/k/v + RoPE, tail write, split-KV
  attention, o_proj, MLP → norm → lm_head), capturable as one CUDA graph; optionally with fused projections.
Launch settings of the kernels are a `kernels.SplitKVConfig` passed in, never a module global.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import apply_rope, scaling_of
from .cache import RaggedCache, RaggedLayer, allocated_bytes, kept_bytes, offsets_of
from .capture import forward_layers, rotary, stacked_values
from .kernels import (
    DEFAULT_CONFIG,
    SplitKVConfig,
    SplitKVWorkspace,
    TritonTables,
    WorkItems,
    auto_split,
    make_workspace,
    split_kv_torch,
    split_kv_triton,
    triton_tables,
    use_triton,
    work_items,
)
from .kernels.gemv import DEFAULT_GEMV_CONFIG, GemvConfig, gate_up_silu, qkv_rope, residual


# --------------------------------------------------------------------------------------------------------------
# split-KV attention for generate.decode over one RaggedCache
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _LayerPlan:
    items: WorkItems
    tail_key: tuple = ()
    tables: TritonTables | None = None
    ws: SplitKVWorkspace | None = None


@dataclass
class SplitKVAttend:
    """`generate.decode(model, cache, ids, attend=SplitKVAttend())`: split-KV attention for one new token (T = 1),
    q (H, 1, d) → (H, 1, d); T > 1 (teacher forcing) falls back to the reference `cache.attend`. Work items are cut
    once per layer of the cache it is first called with (use one instance per cache)."""

    impl: str = "auto"
    config: SplitKVConfig = DEFAULT_CONFIG
    _cache: object = field(default=None, repr=False)
    _plans: dict = field(default_factory=dict, repr=False)

    def __call__(self, cache: RaggedCache, layer: int, q: torch.Tensor, T: int, scaling: float) -> torch.Tensor:
        if T != 1:
            return cache.attend(layer, q, T, scaling)
        if self._cache is not cache:  # a new cache: its items are other ones
            self._cache, self._plans = cache, {}
        lay = cache.layers[layer]
        G = lay.offsets.numel() - 1
        H, _, d = q.shape
        if layer not in self._plans:
            split = auto_split(int(lay.offsets[-1]), q.device, self.config)
            self._plans[layer] = _LayerPlan(work_items(lay.offsets, split, q.device))
        plan = self._plans[layer]
        qg = q.reshape(G, H // G, d).contiguous()  # (G, r, d)
        if not use_triton(self.impl, q):
            out = split_kv_torch(qg, lay.k, lay.v, plan.items, lay.tail_k, lay.tail_v, cache.used + 1, scaling)
            return out.reshape(H, 1, d)
        key = (lay.tail_k.data_ptr(), lay.tail_v.data_ptr(), lay.tail_k.shape[1])
        if plan.tables is None or plan.tail_key != key:  # the tail grew (moved): re-address the items
            plan.tail_key, plan.tables = key, triton_tables(plan.items, lay.k, lay.v, lay.tail_k, lay.tail_v)
            plan.ws = make_workspace(plan.items, G, H // G, d, q.dtype, q.device)
        nt = torch.full((1,), cache.used + 1, dtype=torch.long, device=q.device)
        return split_kv_triton(qg, plan.tables, nt, scaling, plan.ws, self.config).reshape(H, 1, d).clone()


@dataclass
class StaticLayer(RaggedLayer):
    """A `cache.RaggedLayer` over B·G segments (sequence-major, then head) plus its split-KV work items."""

    items: WorkItems | None = None
    tables: TritonTables | None = None  # built by FastDecoder when it uses the Triton kernels
    ws: SplitKVWorkspace | None = None


class StaticRaggedCache:
    """B sequences' ragged caches in fixed buffers: per layer packed K/V over B·G segments + a dense tail, the
    number of tail tokens `used` (1-element int64 on the device) and each sequence's next RoPE position `pos`."""

    def __init__(self, layers: list[StaticLayer], batch: int, kv_heads: int, next_pos: torch.Tensor):
        self.layers = layers
        self.batch = batch
        self.kv_heads = kv_heads
        dev = layers[0].k.device
        self.used = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = next_pos.to(dev).view(batch, 1).long()  # (B, 1)
        self.start_pos = self.pos.clone()

    @property
    def capacity(self) -> int:
        return self.layers[0].tail_k.shape[1]

    @property
    def device(self) -> torch.device:
        return self.layers[0].k.device

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor, head_dim: int, capacity: int, next_pos: int,
                     dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                     split: int | None = None, seed: int = 0,
                     config: SplitKVConfig = DEFAULT_CONFIG) -> StaticRaggedCache:
        """A cache of random contents with given kept lengths (L, B, G) — for speed and memory measurements,
        where only the lengths matter. Contents are N(0, 1) (never zeros)."""
        L, B, G = lengths.shape
        gen = torch.Generator(device=device).manual_seed(seed)
        layers = []
        for li in range(L):
            off = offsets_of(lengths[li])
            N = int(off[-1])
            k = torch.randn(N, head_dim, generator=gen, device=device, dtype=dtype)
            v = torch.randn(N, head_dim, generator=gen, device=device, dtype=dtype)
            layers.append(_static_layer(k, v, off, capacity, split, config))
        return cls(layers, B, G, torch.full((B,), next_pos, dtype=torch.long))

    @classmethod
    def from_ragged(cls, caches: list[RaggedCache], capacity: int, split: int | None = None,
                    share: bool = True, config: SplitKVConfig = DEFAULT_CONFIG) -> StaticRaggedCache:
        """Wrap RaggedCaches (their prefix only; tails start empty). With one cache and share=True the packed
        tensors are used in place (no copy); several caches are concatenated."""
        B = len(caches)
        G = caches[0].layers[0].offsets.numel() - 1
        layers = []
        for li in range(len(caches[0].layers)):
            lays = [c.layers[li] for c in caches]
            if B == 1 and share:
                k, v = lays[0].k, lays[0].v
            else:
                k = torch.cat([x.k for x in lays])
                v = torch.cat([x.v for x in lays])
            off = offsets_of(torch.cat([x.lengths.cpu() for x in lays]))
            layers.append(_static_layer(k, v, off, capacity, split, config))
        return cls(layers, B, G, torch.tensor([c.next_pos for c in caches]))

    @classmethod
    def from_keeps(cls, pf, keeps: torch.Tensor, values: list | None, capacity: int, split: int | None = None,
                   config: SplitKVConfig = DEFAULT_CONFIG) -> StaticRaggedCache:
        """B compressed caches of one prompt packed straight from its prefill (what `from_ragged` of B
        `RaggedCache.from_prefill`s gives, in one gather per layer): keeps (B, L, G, n) bool; values: B entries of
        per-layer replacement values (a merging policy's) or None (the captured V)."""
        B, L, G, n = keeps.shape
        values = [None] * B if values is None else list(values)
        layers = []
        for li, c in enumerate(pf.layers):
            keep = keeps[:, li].to(c.k.device)  # (B, G, n)
            k = c.k.unsqueeze(0).expand(B, *c.k.shape)[keep]  # (N, d) sequence-major, then head, then token
            if all(x is None for x in values):
                v = c.v.unsqueeze(0).expand(B, *c.v.shape)[keep]
            else:
                v = stacked_values(pf, li, values)[keep]
            off = offsets_of(keep.sum(-1).view(-1))
            layers.append(_static_layer(k, v, off, capacity, split, config))
        return cls(layers, B, G, torch.full((B,), pf.n, dtype=torch.long))

    def kept_bytes(self) -> int:
        return kept_bytes(self.layers)

    def allocated_bytes(self, include_tail: bool = False) -> int:
        return allocated_bytes(self.layers, include_tail)

    def reset(self, used: int, pos: torch.Tensor) -> None:
        self.used.fill_(used)
        self.pos.copy_(pos)

    def rewind(self) -> None:
        """Forget every decoded token (empty tails, positions back to the end of the prompts)."""
        self.reset(0, self.start_pos)


def _static_layer(k, v, off, capacity, split, config: SplitKVConfig) -> StaticLayer:
    S = off.numel() - 1
    d = k.shape[1]
    items = work_items(off, split or auto_split(int(off[-1]), k.device, config), k.device)
    tk = torch.randn(S, capacity, d, dtype=k.dtype, device=k.device)  # poisoned with noise, never read unwritten
    tv = torch.randn(S, capacity, d, dtype=k.dtype, device=k.device)
    return StaticLayer(k, v, off, tk, tv, items)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm exactly: float32 statistics, weight applied in the input dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def fused_pre_attention(h, ln_w, eps: float, w_qkv, cos, sin, tail_k, tail_v, used, H: int, G: int, d: int):
    """norm → one q/k/v product → RoPE → write k, v into the tail at `used`. h (B, 1, D) → q (B·G, r, d)."""
    B = h.shape[0]
    qkv = torch.nn.functional.linear(_rms(h, ln_w, eps), w_qkv)  # (B, 1, (H + 2G)·d)
    q, k, v = qkv.split([H * d, G * d, G * d], dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, 1, d)
    q = apply_rope(q.view(B, 1, H, d).transpose(1, 2), cos, sin)  # (B, H, 1, d)
    k = apply_rope(k.view(B, 1, G, d).transpose(1, 2), cos, sin)  # (B, G, 1, d)
    tail_k.index_copy_(1, used, k.reshape(B * G, 1, d))
    tail_v.index_copy_(1, used, v.reshape(B * G, 1, d))
    return q.reshape(B * G, H // G, d).contiguous()


def fused_post_attention(h, o, w_o, ln_w, eps: float, w_gate_up, w_down, inter: int):
    """o_proj + residual → norm → one gate/up product → SiLU·up → down + residual. h (B, 1, D), o (B·G, r, d)."""
    B = h.shape[0]
    h = h + torch.nn.functional.linear(o.reshape(B, 1, -1), w_o)
    g, u = torch.nn.functional.linear(_rms(h, ln_w, eps), w_gate_up).split([inter, inter], dim=-1)
    return h + torch.nn.functional.linear(torch.nn.functional.silu(g) * u, w_down)


def fusable(model) -> bool:
    """Llama-style layers the fused step reproduces exactly: no q/k norms, no biases, SiLU MLP, and every projection a
    plain nn.Linear (a tensor-parallel shard's o_proj/down_proj all_reduce their output: `tensor_parallel`)."""
    c = model.config
    lay = model.model.layers[0]
    a = lay.self_attn
    projections = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, lay.mlp.gate_proj, lay.mlp.up_proj, lay.mlp.down_proj)
    return (getattr(a, "q_norm", None) is None and all(type(m) is torch.nn.Linear and m.bias is None
                                                       for m in projections)
            and getattr(c, "hidden_act", "silu") == "silu")


def fuse_projections(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pack each layer's q/k/v weights into one tensor and gate/up into another, and point the modules' weights at
    views of them: the model computes exactly as before and no weight is stored twice. Returns [(w_qkv, w_gu)]."""
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        if getattr(a, "_flowkv_qkv", None) is None:
            w_qkv = torch.cat([a.q_proj.weight.data, a.k_proj.weight.data, a.v_proj.weight.data])
            w_gu = torch.cat([m.gate_proj.weight.data, m.up_proj.weight.data])
            nq, nk = a.q_proj.weight.shape[0], a.k_proj.weight.shape[0]
            a.q_proj.weight.data = w_qkv[:nq]
            a.k_proj.weight.data = w_qkv[nq:nq + nk]
            a.v_proj.weight.data = w_qkv[nq + nk:]
            ni = m.gate_proj.weight.shape[0]
            m.gate_proj.weight.data = w_gu[:ni]
            m.up_proj.weight.data = w_gu[ni:]
            a._flowkv_qkv, m._flowkv_gu = w_qkv, w_gu
        out.append((a._flowkv_qkv, m._flowkv_gu))
    return out


_COMPILED: dict = {}


def _compiled(fn):
    """torch.compile'd once per function (the same code serves every layer: only tensors change)."""
    if fn not in _COMPILED:
        # emulate_precision_casts: round to bf16 where eager does, so compiled == eager bit for bit (tested)
        _COMPILED[fn] = torch.compile(fn, fullgraph=True, options={"emulate_precision_casts": True})
    return _COMPILED[fn]


class FastDecoder:
    """One greedy decode step for B sequences over a StaticRaggedCache:
    embed → per layer (norm, q/k/v + RoPE, tail write, split-KV attention, o_proj, MLP) → norm → lm_head.

    Everything the step needs lives in fixed buffers (ids, positions, tail length), so on CUDA `capture()` records
    the whole step as one CUDA graph and `step()` replays it. impl: split-KV implementation ('auto'|'triton'|'torch').
    fuse: per layer one q/k/v product and one gate/up product (`fuse_projections`) and the elementwise work
    (norms, RoPE, SiLU, residuals) compiled into few kernels (`fused_pre_attention` / `fused_post_attention`,
    torch.compile'd when compile=True); default on CUDA for Llama-style models. fuse=False runs the model's own
    modules through `capture.forward_layers`. config: the split-KV kernels' launch settings. sparse: an attention that
    replaces the split-KV one, `sparse.attend(li, q, n_tail, scaling)` (`blocksparse.PageDecode`: Quest-style pages
    over a whole resident cache). gemv: at batch 1, each layer as four Triton kernels, every product with its
    neighbours' elementwise work fused in (`kernels.gemv`: norm + q/k/v + RoPE + tail write, o + residual,
    norm + gate/up + SiLU·up, down + residual); default on for batch 1 when the step is fused and uses Triton.
    gemv_config: their launch settings."""

    def __init__(self, model, cache: StaticRaggedCache, impl: str = "auto", fuse: bool | None = None,
                 compile: bool | None = None, config: SplitKVConfig = DEFAULT_CONFIG, sparse=None,
                 gemv: bool | None = None, gemv_config: GemvConfig = DEFAULT_GEMV_CONFIG):
        self.model = model
        self.cache = cache
        self.impl = impl
        self.config = config
        dev = cache.device
        self.ids = torch.zeros(cache.batch, 1, dtype=torch.long, device=dev)  # (B, 1)
        self.graph = None
        self.logits = None
        inner = model.model
        self.scalings = [scaling_of(layer.self_attn) for layer in inner.layers]
        triton = use_triton(impl, cache.layers[0].k)
        self.impl_used = "triton" if triton else "torch"
        if triton:
            r = model.config.num_attention_heads // cache.kv_heads
            for lay in cache.layers:
                lay.tables = triton_tables(lay.items, lay.k, lay.v, lay.tail_k, lay.tail_v)
                lay.ws = make_workspace(lay.items, lay.offsets.numel() - 1, r, lay.k.shape[1], lay.k.dtype, dev)
        self.fuse = (dev.type == "cuda" and fusable(model)) if fuse is None else bool(fuse)
        if self.fuse and not fusable(model):
            raise ValueError("fuse=True needs Llama-style layers (no q/k norms, no biases, SiLU MLP)")
        self.compile = (dev.type == "cuda") if compile is None else bool(compile)
        if self.fuse:
            self.fused = fuse_projections(model)
            self.pre = _compiled(fused_pre_attention) if self.compile else fused_pre_attention
            self.post = _compiled(fused_post_attention) if self.compile else fused_post_attention
        can_gemv = self.fuse and triton and cache.batch == 1
        self.gemv = can_gemv if gemv is None else bool(gemv)
        if self.gemv and not can_gemv:
            raise ValueError(f"gemv=True needs the fused step (fuse={self.fuse}), the Triton kernels "
                             f"(impl used: {self.impl_used!r}) and batch 1 (batch {cache.batch})")
        self.gemv_config = gemv_config
        if self.gemv:
            cfg = model.config
            H, d = cfg.num_attention_heads, cache.layers[0].k.shape[1]
            w = cache.layers[0].k
            self._q = torch.empty(cache.kv_heads, H // cache.kv_heads, d, dtype=w.dtype, device=dev)
            self._act = torch.empty(inner.layers[0].mlp.gate_proj.weight.shape[0], dtype=w.dtype, device=dev)
        self.sparse = sparse
        self.label = (self.impl_used + ("+fused" if self.fuse else "") + ("+compiled" if self.fuse and self.compile
                                                                         else "")
                      + ("+gemv" if self.gemv else "") + (f"+pages{sparse.page}" if sparse is not None else ""))

    def _attend(self, li: int, qs: torch.Tensor, n_tail: torch.Tensor) -> torch.Tensor:
        """Split-KV attention of layer li for q (B·G, r, d) over n_tail tail tokens (the new k, v are already in
        the tail)."""
        lay = self.cache.layers[li]
        if self.sparse is not None:
            return self.sparse.attend(li, qs, n_tail, self.scalings[li])
        if self.impl_used == "triton":
            return split_kv_triton(qs, lay.tables, n_tail, self.scalings[li], lay.ws, self.config)
        return split_kv_torch(qs, lay.k, lay.v, lay.items, lay.tail_k, lay.tail_v, n_tail, self.scalings[li])

    def _gemv_layer(self, li: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    n_tail: torch.Tensor) -> torch.Tensor:
        """One layer at batch 1 as four fused kernels (`kernels.gemv`); h (1, 1, D) is updated in place."""
        c, lay, tiles = self.cache, self.cache.layers[li], self.gemv_config
        layer, (w_qkv, w_gu) = self.model.model.layers[li], self.fused[li]
        ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
        G, r, d = self._q.shape
        qs = qkv_rope(h, ln1.weight, ln1.variance_epsilon, w_qkv, cos, sin, lay.tail_k, lay.tail_v, c.used, G * r,
                      G, d, self._q, tiles.qkv)
        o = self._attend(li, qs, n_tail)
        residual(o, layer.self_attn.o_proj.weight, h, h, tiles.o)
        gate_up_silu(h, ln2.weight, ln2.variance_epsilon, w_gu, self._act, tiles.gate_up)
        return residual(self._act, layer.mlp.down_proj.weight, h, h, tiles.down)

    @torch.no_grad()
    def _forward(self) -> torch.Tensor:
        c = self.cache
        inner = self.model.model
        B, G = c.batch, c.kv_heads
        h = inner.embed_tokens(self.ids)  # (B, 1, D)
        cos, sin = rotary(self.model, h, c.pos)
        n_tail = c.used + 1  # tail tokens every layer attends to (the new one included)
        if self.gemv:
            for li in range(len(inner.layers)):
                h = self._gemv_layer(li, h, cos, sin, n_tail)
        elif self.fuse:
            cfg = self.model.config
            H, d = cfg.num_attention_heads, c.layers[0].k.shape[1]
            for li, layer in enumerate(inner.layers):
                lay, (w_qkv, w_gu) = c.layers[li], self.fused[li]
                a, m = layer.self_attn, layer.mlp
                qs = self.pre(h, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon, w_qkv, cos,
                              sin, lay.tail_k, lay.tail_v, c.used, H, G, d)
                o = self._attend(li, qs, n_tail)
                h = self.post(h, o, a.o_proj.weight, layer.post_attention_layernorm.weight,
                              layer.post_attention_layernorm.variance_epsilon, w_gu, m.down_proj.weight,
                              m.gate_proj.weight.shape[0])
        else:
            def att(li, q, k, v):  # q (B, H, 1, d), k/v (B, G, 1, d)
                lay, S, d = c.layers[li], B * G, q.shape[-1]
                lay.tail_k.index_copy_(1, c.used, k.reshape(S, 1, d))
                lay.tail_v.index_copy_(1, c.used, v.reshape(S, 1, d))
                return self._attend(li, q.reshape(S, -1, d).contiguous(), n_tail).reshape(B, -1, 1, d)

            h = forward_layers(self.model, h, cos, sin, att)
        logits = self.model.lm_head(inner.norm(h))[:, -1]  # (B, vocab)
        c.used += 1
        c.pos += 1
        return logits

    def capture(self, warmup: int = 2) -> None:
        """Record the step as a CUDA graph (warm-up steps run first; the cache's tail/positions are restored)."""
        if self.cache.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device; on CPU call step() without capture()")
        c = self.cache
        used0, pos0 = int(c.used), c.pos.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                self._forward()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
        torch.cuda.synchronize()
        c.reset(used0, pos0)

    @torch.no_grad()
    def step(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Feed one token per sequence (ids (B,) or (B, 1); None repeats the last) → logits (B, vocab)."""
        if int(self.cache.used) >= self.cache.capacity:
            raise RuntimeError(f"tail capacity {self.cache.capacity} exhausted; build the cache with a larger one")
        if ids is not None:
            self.ids.copy_(ids.view(-1, 1))
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._forward()

    def step_no_check(self) -> None:
        """Replay without the capacity check (which reads `used` from the device): timing loops only."""
        self.graph.replay()
