"""Prefill a prompt layer by layer and capture what every policy needs.

We run the decoder ourselves (embed → per layer: norm, q/k/v, causal attention, o_proj, MLP → norm, lm_head),
calling the model's own modules, so the same few lines serve the CPU notebooks, chunked long-context prefill on a
GPU and compression applied layer by layer. `tests/test_capture.py` checks the logits against the HF forward.

Per layer ℓ we keep: window queries Q (H, w, d) after RoPE; all keys/values K, V (G, n, d) in GQA layout;
the attention block output O (w, D) on the window rows; the residual stream entering the layer (w, D);
and, from the model, W_O^h (d, D) per head and b_O. Only when asked (`all_queries=True`, for policies whose class
says `needs_all_queries`, e.g. H2O) every prompt query too (H, n, d), from which `Prefill.column_sums` accumulates
the attention of all queries block by block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .attention import attention_column_sums, causal_attention, project_qkv, scaling_of, window_attention
from .models import ModelShape, shape_of
from .quant import dense_weight


@dataclass
class LayerCapture:
    q: torch.Tensor  # (H, w, d) window queries, after RoPE
    k: torch.Tensor  # (G, n, d) keys, after RoPE
    v: torch.Tensor  # (G, n, d) values
    attn_out: torch.Tensor  # (w, D) attention block output (o_proj applied, bias included) on the window rows
    resid: torch.Tensor  # (w, D) residual stream entering the layer, window rows
    scaling: float
    queries: torch.Tensor | None = None  # (H, n, d) every prompt query after RoPE; only with prefill(all_queries=True)


@dataclass
class Prefill:
    """Everything captured from one prompt; policies read it, the cache is built from it."""

    model: torch.nn.Module
    input_ids: torch.Tensor  # (1, n)
    window: int
    layers: list[LayerCapture]
    logits: torch.Tensor  # (vocab,) next-token logits after the prompt, float32
    _attn: dict = field(default_factory=dict, repr=False)
    _memo: dict = field(default_factory=dict, repr=False)
    _colsum: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return self.input_ids.shape[-1]

    @property
    def shape(self) -> ModelShape:
        return shape_of(self.model)

    def attn(self, layer: int) -> torch.Tensor:
        """Window attention A (H, w, n), float32, memoised (every policy reads the same one)."""
        if layer not in self._attn:
            c = self.layers[layer]
            self._attn[layer] = window_attention(c.q, c.k, c.scaling)
        return self._attn[layer]

    def column_sums(self, layer: int) -> torch.Tensor:
        """Attention accumulated over every prompt query, c_h[j] = Σ_{i<n} A_h[i, j]: (H, n) float32, memoised.
        Computed block by block from the captured queries (`attention.attention_column_sums`): never n × n."""
        if layer not in self._colsum:
            c = self.layers[layer]
            if c.queries is None:
                raise ValueError(f"layer {layer}: the prefill kept only the {self.window} window queries; the "
                                 f"attention of every prompt query needs prefill(..., all_queries=True) (see "
                                 f"policies.prefill_options)")
            self._colsum[layer] = attention_column_sums(c.queries, c.k, c.scaling)
        return self._colsum[layer]

    def w_o(self, layer: int) -> torch.Tensor:
        """Per-head output projections W_O^h stacked: (H, d, D), so that O = Σ_h (A_h V_h) @ W_O^h."""
        return head_wo(self.model.model.layers[layer].self_attn, self.shape)

    def b_o(self, layer: int) -> torch.Tensor | None:
        return self.model.model.layers[layer].self_attn.o_proj.bias

    def memo(self, layer: int, key: tuple, compute: Callable[[], torch.Tensor]):
        """A budget-independent quantity of one layer (a policy's scores, projected-value norms, ...), computed
        once per prompt: every budget of a sweep reuses it. `key` must name everything the value depends on
        besides the prefill and the layer (e.g. the policy and its parameters); layer -1: a quantity of every layer.
        Callers must not modify it."""
        k = (layer, *key)
        if k not in self._memo:
            self._memo[k] = compute()
        return self._memo[k]

    def memo_layers(self, layers: Sequence[int], key: tuple, compute: Callable[[int], torch.Tensor | tuple]):
        """`memo` of several layers, stacked: compute(ℓ) gives one layer's value (a tensor, or a tuple of tensors
        stacked element by element) → (len(layers), ...). When `layers` is every layer the stack is memoised too
        (layer -1), so the batched selection of every budget reads one tensor. Callers must not modify it."""
        layers = list(layers)

        def stack():
            vals = [self.memo(li, key, lambda li=li: compute(li)) for li in layers]
            return tuple(map(torch.stack, zip(*vals, strict=True))) if isinstance(vals[0], tuple) else torch.stack(vals)

        if layers == list(range(len(self.layers))):
            return self.memo(-1, ("stacked", *key), stack)
        return stack()

    def forget(self, layer: int | None = None) -> None:
        """Drop the memoised window attention, column sums and `memo` entries of one layer (None: of every layer), e.g. so
        that each policy timed on the same layer pays for its own."""
        for memo in (self._attn, self._colsum):
            if layer is None:
                memo.clear()
            else:
                memo.pop(layer, None)
        for k in [k for k in self._memo if layer is None or k[0] in (layer, -1)]:  # -1: of every layer
            del self._memo[k]


def stacked_values(pf: Prefill, layer: int, values: list) -> torch.Tensor:
    """(B, G, n, d) values of B points at one layer: each point's replacement values (a merging policy's
    per-layer list) or, for None, the captured V."""
    v = pf.layers[layer].v
    return torch.stack([v if x is None else x[layer].to(v.device) for x in values])


def head_wo(attn, shape: ModelShape) -> torch.Tensor:
    """o_proj.weight is (D, H·d); W_O^h = weight[:, h·d:(h+1)·d]ᵀ → stacked (H, d, D). An FP8 o_proj (`quant`) is
    dequantised to its activations' dtype, the W_O its reference path multiplies; a dense one is read in place."""
    W = dense_weight(attn.o_proj)  # (D, H*d)
    return W.T.reshape(shape.heads, shape.head_dim, shape.hidden)


