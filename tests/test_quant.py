"""quant: FP8 e4m3 per-channel weights. The rounding against a nearest-value search over every e4m3 number, its
error bound, the module against a dense transcription, and a quantised model through every decoder path
(prefill, FlowKV, generate.decode, FastDecoder, a tensor-parallel shard). The torch._scaled_mm path is in
tests/test_gpu.py (CUDA, compute capability ≥ 8.9).

The bound: e4m3fn has 3 mantissa bits and exponent bias 7, so its smallest normal is 2^-6 and its subnormals are
spaced 2^-9. Rounding to nearest moves a normal value x (|x| ≥ 2^-6) by at most half an ulp, 2^-4 |x| (the ulp is
2^(e-3) for |x| ∈ [2^e, 2^(e+1))), and a subnormal one by at most half the spacing, 2^-10. The codes are w / s with
s = amax / 448, so in weight units |w - q·s| ≤ 2^-4 |w| + 2^-10 s (plus float32 rounding of w / s and q · s).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flowkv_utils import capture, fastdecode, generate, models, policies, quant
from flowkv_utils.bench.timing import weight_bytes
from flowkv_utils.cache import RaggedCache
from flowkv_utils.decomposition import attention_output, head_contributions
from flowkv_utils.tensor_parallel import RowParallelLinear, TensorParallel, shard_model

pytestmark = pytest.mark.usefixtures("one_thread")

REL_NORMAL = 2.0 ** -4  # half an ulp of 3 mantissa bits, relative to a normal value
ABS_SUBNORMAL = 2.0 ** -10  # half the subnormal spacing 2^-9, in units of the scale
SLACK = 1e-6  # float32 rounding of w / s and q · s (each ≤ 2^-24 relative)
PROPERTY = settings(max_examples=60, deadline=None)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def e4m3_values() -> torch.Tensor:
    """Every finite e4m3fn number, from the 256 byte patterns (0x7F and 0xFF are NaN)."""
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return v[torch.isfinite(v)]


def weights(seed: int, rows: int, cols: int, dtype: torch.dtype, zero_rows: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes (10^-6 .. 10^3), some all zero."""
    g = torch.Generator().manual_seed(seed)
    mag = 10.0 ** (torch.rand(rows, 1, generator=g) * 9 - 6)
    w = torch.randn(rows, cols, generator=g) * mag
    w[:zero_rows] = 0
    return w.to(dtype)


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 40), cols=st.integers(1, 48),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), chunk=st.integers(1, 50))
def test_codes_are_the_nearest_e4m3_values_within_the_bound(seed, rows, cols, dtype, chunk):
    w = weights(seed, rows, cols, dtype)
    q, s = quant.quantize_rows(w, chunk_rows=chunk)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and s.dtype == torch.float32 and s.shape == (rows,)
    wf = w.float()
    want_s = (wf.abs().amax(1) / 448.0).clamp_min(torch.finfo(torch.float32).tiny)  # the formula, transcribed
    assert torch.equal(s, want_s)
    x = wf / s[:, None]
    dist = (x[..., None] - e4m3_values()).abs().amin(-1)  # distance to the nearest e4m3 number
    assert torch.allclose((q.float() - x).abs(), dist, rtol=1e-6, atol=0)
    assert torch.equal(q.float().abs().amax(1), torch.full((rows,), 448.0))  # each row uses the full range
    err = (wf - quant.dequantize_rows(q, s, torch.float32)).abs()
    bound = REL_NORMAL * wf.abs() + ABS_SUBNORMAL * s[:, None]
    assert (err <= bound * (1 + SLACK)).all(), float((err / bound).max())


