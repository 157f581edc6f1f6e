"""The batch-1 fused projection kernels (`kernels.gemv`): against the fused PyTorch step they replace (GPU), and
their launch settings and argument checks (CPU)."""

from __future__ import annotations

import pytest
import torch

from flowkv_utils import fastdecode
from flowkv_utils.kernels.gemv import GemvConfig, GemvTile, _fit
from flowkv_utils.models import random_model

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")

# (hidden, heads, kv heads, head dim, MLP width): Llama-3-8B's layer and SmolLM2-135M's (widths not powers of two)
SHAPES = [(4096, 32, 8, 128, 14336), (576, 9, 3, 64, 1536)]


def test_tiles_shrink_to_divide_and_bad_settings_name_the_value():
    assert _fit(GemvTile(rows=4, block_k=512), 64, 4096, "x") == (4, 512)
    assert _fit(GemvTile(rows=16, block_k=512), 12, 576, "x") == (4, 64)  # 576 = 9 · 64
    with pytest.raises(ValueError, match="rows=3.*power of two"):
        _fit(GemvTile(rows=3), 64, 4096, "x")
    with pytest.raises(ValueError, match="width 100 is not a multiple of 16"):
        _fit(GemvTile(), 64, 100, "x")
    with pytest.raises(ValueError, match="unknown setting.*known: qkv, o, gate_up, down"):
        GemvConfig().replace(mlp=GemvTile())
    assert GemvConfig().replace(o=GemvTile(rows=8)).o.rows == 8


def test_fast_decoder_refuses_gemv_where_it_cannot_run():
    m = random_model("llama", layers=1, heads=4, kv_heads=2, head_dim=16, vocab=64, seed=0)
    sc = fastdecode.StaticRaggedCache.from_lengths(torch.full((1, 1, 2), 5), head_dim=16, capacity=4, next_pos=5,
                                                   dtype=torch.float32)
    assert not fastdecode.FastDecoder(m, sc, impl="torch").gemv  # CPU: the default is off
    with pytest.raises(ValueError, match="gemv=True needs.*Triton kernels"):
        fastdecode.FastDecoder(m, sc, impl="torch", fuse=True, gemv=True)


def _bf16_agree(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(share of elements equal bit for bit, ‖diff‖ / ‖ref‖, max |diff| / max |ref|)."""
    got, ref = got.float(), ref.float()
    return (float((got == ref).float().mean()), float((got - ref).norm() / ref.norm()),
            float((got - ref).abs().max() / ref.abs().max()))


def _close(got: torch.Tensor, ref: torch.Tensor, same_at_least: float) -> None:
    """Within bf16 rounding of the reference: ≥ same_at_least of the elements bit for bit, the rest a few bf16
    steps (2⁻⁸ relative) off."""
    same, rel, worst = _bf16_agree(got, ref)
    assert same >= same_at_least and rel < 4e-3 and worst < 2e-2, (same, rel, worst)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("D,H,G,d,inter", SHAPES)
def test_kernels_match_the_fused_pytorch_step(D, H, G, d, inter):
    """Each kernel against the PyTorch functions of the fused step it replaces (eager, bf16). The products differ
    only in the order of their float32 sums, so almost every output is the same bf16 number; after an RMSNorm the
    statistic's own rounding (a different sum order, Triton's rsqrt) moves some normalised inputs by one bf16 step,
    so fewer outputs agree bit for bit, and none is more than a few bf16 steps off."""
    from flowkv_utils.kernels import gemv

    torch.manual_seed(0)
    dev, dt, eps = "cuda", torch.bfloat16, 1e-5
    rnd = lambda *s, scale=1.0: (torch.randn(*s, device=dev) * scale).to(dt)
    h = rnd(1, 1, D)
    ln1, ln2 = rnd(D, scale=0.3) + 1, rnd(D, scale=0.3) + 1
    w_qkv, w_o = rnd((H + 2 * G) * d, D, scale=D ** -0.5), rnd(D, H * d, scale=(H * d) ** -0.5)
    w_gu, w_down = rnd(2 * inter, D, scale=D ** -0.5), rnd(D, inter, scale=inter ** -0.5)
    ang = torch.rand(d // 2, device=dev) * 6
    cos, sin = torch.cat([ang.cos()] * 2).to(dt).view(1, 1, d), torch.cat([ang.sin()] * 2).to(dt).view(1, 1, d)
    used = torch.tensor([3], device=dev)
    tk, tv = rnd(G, 8, d), rnd(G, 8, d)
    rk, rv = tk.clone(), tv.clone()
    q_ref = fastdecode.fused_pre_attention(h, ln1, eps, w_qkv, cos, sin, rk, rv, used, H, G, d)
    q = gemv.qkv_rope(h, ln1, eps, w_qkv, cos, sin, tk, tv, used, H, G, d, torch.empty_like(q_ref))
    for got, ref in ((q, q_ref), (tk[:, 3], rk[:, 3]), (tv[:, 3], rv[:, 3])):
        _close(got, ref, 0.5)
    assert torch.equal(tk[:, :3], rk[:, :3]) and torch.equal(tk[:, 4:], rk[:, 4:])  # only slot `used` written

    o = rnd(G, H // G, d)
    h2_ref = h + torch.nn.functional.linear(o.reshape(1, 1, -1), w_o)
    _close(gemv.residual(o, w_o, h, torch.empty_like(h)), h2_ref, 0.95)

    g, u = torch.nn.functional.linear(fastdecode._rms(h2_ref, ln2, eps), w_gu).split([inter, inter], dim=-1)
    act_ref = torch.nn.functional.silu(g) * u
    act = gemv.gate_up_silu(h2_ref, ln2, eps, w_gu, torch.empty(inter, dtype=dt, device=dev))
    _close(act, act_ref, 0.5)

    out_ref = h2_ref + torch.nn.functional.linear(act_ref.view(1, 1, -1), w_down)
    out = h2_ref.clone()
    gemv.residual(act_ref, w_down, out, out)  # in place: out = h + W x
    _close(out, out_ref, 0.95)


@gpu
@pytest.mark.gpu
def test_fast_decoder_gemv_step_matches_the_fused_step():
    """A 2-layer bf16 model (real head geometry) at batch 1: the four-kernel layers, captured as one CUDA graph,
    give the logits and greedy tokens of the fused PyTorch step; batch 2 keeps the fused step."""
    m = random_model("llama", layers=2, heads=8, kv_heads=2, head_dim=128, hidden=1024, vocab=512,
                     dtype=torch.bfloat16, device="cuda")
    lengths = torch.tensor([[[40, 300]], [[129, 7]]])  # (L=2, B=1, G=2)
    make = lambda: fastdecode.StaticRaggedCache.from_lengths(lengths, head_dim=128, capacity=8, next_pos=400,
                                                             dtype=torch.bfloat16, device="cuda", seed=2)
    ref = fastdecode.FastDecoder(m, make(), gemv=False, compile=False)
    fast = fastdecode.FastDecoder(m, make())
    assert fast.gemv and fast.label.endswith("+gemv") and not ref.gemv
    fast.capture()
    ids = torch.tensor([5], device="cuda")
    for _ in range(5):
        a, b = ref.step(ids), fast.step(ids)
        assert float((b.float() - a.float()).norm() / a.float().norm()) < 2e-2
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        ids = a.argmax(-1)
    two = fastdecode.StaticRaggedCache.from_lengths(lengths.expand(2, 2, 2).contiguous(), head_dim=128,
                                                    capacity=8, next_pos=400, dtype=torch.bfloat16, device="cuda")
    assert not fastdecode.FastDecoder(m, two).gemv