def rotary(model, h: torch.Tensor, positions: torch.Tensor):
    """(cos, sin) of shape (B, T, d) from the model's own rotary module (handles Llama-3 rope scaling)."""
    return model.model.rotary_emb(h, positions)


def run_layer(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend, chunk: int | None = None,
              out_rows: int | None = None):
    """One decoder layer: h + attn(norm(h)), then + mlp(norm(·)). `attend(q, k, v) → (B, H, T, d)` is where
    prefill (causal SDPA) and decode (cache) differ. Returns (h_out, q, k, v, o) with o the attention output of the
    last `out_rows` rows (None: every row).

    chunk: norms, projections, o_proj and MLP run on `chunk` rows at a time, writing q/k/v into preallocated
    tensors and the residual updates into h in place (h is then h_out; callers that need the layer's input keep a
    copy of the rows they need), so a long prompt's working set is h, q, k, v and the attention output, never
    several full-width temporaries (a Llama-3-70B layer at 500K tokens: ≈ 27 GB instead of ≈ 60)."""
    attn = layer.self_attn
    B, T, _ = h.shape
    if chunk is None or chunk >= T:
        q, k, v = project_qkv(attn, layer.input_layernorm(h), cos, sin)
        ctx = attend(q, k, v).transpose(1, 2).reshape(B, T, -1)
        o = attn.o_proj(ctx)
        del ctx
        h = h + o
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, q, k, v, (o if out_rows is None else o[:, -out_rows:])
    q = k = v = None
    for s in range(0, T, chunk):
        qc, kc, vc = project_qkv(attn, layer.input_layernorm(h[:, s:s + chunk]), cos[:, s:s + chunk],
                                 sin[:, s:s + chunk])
        if q is None:
            q = qc.new_empty(B, qc.shape[1], T, qc.shape[-1])
            k, v = kc.new_empty(B, kc.shape[1], T, kc.shape[-1]), vc.new_empty(B, vc.shape[1], T, vc.shape[-1])
        q[:, :, s:s + chunk], k[:, :, s:s + chunk], v[:, :, s:s + chunk] = qc, kc, vc
        del qc, kc, vc
    ctx = attend(q, k, v)  # (B, H, T, d)
    first = 0 if out_rows is None else max(0, T - out_rows)
    o = h.new_empty(B, T - first, h.shape[-1])
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        oc = attn.o_proj(ctx[:, :, s:e].transpose(1, 2).reshape(B, e - s, -1))
        if e > first:
            o[:, max(s, first) - first:e - first] = oc[:, max(s, first) - s:]
        hc = h[:, s:e]
        hc += oc
        hc += layer.mlp(layer.post_attention_layernorm(hc))
        del oc
    del ctx
    return h, q, k, v, o