def test_zero_rows_get_a_positive_scale_and_exact_zeros():
    w = weights(0, 6, 32, torch.float32, zero_rows=3)
    w[1] = -0.0
    q, s = quant.quantize_rows(w)
    assert (s > 0).all() and torch.isfinite(s).all()
    assert torch.equal(q.float()[:3], torch.zeros(3, 32))
    assert torch.equal(quant.dequantize_rows(q, s, torch.float32)[:3], torch.zeros(3, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_requantising_a_dequantised_weight_gives_the_same_bytes(dtype):
    """q · s rounded to float32 or bf16 (relative error ≤ 2^-9) lies far closer to q than e4m3's half ulp."""
    w = weights(1, 64, 96, torch.float32, zero_rows=2)
    q, s = quant.quantize_rows(w)
    q2, s2 = quant.quantize_rows(quant.dequantize_rows(q, s, dtype))
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    assert torch.allclose(s2, s, rtol=2.0 ** -8, atol=0)


def test_quantize_rows_errors():
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4\).*2-D"):
        quant.quantize_rows(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        quant.quantize_rows(torch.zeros(2, 3).to(quant.FP8))
    with pytest.raises(TypeError, match="torch.int64"):
        quant.quantize_rows(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="inf or NaN"):
        quant.quantize_rows(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="chunk_rows=0"):
        quant.quantize_rows(torch.ones(2, 3), chunk_rows=0)


@pytest.mark.parametrize("bias", [False, True])
def test_from_linear_is_the_dequantised_linear_and_close_to_the_dense_one(bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 48, bias=bias)
    f = quant.Fp8Linear.from_linear(lin)
    assert (f.in_features, f.out_features, f.dtype_out) == (96, 48, torch.float32)
    assert f.weight.requires_grad is False and f.weight_scale.requires_grad is False
    x = torch.randn(3, 5, 96)
    y = f(x)
    assert y.shape == (3, 5, 48) and y.dtype == torch.float32
    assert torch.equal(y, F.linear(x, f.dequantize(torch.float32), lin.bias))  # the reference path exactly
    with torch.no_grad():
        want = lin(x)
    # each weight moved by ≤ 2^-4 |w| + 2^-10 s, so each output by ≤ |x| · that (+ float32 sums)
    W, s = lin.weight.detach(), f.weight_scale
    bound = x.abs() @ (REL_NORMAL * W.abs() + ABS_SUBNORMAL * s[:, None]).T
    assert ((y - want).abs() <= bound * (1 + 1e-4) + 1e-5 * (x.abs() @ W.abs().T)).all()


def test_from_linear_bf16_keeps_the_activation_dtype():
    lin = torch.nn.Linear(64, 32, bias=True).to(torch.bfloat16)
    f = quant.Fp8Linear.from_linear(lin)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert f.dtype_out == torch.bfloat16 and f.dequantize().dtype == torch.bfloat16
    assert torch.equal(f(x), F.linear(x, f.dequantize(), lin.bias))
    assert quant.dense_weight(f).dtype == torch.bfloat16 and quant.dense_weight(f, torch.float32).dtype == torch.float32
    assert quant.dense_weight(lin) is lin.weight  # a dense module: its own weight, not a copy
    assert "fp8-e4m3 per-channel" in repr(f)


def test_random_draws_in_chunks_deterministically(monkeypatch):
    drawn = []
    randn = torch.randn

    def spy(*size, **kw):
        drawn.append(size)
        return randn(*size, **kw)

    monkeypatch.setattr(torch, "randn", spy)
    make = lambda seed: quant.Fp8Linear.random(300, 200, std=0.05, generator=torch.Generator().manual_seed(seed),
                                               chunk_rows=64, dtype_out=torch.float32)
    a, b, c = make(0), make(0), make(1)
    assert max(size[0] for size in drawn) == 64  # never the whole (300, 200) weight at once
    assert a.weight.shape == (300, 200) and a.weight.dtype == quant.FP8 and a.weight_scale.shape == (300,)
    assert a.bias is None and a.dtype_out == torch.float32
    assert torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8))
    assert torch.equal(a.weight_scale, b.weight_scale)
    assert not torch.equal(a.weight.view(torch.uint8), c.weight.view(torch.uint8))
    w = a.dequantize(torch.float32)
    assert abs(float(w.std()) / 0.05 - 1) < 0.03  # 60 000 draws: the sample std is within ≈ 0.3 %, + rounding
    assert abs(float(w.mean())) < 4 * 0.05 / 60_000 ** 0.5
    with pytest.raises(ValueError, match="std=0"):
        quant.Fp8Linear.random(4, 4, std=0)


