"""What the benchmarks run on: named model shapes (random weights, real shape), prompts, and caches of given
per-head lengths with random contents (speed and memory depend on the lengths, not on the values)."""

from __future__ import annotations

import math

import torch

from ..fastdecode import StaticRaggedCache
from ..kernels import DEFAULT_CONFIG, SplitKVConfig
from ..models import ModelShape, random_model
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


WEIGHT_FORMATS = ("bf16", "fp8")  # "fp8": the decoder layers' projections in FP8 e4m3 (`quant.Fp8Linear`)


def random_builder(weights: str):
    """The random-model builder of a weight format: `models.random_model` ("bf16": every weight in the model's
    dtype) or `random_fp8_model` ("fp8"); a ValueError names any other format."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights={weights!r}: allowed are {', '.join(WEIGHT_FORMATS)}")
    return random_fp8_model if weights == "fp8" else random_model


def shape_model(shape: str, device, longest: int, dtype=torch.bfloat16, layers: int | None = None,
                weights: str = "bf16"):
    """A random-weight model of one of SHAPES (optionally with fewer layers), positions for `longest` + 4096
    tokens, named "<shape>[ N layers] (random weights, real shape)" so every row and figure says so.
    weights: "bf16" (every weight in `dtype`) or "fp8" (the layers' projections in FP8 e4m3 with per-channel scales,
    built layer by layer so the `dtype` model never exists: a Llama-3-70B shape on one GPU); activations, norms,
    embeddings and the LM head are in `dtype` either way."""
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r}: known are {', '.join(SHAPES)}")
    build = random_builder(weights)
    cfg = SHAPES[shape]
    kw = dict(vocab=cfg["vocab"], intermediate=cfg["intermediate"], dtype=dtype, device=str(device),
              max_positions=longest + 4096)
    args = (cfg["family"], layers or cfg["layers"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["hidden"])
    model = build(*args, **kw)
    model.config._name_or_path = f"{shape}{f' {layers} layers' if layers else ''} ({RANDOM_WEIGHTS})"
    return model


def random_fp8_model(family: str, layers: int, heads: int, kv_heads: int, head_dim: int, hidden: int, *,
                     vocab: int, intermediate: int, dtype=torch.bfloat16, device="cpu", max_positions: int = 4096,
                     seed: int = 0):
    """`models.random_model` with every decoder layer's projections in FP8 (`quant.Fp8Linear`), built one layer at
    a time: the first layer as `random_model` makes it, then quantised; every further layer on the meta device,
    its projections drawn directly as FP8 with the same standard deviations (q/k widened as `random_model` does, the
    rest the config's initializer_range) and its norms set to one. Peak memory: the FP8 model plus one projection
    drawn in `dtype`. Llama-style layers (no biases) only."""
    from ..quant import Fp8Linear, quantize_model_

    model = random_model(family, 1, heads, kv_heads, head_dim, hidden, vocab=vocab, intermediate=intermediate,
                         seed=seed, dtype=dtype, device=str(device), max_positions=max_positions)
    quantize_model_(model)
    cfg, proto = model.config, model.model.layers[0]
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    std, std_qk = cfg.initializer_range, 2.0 / hidden ** 0.5
    for i in range(1, layers):
        with torch.device("meta"):
            layer = type(proto)(cfg, layer_idx=i)
        a, m = layer.self_attn, layer.mlp
        for parent, name, sd in ((a, "q_proj", std_qk), (a, "k_proj", std_qk), (a, "v_proj", std), (a, "o_proj", std),
                                 (m, "gate_proj", std), (m, "up_proj", std), (m, "down_proj", std)):
            lin = getattr(parent, name)
            if lin.bias is not None:
                raise ValueError(f"random_fp8_model: {family} layers have a bias on {name}; FP8 random models "
                                 "are Llama-style (no biases)")
            setattr(parent, name, Fp8Linear.random(lin.out_features, lin.in_features, sd, device, dtype_out=dtype,
                                                   generator=gen))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight = torch.nn.Parameter(torch.ones(hidden, dtype=dtype, device=device), requires_grad=False)
        left = [n for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"random_fp8_model: layer {i} still has meta tensors {left}")
        model.model.layers.append(layer.eval().requires_grad_(False))
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[0]] * layers
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
