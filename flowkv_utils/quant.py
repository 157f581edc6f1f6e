"""8-bit (FP8 e4m3) weights for the decoder's linear layers: a 70B-shaped random-weight model fits one 141 GB GPU.

For speed and memory benchmarks of random-weight models only; accuracy results always use the real models' own
weights. Each weight row (output channel) i is stored as FP8 codes q_i and one float32 scale s_i = max_j |W_ij| / 448,
so W ≈ q · s[:, None] (symmetric, per-channel). The matmul y = x (q·s)ᵀ + b runs two ways (`fp8_linear`):

- 'scaled_mm' (CUDA, bf16 activations, compute capability ≥ 8.9: Ada, Hopper): the activations are quantised per
  token as well (row amax / 448) and `torch._scaled_mm` multiplies the FP8 operands with both row-wise scales;
- 'reference' (CPU, older GPUs): dequantise the weight to x's dtype, then `F.linear`.

- `quantize_rows(w)` → (q, scale): the one quantisation formula; `dequantize_rows(q, scale, dtype)` its inverse.
- `Fp8Linear`: an nn.Linear stand-in holding `weight` (out, in) FP8 and `weight_scale` (out,) float32 as
  parameters (so parameter byte counts see them); `from_linear`, `random` (drawn and quantised in row chunks).
- `dense_weight(module)`: the (out, in) weight of any linear-like module as a dense tensor (W_O for the policies).
- `quantize_model_(model)`: every decoder projection to FP8, one layer at a time; `weight_format(model)` for tables.

Cast a model before quantising it: `model.to(dtype)` afterwards would cast the FP8 codes like any float tensor
(`Fp8Linear.forward` then refuses); moving it (`model.to(device)`) is fine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels._triton import cuda_capability

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448.0
MIN_SCALE = torch.finfo(torch.float32).tiny  # a row or token of zeros gets this scale and exact zero codes
CHUNK_ROWS = 4096  # weight rows quantised (or drawn) at once: the float32 temporary is CHUNK_ROWS × in_features
IMPLS = ("auto", "scaled_mm", "reference")
WEIGHT_FORMAT = "fp8-e4m3 per-channel"
PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
               ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: must be one of {', '.join(map(repr, IMPLS))}")


# ------------------------------------------------------------------------------------------ the quantisation formula
def _quantize_block(w: torch.Tensor, q_out: torch.Tensor, scale_out: torch.Tensor) -> None:
    """Rows of w (r, in) → FP8 codes into q_out (r, in) and float32 scales into scale_out (r,)."""
    amax = w.abs().amax(dim=1).float()  # (r,)
    if not torch.isfinite(amax).all():
        raise ValueError("quantize_rows: the weight has inf or NaN entries; only finite weights can be quantised")
    scale = (amax / FP8_MAX).clamp_min(MIN_SCALE)
    q_out.copy_((w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX))  # the cast to FP8 rounds to nearest
    scale_out.copy_(scale)


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"weight of shape {tuple(w.shape)}: must be 2-D (out_features, in_features)")
    if not w.is_floating_point() or w.dtype == FP8:
        raise TypeError(f"weight of dtype {w.dtype}: must be float32, bfloat16 or float16 (not already FP8)")


@torch.no_grad()
def quantize_rows(w: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row (output channel) FP8 e4m3 quantisation of a weight (out, in):
    scale_i = max_j |w_ij| / 448 (float32, at least MIN_SCALE), q_ij = round(w_ij / scale_i) in e4m3.
    Returns (q (out, in) FP8, scale (out,) float32); rows are done chunk_rows at a time (same result)."""
    _check_weight(w)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows}: must be ≥ 1")
    q = torch.empty(w.shape, dtype=FP8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for a in range(0, w.shape[0], chunk_rows):
        _quantize_block(w[a:a + chunk_rows], q[a:a + chunk_rows], scale[a:a + chunk_rows])
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q · scale[:, None] computed in float32, then cast to dtype: the dense (out, in) weight."""
    return (q.to(torch.float32) * scale[:, None]).to(dtype)


# --------------------------------------------------------------------------------------------------- the matmul
def _why_not_scaled_mm(x: torch.Tensor, wq: torch.Tensor | None = None) -> str | None:
    """Why the `torch._scaled_mm` path cannot run on x (and weight wq), or None when it can."""
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    if x.device.type != "cuda" or torch.version.hip:
        return f"x is on {x.device}{' (ROCm)' if torch.version.hip else ''}: FP8 matmuls need an NVIDIA GPU"
    if x.dtype != torch.bfloat16:
        return f"x has dtype {x.dtype}: the FP8 path takes torch.bfloat16 activations"
    cap = cuda_capability(x.device)
    if cap < (8, 9):
        return f"device {x.device} has compute capability {cap}: FP8 tensor cores need ≥ (8, 9) (Ada, Hopper)"
    if x.numel() == 0:
        return "x is empty"
    if wq is not None:
        N, K = wq.shape
        if N % 16 or K % 16:
            return f"weight {N}×{K}: torch._scaled_mm needs both dimensions multiples of 16"
        if not wq.is_contiguous():
            return "weight is not contiguous: torch._scaled_mm needs wq.t() column-major"
    return None


def scaled_mm_supported(x: torch.Tensor, wq: torch.Tensor | None = None) -> bool:
    """Whether `fp8_linear` can run x (and weight wq, if given) through `torch._scaled_mm`: x on an NVIDIA GPU of
    compute capability ≥ 8.9 in bfloat16, torch with `_scaled_mm`, weight dimensions multiples of 16."""
    return _why_not_scaled_mm(x, wq) is None


def _scaled_mm_linear(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """x (…, K) bf16 quantised per token, times the FP8 weight (N, K) with row-wise scales on both sides → (…, N)."""
    N, K = wq.shape
    x2 = x.reshape(-1, K)  # (M, K)
    scale_a = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(MIN_SCALE)  # (M, 1)
    xq = (x2 / scale_a).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous()  # (M, K) row-major, as _scaled_mm needs
    # mat2 = wq.t() (K, N) is column-major, as _scaled_mm needs; scale_b (1, N) is the weight's per-row scale
    y = torch._scaled_mm(xq, wq.t(), scale_a=scale_a, scale_b=scale.view(1, N), out_dtype=torch.bfloat16)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], N)


def fp8_linear(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
               impl: str = "auto") -> torch.Tensor:
    """y = x (wq · scale[:, None])ᵀ + bias in x's dtype; x (…, K), wq (N, K) FP8, scale (N,) float32.

    impl: 'scaled_mm' (`torch._scaled_mm`; x also quantised to e4m3 per token, so y carries the activations'
    rounding too), 'reference' (dequantise to x's dtype, then F.linear) or 'auto' (scaled_mm where
    `scaled_mm_supported`, else reference)."""
    check_impl(impl)
    if impl != "reference":
        why = _why_not_scaled_mm(x, wq)
        if why is None:
            return _scaled_mm_linear(x, wq, scale, bias)
        if impl == "scaled_mm":
            raise RuntimeError(f"impl='scaled_mm' cannot run: {why}; use impl='auto' or 'reference' (dequantise, "
                               "then F.linear)")
    return F.linear(x, dequantize_rows(wq, scale, x.dtype), bias)


# --------------------------------------------------------------------------------------------------- the module
class WeightShape:
    """in_features / out_features of a module holding an nn.Linear-layout `weight` (out, in) that is not an
    nn.Linear (Fp8Linear, tensor_parallel.RowParallelLinear)."""

    weight: torch.Tensor

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


class Fp8Linear(WeightShape, torch.nn.Module):
    """A linear layer with FP8 e4m3 weights and per-output-channel float32 scales: y = fp8_linear(x, ...).

    `weight` (out, in) and `weight_scale` (out,) are parameters (requires_grad=False), so byte counts over
    `model.parameters()` see them; `dtype_out`: the activations' dtype (that of the dense layer it replaces), the
    default dtype of `dequantize` and `dense_weight`. impl: `fp8_linear`'s ('auto' | 'scaled_mm' | 'reference')."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 dtype_out: torch.dtype = torch.bfloat16, impl: str = "auto"):
        super().__init__()
        check_impl(impl)
        if weight.dtype != FP8 or weight.dim() != 2:
            raise TypeError(f"weight: {weight.dtype} of shape {tuple(weight.shape)}; must be {FP8} (out, in): "
                            "quantise with quantize_rows or Fp8Linear.from_linear")
        if weight_scale.dtype != torch.float32 or weight_scale.shape != weight.shape[:1]:
            raise TypeError(f"weight_scale: {weight_scale.dtype} of shape {tuple(weight_scale.shape)}; must be "
                            f"torch.float32 of shape ({weight.shape[0]},), one per output row")
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.weight_scale = torch.nn.Parameter(weight_scale, requires_grad=False)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = torch.nn.Parameter(bias, requires_grad=False)
        self.dtype_out = dtype_out
        self.impl = impl

    @classmethod
    def from_linear(cls, linear: torch.nn.Module, impl: str = "auto", chunk_rows: int = CHUNK_ROWS) -> Fp8Linear:
        """Quantise an nn.Linear's weight (`quantize_rows`); the bias stays as it is, dtype_out is the weight's."""
        q, scale = quantize_rows(linear.weight.detach(), chunk_rows)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, scale, bias, linear.weight.dtype, impl)

    @classmethod
    @torch.no_grad()
    def random(cls, out_features: int, in_features: int, std: float, device: str | torch.device = "cpu",
               dtype_out: torch.dtype = torch.bfloat16, generator: torch.Generator | None = None,
               chunk_rows: int = CHUNK_ROWS, impl: str = "auto") -> Fp8Linear:
        """A random weight N(0, std²) drawn (in float32) and quantised chunk_rows rows at a time on `device`, so the
        dense weight never exists (speed/memory benchmarks of large shapes). The same generator state and chunk_rows
        give the same weight; generator must live on `device`."""
        for name, v in (("out_features", out_features), ("in_features", in_features), ("chunk_rows", chunk_rows)):
            if v < 1:
                raise ValueError(f"{name}={v}: must be ≥ 1")
        if not std > 0:
            raise ValueError(f"std={std}: must be > 0")
        q = torch.empty(out_features, in_features, dtype=FP8, device=device)
        scale = torch.empty(out_features, dtype=torch.float32, device=device)
        for a in range(0, out_features, chunk_rows):
            rows = min(chunk_rows, out_features - a)
            w = torch.randn(rows, in_features, generator=generator, device=device, dtype=torch.float32).mul_(std)
            _quantize_block(w, q[a:a + rows], scale[a:a + rows])
            del w
        return cls(q, scale, None, dtype_out, impl)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight q · scale in dtype (default dtype_out)."""
        return dequantize_rows(self.weight, self.weight_scale, dtype or self.dtype_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != FP8:
            raise TypeError(f"Fp8Linear weight has dtype {self.weight.dtype}, not {FP8}: the model was cast "
                            "(model.to(dtype)) after quantising; cast it first, then quantize_model_")
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, self.impl)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weights={WEIGHT_FORMAT}, dtype_out={self.dtype_out}, impl={self.impl!r}")


def dense_weight(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (out, in) weight of an nn.Linear-like module as a dense tensor: an FP8 `weight` with its `weight_scale`
    (Fp8Linear, a quantised tensor-parallel RowParallelLinear) dequantised to dtype, default the module's
    `dtype_out` (the activations' dtype; bfloat16 if it has none); any other `weight` itself (cast if dtype is
    given, else unchanged: the same tensor)."""
    w = module.weight
    if w.dtype == FP8:
        scale = getattr(module, "weight_scale", None)
        if scale is None:
            raise ValueError(f"{type(module).__name__} has an FP8 weight but no weight_scale: cannot dequantise it")
        return dequantize_rows(w, scale, dtype or getattr(module, "dtype_out", torch.bfloat16))
    return w if dtype is None else w.to(dtype)


