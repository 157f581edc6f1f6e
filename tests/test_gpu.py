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
def test_small_sweep_on_cuda(tmp_path):
    m = _model("cuda")
    insts = [TaskInstance("tiny", f"i{i}", _ids(80, i), ["7"], 4, "contains") for i in range(2)]
    df = sweep.run_sweep(m, None, insts, list(REGISTRY), [24, "full"],
                         tmp_path / "gpu.csv", window=16, progress=False)
    assert len(df) and df.value.notna().all()
    assert set(df.policy) == set(REGISTRY)
