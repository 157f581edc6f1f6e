"""Every registered policy, the layer-wise compressor, generation, the fidelity metrics and a small sweep on CUDA,
against the same on the CPU. Marked `gpu`: skipped without CUDA (CI has none); run on the lent GPU with
`python -m pytest -m gpu tests/test_gpu.py`. `test_results_stay_on_the_prefill_device` also runs on the CPU with
a fake second device check, so device mixing shows up there too where it can."""

from __future__ import annotations

import pytest
import torch

from flowkv_utils import sweep
from flowkv_utils.cache import RaggedCache
from flowkv_utils.capture import prefill
from flowkv_utils.generate import generate, teacher_forced_logits
from flowkv_utils.layerwise import LayerwiseCompressor, streaming_policies
from flowkv_utils.metrics import attention_output_errors
from flowkv_utils.models import random_model
from flowkv_utils.policies import REGISTRY, get_policy
from flowkv_utils.tasks import TaskInstance

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
pytestmark = pytest.mark.gpu


def _model(device: str, family: str = "llama"):
    """The same weights on every device (built on the CPU, then moved: CUDA's generator draws other numbers)."""
    return random_model(family, layers=3, heads=8, kv_heads=2, head_dim=16, vocab=256, seed=0).to(device)


def _ids(n: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(REGISTRY))
def test_results_stay_on_the_prefill_device(name):
    """A policy's keep mask (and shown scores, merged values) live where the prefill's K/V live."""
    m = _model("cpu")
    pf = prefill(m, _ids(), window=16, all_queries=True)
    res = get_policy(name, **({} if REGISTRY[name].role == "reference" else {"window": 16}))(pf, 0.25)
    dev = pf.layers[0].k.device
    assert res.keep.device == dev and res.keep.dtype == torch.bool
    assert res.scores is None or res.scores.device == dev
    for v in res.values or []:
        assert v.device == pf.layers[0].k.device


@gpu
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_policy_runs_on_cuda_and_matches_cpu(name, family):
    """Same keep-set on CUDA as on the CPU (float32; ties broken the same way), and a compressed generation runs."""
    kw = {} if REGISTRY[name].role == "reference" else {"window": 16}
    ids = _ids()
    cpu_m, gpu_m = _model("cpu", family), _model("cuda", family)
    r_cpu = get_policy(name, **kw)(prefill(cpu_m, ids, window=16, all_queries=True), 0.25)
    pf = prefill(gpu_m, ids, window=16, all_queries=True)
    r_gpu = get_policy(name, **kw)(pf, 0.25)
    assert r_gpu.keep.device == pf.layers[0].k.device  # nothing comes back to the host unasked
    agree = float((r_cpu.keep == r_gpu.keep.cpu()).float().mean())
    assert r_gpu.total_kept == r_cpu.total_kept and agree > 0.99, (name, agree)
    out = generate(pf, r_gpu, max_new_tokens=4)
    assert len(out) >= 1
    err = attention_output_errors(pf, r_gpu.keep, r_gpu.values)
    assert torch.isfinite(err).all()
    cont = torch.tensor(out[:2] or [1])
    assert torch.isfinite(teacher_forced_logits(pf, cont, r_gpu)).all()
    RaggedCache.from_prefill(pf, r_gpu, capacity=4)


@gpu
@pytest.mark.parametrize("name", streaming_policies())
def test_layerwise_compressor_on_cuda_equals_one_shot(name):
    m = _model("cuda")
    ids = _ids(128)
    kw = {} if REGISTRY[name].role == "reference" else {"window": 16}
    want = get_policy(name, **kw)(prefill(m, ids, window=16, all_queries=True), 0.25)
    comp = LayerwiseCompressor(m, ids.cuda(), name, 0.25, window=16)
    prefill(m, ids, window=16, on_layer=comp, keep_kv=False, **comp.prefill_options)
    assert torch.equal(comp.keep_mask().cpu(), want.keep.cpu())


@gpu
@pytest.mark.parametrize("name", ["flowkv_global", "flowkv", "snapkv"])
def test_no_hook_synchronises_on_cuda(name):
    """No op inside the layer-wise compressor's hook synchronises with the GPU (`torch.cuda.set_sync_debug_mode`
    raises on every one): the applied policy's counts travel to pinned memory and are waited for by event, one
    layer later (overlap), so Python keeps ahead of the GPU. `seconds` then times every policy from events."""
    m = random_model("llama", layers=4, heads=8, kv_heads=2, head_dim=16, vocab=256, seed=0).to("cuda")
    ids = _ids(256)
    want = get_policy(name, window=16)(prefill(m, ids, window=16), 0.25)
    comp = LayerwiseCompressor(m, ids.cuda(), name, 0.25, window=16, also=("snapkv", "flowkv", "flowkv_global"),
                               slack=0.0)

    def hook(li, cap):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return comp(li, cap)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    prefill(m, ids, window=16, on_layer=hook, keep_kv=False)
    assert torch.equal(comp.keep_mask().cpu(), want.keep.cpu())
    assert comp.repacks > 0 or name != "flowkv_global"
    assert set(comp.seconds) == set(comp.names) and all(s > 0 for s in comp.seconds.values())


