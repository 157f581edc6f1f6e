"""What the benchmarks run on: named model shapes (random weights, real shape), prompts, and caches of given
per-head lengths with random contents (speed and memory depend on the lengths, not on the values)."""

from __future__ import annotations

import math

import torch

from ..fastdecode import StaticRaggedCache
from ..kernels import DEFAULT_CONFIG, SplitKVConfig
from ..models import ModelShape
from .tables import RANDOM_WEIGHTS

# The shapes the GPU sweep uses (Llama-3-8B: 32 layers, 32 heads, 8 KV heads, d 128, D 4096, MLP 14336, vocab 128256)
SHAPES = {
    "llama3-8b": dict(family="llama", layers=32, heads=32, kv_heads=8, head_dim=128, hidden=4096,
                      intermediate=14336, vocab=128256),
    "llama3-8b-2l": dict(family="llama", layers=2, heads=32, kv_heads=8, head_dim=128, hidden=4096,
                         intermediate=14336, vocab=128256),
    "llama3-70b": dict(family="llama", layers=80, heads=64, kv_heads=8, head_dim=128, hidden=8192,
                       intermediate=28672, vocab=128256),  # tensor-parallel runs (`tensor_parallel`)
    "tiny": dict(family="llama", layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64, intermediate=128,
                 vocab=128),
}


def shape_model(shape: str, device, longest: int, dtype=torch.bfloat16, layers: int | None = None):
    """A random-weight model of one of SHAPES (optionally with fewer layers), positions for `longest` + 4096
    tokens, named "<shape>[ N layers] (random weights, real shape)" so every row and figure says so."""
    from ..models import random_model

    cfg = SHAPES[shape]
    model = random_model(cfg["family"], layers or cfg["layers"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"],
                         cfg["hidden"], vocab=cfg["vocab"], intermediate=cfg["intermediate"], dtype=dtype,
                         device=str(device), max_positions=longest + 4096)
    model.config._name_or_path = f"{shape}{f' {layers} layers' if layers else ''} ({RANDOM_WEIGHTS})"
    return model


def prompt_ids(n: int, vocab: int, tok=None, seed: int = 0) -> torch.Tensor:
    """(1, n) prompt ids: real prose (the stdlib-docstring haystack) through the tokenizer when one is given,
    else random ids (random-weight models: speed does not depend on the tokens)."""
    if tok is not None:
        try:
            from ..tasks.haystack import text
            body = text()
        except Exception:  # the haystack module is optional here
            body = " ".join(f"Sentence {i} of the benchmark prompt says nothing in particular." for i in range(2000))
        ids = tok(body, return_tensors="pt")["input_ids"][0]
        reps = math.ceil(n / max(1, ids.numel()))
        return ids.repeat(reps)[:n].view(1, n)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g)


def synthetic_cache(counts: torch.Tensor, batch: int, shape: ModelShape, n: int, capacity: int, dtype, device,
                    layout: str = "ragged", config: SplitKVConfig = DEFAULT_CONFIG) -> StaticRaggedCache:
    """Random-content cache with per-head lengths counts (L, G) replicated over the batch; layout 'padded' pads
    every head of a layer to the layer's longest head (a dense (G, max) layout). config: the split-KV launch
    settings its work items are cut for."""
    if layout not in ("ragged", "padded"):
        raise ValueError(f"layout={layout!r}: allowed are 'ragged', 'padded'")
    c = counts.clone().long()
    if layout == "padded":
        c = c.amax(-1, keepdim=True).expand_as(c).clone()
    lengths = c.unsqueeze(1).expand(c.shape[0], batch, c.shape[1]).contiguous()  # (L, B, G)
    return StaticRaggedCache.from_lengths(lengths, shape.head_dim, capacity, n, dtype=dtype, device=device,
                                          config=config)
