"""prefill(): our own layer loop must reproduce the Hugging Face forward, and capture the right tensors."""

from __future__ import annotations

import pytest
import torch

from flowkv_utils.attention import attention_column_sums
from flowkv_utils.capture import prefill
from flowkv_utils.models import random_model, shape_of

# random-weight models of every supported family, with GQA; qwen2 has q/k/v biases, llama+bias an o_proj bias too
FAMILIES = [
    ("llama", dict(heads=4, kv_heads=2)),
    ("llama", dict(heads=4, kv_heads=1, bias=True)),
    ("mistral", dict(heads=4, kv_heads=2)),
    ("qwen2", dict(heads=6, kv_heads=2)),
    ("qwen3", dict(heads=4, kv_heads=2)),
]
FAMILY_IDS = [f"{f}-H{kw['heads']}G{kw['kv_heads']}{'-bias' if kw.get('bias') else ''}" for f, kw in FAMILIES]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module", params=FAMILIES, ids=FAMILY_IDS)
def family_model(request):
    family, kw = request.param
    return random_model(family, layers=2, head_dim=16, vocab=128, seed=1, **kw)


def test_random_families_have_their_features(family_model):
    attn = family_model.model.layers[0].self_attn
    name = family_model.config.model_type
    if name == "qwen2":
        assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    if name == "qwen3":
        assert getattr(attn, "q_norm", None) is not None
    s = shape_of(family_model)
    assert s.heads > s.kv_heads, "GQA"


def test_logits_match_hf_forward_embedded(embedded, small_prefill):
    model, _ = embedded
    with torch.no_grad():
        want = model(small_prefill.input_ids).logits[0, -1].float()
    assert rel(small_prefill.logits, want) < 1e-4
    assert int(small_prefill.logits.argmax()) == int(want.argmax())


def test_logits_match_hf_forward_random(family_model):
    ids = torch.randint(0, 128, (1, 57), generator=torch.Generator().manual_seed(0))
    pf = prefill(family_model, ids, window=8)
    with torch.no_grad():
        want = family_model(ids).logits[0, -1].float()
    assert rel(pf.logits, want) < 1e-5


def test_attn_out_is_the_models_o_proj_output(family_model):
    """The captured attention-block output equals what HF's o_proj produces in its own forward."""
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    seen = {}
    hooks = [layer.self_attn.o_proj.register_forward_hook(lambda m, i, o, li=li: seen.__setitem__(li, o[0].detach()))
             for li, layer in enumerate(family_model.model.layers)]
    try:
        with torch.no_grad():
            family_model(ids)
    finally:
        for h in hooks:
            h.remove()
    pf = prefill(family_model, ids, window=8)
    for li, cap in enumerate(pf.layers):
        assert rel(cap.attn_out, seen[li][-8:]) < 1e-5


def test_capture_shapes(small_prefill):
    pf, s = small_prefill, small_prefill.shape
    w, n = pf.window, pf.n
    for cap in pf.layers:
        assert cap.q.shape == (s.heads, w, s.head_dim)
        assert cap.k.shape == cap.v.shape == (s.kv_heads, n, s.head_dim)
        assert cap.attn_out.shape == cap.resid.shape == (w, s.hidden)
    A = pf.attn(0)
    assert A.shape == (s.heads, w, n) and A.dtype == torch.float32
    torch.testing.assert_close(A.sum(-1), torch.ones(s.heads, w))
    assert pf.w_o(0).shape == (s.heads, s.head_dim, s.hidden)


def test_chunked_prefill_equals_unchunked(family_model):
    ids = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(3))
    a, b = prefill(family_model, ids, window=8), prefill(family_model, ids, window=8, chunk=7)
    assert rel(b.logits, a.logits) < 1e-5
    for ca, cb in zip(a.layers, b.layers, strict=True):
        assert rel(cb.attn_out, ca.attn_out) < 1e-5 and rel(cb.k, ca.k) < 1e-6


def test_on_layer_called_in_order_and_may_replace(family_model):
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(4))
    order = []

    def hook(li, cap):
        order.append(li)
        cap.k = cap.k[:, :5]  # a replacement capture is stored as returned
        return cap

    pf = prefill(family_model, ids, window=4, on_layer=hook)
    assert order == list(range(len(family_model.model.layers)))
    assert all(c.k.shape[1] == 5 for c in pf.layers)


@pytest.mark.parametrize("window", [0, 21])
def test_window_out_of_range(family_model, window):
    ids = torch.randint(0, 128, (1, 20))
    with pytest.raises(ValueError, match=f"window={window}"):
        prefill(family_model, ids, window=window)


def test_all_queries_and_their_column_sums(family_model):
    """all_queries keeps every prompt query (its last w rows are the window's); Prefill.column_sums equals the column
    sums of the full causal attention of a prefill whose window is the whole prompt, whatever the block size."""
    ids = torch.randint(0, 128, (1, 45), generator=torch.Generator().manual_seed(5))
    pf = prefill(family_model, ids, window=6, all_queries=True)
    whole = prefill(family_model, ids, window=45)  # every query captured as the "window": A is (H, n, n)
    s = pf.shape
    for li, cap in enumerate(pf.layers):
        assert cap.queries.shape == (s.heads, 45, s.head_dim)
        torch.testing.assert_close(cap.queries[:, -6:], cap.q, rtol=0, atol=0)
        want = whole.attn(li).sum(dim=1)  # (H, n): Σ over all query rows
        torch.testing.assert_close(pf.column_sums(li), want, rtol=1e-5, atol=1e-5)
        for blocks in (1, 7, 10**9):  # max_elements: one row per block, a few rows, everything at once
            got = attention_column_sums(cap.queries, cap.k, cap.scaling, max_elements=blocks)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert prefill(family_model, ids, window=6, all_queries=True, keep_kv=False).layers[0].queries is None


def test_column_sums_need_all_queries(family_model):
    pf = prefill(family_model, torch.randint(0, 128, (1, 20)), window=4)
    assert pf.layers[0].queries is None
    with pytest.raises(ValueError, match=r"all_queries=True"):
        pf.column_sums(0)