def test_bad_impl_and_unsupported_scaled_mm():
    q, s = quant.quantize_rows(torch.randn(32, 16))
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match=r"impl='fast'.*'auto', 'scaled_mm', 'reference'"):
        quant.fp8_linear(x, q, s, impl="fast")
    with pytest.raises(ValueError, match="impl='fast'"):
        quant.Fp8Linear(q, s, impl="fast")
    with pytest.raises(ValueError, match="impl='fast'"):
        quant.quantize_model_(models.random_model(layers=1), impl="fast")
    assert not quant.scaled_mm_supported(x)
    with pytest.raises(RuntimeError, match="impl='scaled_mm' cannot run: x is on cpu"):
        quant.fp8_linear(x, q, s, impl="scaled_mm")
    assert torch.equal(quant.fp8_linear(x, q, s), quant.fp8_linear(x, q, s, impl="reference"))
    with pytest.raises(TypeError, match="must be torch.float8_e4m3fn"):
        quant.Fp8Linear(torch.randn(32, 16), s)
    with pytest.raises(TypeError, match=r"shape \(32,\)"):
        quant.Fp8Linear(q, s[:5])


# ------------------------------------------------------------------------------------------ a quantised model
@pytest.fixture(scope="module")
def dense_and_fp8():
    """(dense float32 model, its FP8 copy, a prompt)."""
    m = models.random_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16, dtype=torch.float32)
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    return m, quant.quantize_model_(copy.deepcopy(m)), ids


def dequantised_copy(fp8_model):
    """The dense model the FP8 one computes (reference path): every Fp8Linear back to an nn.Linear holding q · s."""
    m = copy.deepcopy(fp8_model)
    for layer in m.model.layers:
        for part, name in quant.PROJECTIONS:
            f = getattr(getattr(layer, part), name)
            lin = torch.nn.Linear(f.in_features, f.out_features, bias=f.bias is not None)
            lin.weight = torch.nn.Parameter(f.dequantize(torch.float32), requires_grad=False)
            lin.bias = f.bias
            setattr(getattr(layer, part), name, lin)
    return m


def test_quantize_model_replaces_every_projection(dense_and_fp8):
    m, q, _ = dense_and_fp8
    for layer in q.model.layers:
        for part, name in quant.PROJECTIONS:
            assert type(getattr(getattr(layer, part), name)) is quant.Fp8Linear, (part, name)
    assert torch.equal(q.model.embed_tokens.weight, m.model.embed_tokens.weight)
    assert torch.equal(q.lm_head.weight, m.lm_head.weight) and q.lm_head.weight.dtype == torch.float32
    assert quant.weight_format(q) == "fp8-e4m3 per-channel" and quant.weight_format(m) == "float32"
    assert q.config._flowkv_weights == quant.WEIGHT_FORMAT
    assert not fastdecode.fusable(q)  # FastDecoder then runs the modules (fuse=False)
    # weight bytes: each projection's float32 weight (4 B/entry) becomes 1 B/entry + one float32 scale per row
    proj = [getattr(getattr(layer, part), name).weight for layer in m.model.layers for part, name in quant.PROJECTIONS]
    want = weight_bytes(m) - sum(4 * w.numel() for w in proj) + sum(w.numel() + 4 * w.shape[0] for w in proj)
    assert weight_bytes(q) == want


def test_fingerprint_of_an_fp8_model():
    m = models.random_model(layers=1)
    before = models.fingerprint(m)
    quant.quantize_model_(m)  # in place: the cached fingerprint must not survive
    after = models.fingerprint(m)
    assert after != before and after == models.fingerprint(copy.deepcopy(m))
    assert quant.quantize_model_(m) is m and models.fingerprint(m) == after  # quantising again changes nothing


def test_cast_after_quantising_is_refused():
    m = quant.quantize_model_(models.random_model(layers=1)).to(torch.bfloat16)  # casts the FP8 codes too
    with pytest.raises(TypeError, match="cast it first, then quantize_model_"):
        capture.prefill(m, torch.arange(8).view(1, -1), window=2)