# ---------------------------------------------------------------------------------------------------- the model
def _is_quantized(module: torch.nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return w is not None and w.dtype == FP8


@torch.no_grad()
def quantize_model_(model, impl: str = "auto"):
    """Every decoder layer's q/k/v/o and gate/up/down projections to FP8 (per-channel e4m3), in place, one layer at
    a time: each dense weight is freed before the next is quantised, so memory never grows by more than one
    projection. nn.Linear → `Fp8Linear`; a module with a `quantize_(impl)` method (`tensor_parallel.
    RowParallelLinear`) quantises itself; already FP8 ones are left. Embeddings, norms and lm_head stay dense.
    Records `model.config._flowkv_weights = WEIGHT_FORMAT` and drops a cached `models.fingerprint`. Returns model."""
    check_impl(impl)
    for li, layer in enumerate(model.model.layers):
        for part, name in PROJECTIONS:
            parent = getattr(layer, part)
            mod = getattr(parent, name)
            if _is_quantized(mod):
                continue
            if isinstance(mod, torch.nn.Linear):
                setattr(parent, name, Fp8Linear.from_linear(mod, impl))
            elif callable(getattr(mod, "quantize_", None)):
                mod.quantize_(impl)
            else:
                raise TypeError(f"layer {li} {part}.{name} is a {type(mod).__name__}: quantize_model_ takes "
                                "nn.Linear or modules with a quantize_(impl) method")
            del mod
        # packed copies of fastdecode.fuse_projections hold the dense q/k/v and gate/up weights: stale now
        layer.self_attn.__dict__.pop("_flowkv_qkv", None)
        layer.mlp.__dict__.pop("_flowkv_gu", None)
    model.config._flowkv_weights = WEIGHT_FORMAT
    model.__dict__.pop("_flowkv_sha", None)  # the fingerprint was the dense model's
    return model


def weight_format(model) -> str:
    """How the model's weights are stored, for result rows: WEIGHT_FORMAT ("fp8-e4m3 per-channel") when its
    projections are FP8, else the parameters' dtype name (e.g. "bfloat16")."""
    params = list(model.parameters())
    if any(p.dtype == FP8 for p in params):
        return getattr(model.config, "_flowkv_weights", None) or WEIGHT_FORMAT
    return str(params[0].dtype).removeprefix("torch.")