def forward_layers(model, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
    """Every decoder layer in turn over hidden states h (B, T, D); attend(ℓ, q, k, v) → (B, H, T, d) is layer ℓ's
    attention (a cache's decode attention, the split-KV kernel, ...). The one decode loop of the project."""
    for li, layer in enumerate(model.model.layers):
        h = run_layer(layer, h, cos, sin, lambda q, k, v, li=li: attend(li, q, k, v))[0]
    return h


def check_token_ids(ids, vocab: int) -> torch.Tensor:
    """Token ids as an integer tensor with every id in [0, vocab); errors name the bad value and what is allowed."""
    ids = torch.as_tensor(ids)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"token ids: dtype {ids.dtype}; must be integers (torch.long), e.g. tok(text).input_ids")
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"token id {lo if lo < 0 else hi} is out of range: the vocabulary has ids 0..{vocab - 1}")
    return ids.long()


LayerHook = Callable[[int, LayerCapture], LayerCapture | None]


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, window: int = 32, chunk: int | None = None,
            on_layer: LayerHook | None = None, keep_kv: bool = True, all_queries: bool = False) -> Prefill:
    """Run the prompt through the model and capture every layer (see module docstring).

    window: number of last prompt queries kept (the observation window; 1 ≤ window ≤ n).
    chunk: process queries/MLP rows in chunks of this many tokens (long prompts; None = all at once).
    on_layer(ℓ, capture): called as soon as layer ℓ is done — a policy may compress there (cascading);
    it may return a replacement capture (e.g. with k, v already evicted) to be stored instead.
    all_queries: also keep every prompt query (H, n, d) per layer (H2O's accumulated attention; memory ≈ r/2 × the
    K/V of the prompt for r = H/G); dropped with the K/V when keep_kv is False.
    """
    input_ids = check_token_ids(input_ids, model.config.vocab_size)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.shape[0] != 1:
        raise ValueError(f"prefill captures one prompt at a time, got batch {input_ids.shape[0]}")
    n = input_ids.shape[-1]
    if not 1 <= window <= n:
        raise ValueError(f"window={window}: must be in [1, n={n}] (the prompt has {n} tokens)")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    inner = model.model
    h = inner.embed_tokens(input_ids)  # (1, n, D)
    cos, sin = rotary(model, h, torch.arange(n, device=device).unsqueeze(0))
    captures: list[LayerCapture] = []
    for li, layer in enumerate(inner.layers):
        resid_win = h[0, -window:].clone()
        attend = lambda q, k, v, a=layer.self_attn: causal_attention(q, k, v, scaling_of(a), chunk=chunk)
        h, q, k, v, o = run_layer(layer, h, cos, sin, attend, chunk, out_rows=window)
        cap = LayerCapture(q=q[0, :, -window:].clone(), k=k[0], v=v[0], attn_out=o[0].clone(),
                           resid=resid_win, scaling=scaling_of(layer.self_attn), queries=q[0] if all_queries else None)
        del q, o
        if on_layer is not None:
            cap = on_layer(li, cap) or cap
        if not keep_kv:  # fresh empty tensors: a [:, :0] view would keep the layer's whole K/V storage alive
            G, _, d = cap.k.shape
            cap.k, cap.v = cap.k.new_empty(G, 0, d), cap.v.new_empty(G, 0, d)
            cap.queries = None
        del k, v  # only the capture may hold this layer's K/V now
        captures.append(cap)
    logits = model.lm_head(inner.norm(h[:, -1:]))[0, -1].float()
    return Prefill(model=model, input_ids=input_ids, window=window, layers=captures, logits=logits)