@gpu
def test_small_sweep_on_cuda(tmp_path):
    m = _model("cuda")
    insts = [TaskInstance("tiny", f"i{i}", _ids(80, i), ["7"], 4, "contains") for i in range(2)]
    df = sweep.run_sweep(m, None, insts, list(REGISTRY), [24, "full"],
                         tmp_path / "gpu.csv", window=16, progress=False)
    assert len(df) and df.value.notna().all()
    assert set(df.policy) == set(REGISTRY)


FP8_GPU = CUDA and torch.cuda.get_device_capability() >= (8, 9)
fp8_gpu = pytest.mark.skipif(not FP8_GPU, reason="needs CUDA with FP8 tensor cores (compute capability ≥ 8.9)")


@fp8_gpu
@pytest.mark.parametrize("M, N, K", [(1, 28672, 8192), (4096, 1024, 8192)])
def test_fp8_scaled_mm_against_the_exact_product(M, N, K):
    """quant.fp8_linear's torch._scaled_mm path also rounds x to e4m3 per token (s_a = row amax / 448), so each
    output moves from the exact product x (q·s)ᵀ by ≤ Σ_j (2^-4 |x_j| + 2^-10 s_a) |W_ij| (the e4m3 rounding bound
    of tests/test_quant.py), plus the bf16 output's half ulp 2^-8 |y| and float32 accumulation (≤ K·2^-24 Σ|x||W|).
    Its Frobenius relative error is about that of the rounding, ≤ 2^-4 for incoherent operands (measured ≈ 2.5 %)."""
    from flowkv_utils import quant

    gen = torch.Generator(device="cuda").manual_seed(0)
    f = quant.Fp8Linear.random(N, K, std=0.02, device="cuda", generator=gen)
    x = torch.randn(M, K, device="cuda", generator=gen).to(torch.bfloat16)
    fast = quant.fp8_linear(x, f.weight, f.weight_scale, impl="scaled_mm")
    ref = quant.fp8_linear(x, f.weight, f.weight_scale, impl="reference")
    assert fast.dtype == ref.dtype == torch.bfloat16 and fast.shape == ref.shape == (M, N)
    W = quant.dequantize_rows(f.weight, f.weight_scale, torch.float64)
    xd = x.double()
    exact = xd @ W.T
    s_a = xd.abs().amax(1, keepdim=True) / 448.0
    absw = W.abs().T
    rounding = (2.0 ** -4 * xd.abs() + 2.0 ** -10 * s_a) @ absw  # e4m3 rounding of x
    bound = rounding * (1 + 2.0 ** -8) + 2.0 ** -8 * exact.abs() + K * 2.0 ** -24 * (xd.abs() @ absw)
    err = (fast.double() - exact).abs()
    assert (err <= bound).all(), float((err / bound).max())
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())
    assert rel(fast, exact) <= 2.0 ** -4, rel(fast, exact)
    assert rel(ref, exact) <= 2.0 ** -8  # the reference only rounds the weight (2^-9) and the output (2^-8) to bf16
    assert rel(fast, ref.double()) <= 2.0 ** -4 + 2.0 ** -8


@fp8_gpu
def test_fp8_fast_decoder_captures_a_cuda_graph(monkeypatch):
    """A 2-layer FP8 model of hidden 1024 decodes through torch._scaled_mm (7 projections per layer) inside one CUDA
    graph, giving the logits of the same decoder run eagerly."""
    from flowkv_utils import quant
    from flowkv_utils.fastdecode import FastDecoder, StaticRaggedCache

    m = random_model("llama", layers=2, heads=8, kv_heads=2, head_dim=128, hidden=1024, vocab=256,
                     dtype=torch.bfloat16, device="cuda")
    quant.quantize_model_(m)
    assert quant.scaled_mm_supported(torch.zeros(1, 1024, device="cuda", dtype=torch.bfloat16),
                                     m.model.layers[0].self_attn.q_proj.weight)
    lengths = torch.tensor([[[40, 7], [300, 1]], [[0, 64], [128, 129]]])  # (L=2, B=2, G=2)
    make = lambda: StaticRaggedCache.from_lengths(lengths, head_dim=128, capacity=8, next_pos=400,
                                                  dtype=torch.bfloat16, device="cuda")
    eager, graph = FastDecoder(m, make()), FastDecoder(m, make())
    assert not eager.fuse and not graph.fuse  # FP8 projections are not fusable: the modules run
    calls = []
    scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append(1) or scaled_mm(*a, **kw))
    graph.capture()
    ids = torch.tensor([3, 200], device="cuda")
    for _ in range(4):
        calls.clear()
        a = eager.step(ids)
        assert len(calls) == 2 * 7  # every projection of every layer through torch._scaled_mm
        b = graph.step(ids)
        assert torch.isfinite(a).all() and torch.allclose(b.float(), a.float(), rtol=1e-2, atol=1e-2)
        ids = a.argmax(-1)


@gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_page_decode_triton_graph_equals_the_torch_path(batch):
    """Block-sparse decode (blocksparse.PageDecode) on CUDA: the Triton kernel with in-place page tables, captured
    as one CUDA graph, gives the torch split-KV path's logits over the same pages (float32 cache: no ranking ties)."""
    from flowkv_utils.blocksparse import PageDecode
    from flowkv_utils.fastdecode import FastDecoder, StaticRaggedCache

    m = _model("cuda")
    L, G, n = 3, 2, 300
    lengths = torch.full((L, batch, G), n)

    def run(impl: str, graph: bool) -> list[torch.Tensor]:
        cache = StaticRaggedCache.from_lengths(lengths, 16, capacity=8, next_pos=n, dtype=torch.float32,
                                               device="cuda", seed=1)
        dec = FastDecoder(m, cache, impl=impl, fuse=False, sparse=PageDecode(cache, 0.1, 16, impl=impl))
        if graph:
            dec.capture()
        ids = torch.arange(batch, device="cuda") + 5
        return [dec.step(ids).clone() for _ in range(4)]

    ref, fast = run("torch", False), run("triton", True)
    for a, b in zip(ref, fast, strict=True):  # the Triton dots run in TF32 on float32 (bench's kernel check: 1e-2)
        assert float((a - b).norm() / a.norm()) < 5e-3


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_past", [None, 40])
def test_window_attention_tensor_core_path_equals_the_float32_one(dtype, n_past):
    # CUDA with half inputs: one GEMM with a float32 output (products exact, float32 sums), the causal mask on the
    # columns after n_past only; the reference is the float32 einsum path on the CPU
    from flowkv_utils.attention import window_attention

    g = torch.Generator().manual_seed(3)
    q = (torch.randn(8, 16, 64, generator=g) * 2).to(dtype)
    k = (torch.randn(2, 300, 64, generator=g) * 2).to(dtype)
    want = window_attention(q, k, 0.125, n_past)
    got = window_attention(q.cuda(), k.cuda(), 0.125, n_past)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-7)
    past = 300 - 16 if n_past is None else n_past
    assert float(got[:, 0, past + 1:].abs().max()) == 0.0  # the first window query sees no later key


@gpu
@pytest.mark.parametrize("n, k, levels", [(673126, 411238, 0), (300000, 12345, 7), (5000, 4999, 2), (64, 1, 0)])
def test_best_in_order_on_cuda_equals_the_stable_top_k(n, k, levels):
    """The cascade's merge (its threshold by a radix sort on CUDA, by `torch.kthvalue` on the CPU) keeps the CPU's
    set — sizes of a 32K Llama-3-8B merge, and inputs with only `levels` distinct values (many ties; 0: continuous)."""
    from flowkv_utils.selection import best_in_order, topk_per_row

    g = torch.Generator().manual_seed(n)
    v = torch.randint(0, levels, (n,), generator=g).float() if levels else torch.randn(n, generator=g)
    want = topk_per_row(v.view(1, -1), k)[0].nonzero().view(-1)
    got = best_in_order(v.cuda(), k)
    assert got.device.type == "cuda" and torch.equal(got.cpu(), want)


@gpu
def test_device_side_helpers_on_cuda_match_the_host_forms():
    """What the layer-wise compressor computes on the device instead of reading back: `divided` equals the division
    by the host float (CUDA multiplies by a host scalar's float32 reciprocal), and `true_positions` equals nonzero."""
    from flowkv_utils.policies.flowkv import divided
    from flowkv_utils.selection import true_positions

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1 << 20, generator=g) * torch.rand(1 << 20, generator=g).mul(30).exp()).cuda()
    for e in range(-12, 13, 2):
        d = (torch.rand((), generator=g) * 10.0 ** e).cuda()
        assert torch.equal(divided(x, d.clamp_min(1e-30)), x / max(float(d), 1e-30)), e
    mask = torch.rand(300000, generator=g) < 0.05
    got = true_positions(mask.cuda(), int(mask.sum()))
    assert got.device.type == "cuda" and torch.equal(got.cpu(), mask.nonzero().view(-1))