def test_prefill_logits_and_flowkv_on_the_fp8_model(dense_and_fp8):
    m, q, ids = dense_and_fp8
    pf = capture.prefill(q, ids, window=8)
    pf_deq = capture.prefill(dequantised_copy(q), ids, window=8)
    assert rel(pf.logits, pf_deq.logits) < 1e-5  # the FP8 model is exactly the model of its dequantised weights
    # against the original weights: a sanity bound, not a derived one. Every weight's Frobenius error is ≤ 2^-4
    # (≈ 2.5 % measured) and the prefill chains 14 of them through peaked attention; measured ≈ 6 %
    assert rel(pf.logits, capture.prefill(m, ids, window=8).logits) < 0.15
    for li in range(2):
        wo = pf.w_o(li)
        assert wo.dtype == torch.float32  # the activations' dtype, as for the dense model
        assert torch.equal(wo, pf_deq.w_o(li))
        o = attention_output(pf, li)  # the decomposition reads the same W_O
        assert rel(head_contributions(pf, li).sum(0), o) < 1e-5 and rel(o, pf.layers[li].attn_out) < 1e-5
    res = policies.get_policy("flowkv", window=8)(pf, 16)
    want = policies.get_policy("flowkv", window=8)(pf_deq, 16)
    assert res.total_kept == want.total_kept
    ok = torch.isfinite(want.scores)
    assert torch.equal(ok, torch.isfinite(res.scores)) and rel(res.scores[ok], want.scores[ok]) < 1e-5


def test_fast_decoder_on_the_fp8_model_equals_generate_decode(dense_and_fp8):
    _, q, ids = dense_and_fp8
    pf = capture.prefill(q, ids, window=8)
    res = policies.get_policy("flowkv", window=8)(pf, 16)
    ref = RaggedCache.from_prefill(pf, res, 8)
    dec = fastdecode.FastDecoder(q, fastdecode.StaticRaggedCache.from_keeps(pf, res.keep[None], None, 8),
                                 impl="torch", fuse=False, compile=False)
    for t in (5, 17, 42, 99):
        a = generate.decode(q, ref, torch.tensor([[t]]))[-1]
        assert rel(dec.step(torch.tensor([t]))[0], a) < 1e-5
    with pytest.raises(ValueError, match="fuse=True"):
        fastdecode.FastDecoder(q, fastdecode.StaticRaggedCache.from_keeps(pf, res.keep[None], None, 8), fuse=True)


def test_tensor_parallel_shard_quantised_equals_the_quantised_model(dense_and_fp8):
    m, q, ids = dense_and_fp8
    local = shard_model(m, TensorParallel.for_model(m))
    flowkv = policies.get_policy("flowkv", window=8)
    flowkv(capture.prefill(local, ids, window=8), 16)  # caches the dense shard's Gram blocks of W_O
    assert quant.quantize_model_(local) is local
    for layer, ql in zip(local.model.layers, q.model.layers, strict=True):
        for rp, qp in ((layer.self_attn.o_proj, ql.self_attn.o_proj), (layer.mlp.down_proj, ql.mlp.down_proj)):
            assert type(rp) is RowParallelLinear and rp.weight.dtype == quant.FP8  # same name and layout
            assert torch.equal(quant.dense_weight(rp), quant.dense_weight(qp))
    assert quant.weight_format(local) == quant.WEIGHT_FORMAT
    pf, lpf = capture.prefill(q, ids, window=8), capture.prefill(local, ids, window=8)
    assert rel(lpf.logits, pf.logits) < 1e-6
    res, got = flowkv(pf, 16), flowkv(lpf, 16)  # the Gram blocks of the quantised W_O, not the cached dense ones
    ok = torch.isfinite(res.scores)
    assert torch.equal(got.keep, res.keep) and rel(got.scores[ok], res.scores[ok]) < 1e-5
    with pytest.raises(ValueError, match="FP8 weights; shard the dense model"):
        shard_model(q, TensorParallel.for_model(q))


def test_flowkv_gram_cache_follows_a_replaced_weight(dense_and_fp8):
    """The Gram blocks of W_O are cached per o_proj module: a new weight tensor (as `RowParallelLinear.quantize_`
    installs) must not be mistaken for the old one, even at the same in-place version."""
    from flowkv_utils.policies.flowkv import cached_gram

    m, _, ids = dense_and_fp8
    local = shard_model(m, TensorParallel.for_model(m))
    pf = capture.prefill(local, ids, window=8)
    g0 = cached_gram(pf, 0)
    o = local.model.layers[0].self_attn.o_proj
    old = o.weight._version
    o.weight = torch.nn.Parameter(o.weight.detach() * 2, requires_grad=False)
    assert o.weight._version == old
    assert torch.allclose(cached_gram(pf, 0), 4 * g0)
