"""The compressed (ragged) cache and decoding from it: equal to FullKV / Hugging Face when nothing is evicted,
equal to dense masked attention when something is, bytes that really shrink, RoPE positions that continue at n,
and every policy generating text on the embedded model."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from flowkv_utils.cache import RaggedCache, offsets_of, pack_layer, pack_positions, take_rows
from flowkv_utils.capture import prefill
from flowkv_utils.generate import decode, generate, teacher_forced_logits
from flowkv_utils.models import random_model
from flowkv_utils.policies import REGISTRY, get_policy, prefill_options
from flowkv_utils.policies.smoothevict import merge_values
from flowkv_utils.selection import true_positions

# (family, layers, heads, kv_heads, head_dim, seed): GQA, MHA + q/k norms, biases with r = 3, MQA
FAMILIES = [("llama", 2, 4, 2, 8, 1), ("mistral", 3, 4, 1, 8, 2), ("qwen2", 2, 6, 2, 8, 3), ("qwen3", 2, 4, 4, 8, 4)]
VOCAB = 128


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(family, L, H, G, d, seed):
    return random_model(family, layers=L, heads=H, kv_heads=G, head_dim=d, vocab=VOCAB, seed=seed)


def ids_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, ids: torch.Tensor, new: int) -> list[int]:
    """HF greedy decoding, never stopping early; an explicit all-ones mask (else a prompt token equal to the pad
    id would be masked out)."""
    gc = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("cfg", FAMILIES, ids=lambda c: c[0])
def test_fullkv_generate_equals_hf_generate(cfg):
    model = tiny(*cfg)
    ids = ids_of(40, cfg[-1])
    pf = prefill(model, ids, window=4)
    assert generate(pf, None, max_new_tokens=12) == hf_greedy(model, ids, 12)


@pytest.mark.parametrize("cfg", FAMILIES, ids=lambda c: c[0])
def test_decode_logits_equal_hf_forward(cfg):
    """Teacher-forced logits from the full ragged cache == one HF forward over prompt + continuation; this also
    pins the RoPE positions of new tokens to n, n + 1, ..."""
    model = tiny(*cfg)
    ids = ids_of(50, cfg[-1])
    cont = ids_of(6, 99)
    pf = prefill(model, ids[:, :44], window=4)
    got = teacher_forced_logits(pf, torch.cat([ids[:, 44:], cont], 1)[0])
    with torch.no_grad():
        want = model(torch.cat([ids, cont], 1)).logits[0, 43:].float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [n for n in REGISTRY if n != "fullkv"])
def test_nothing_evicted_decodes_like_fullkv(name):
    """A policy whose budget keeps everything gives the same cache and the same logits as FullKV, exactly."""
    model = tiny(*FAMILIES[0])
    pf = prefill(model, ids_of(30), window=8)
    res = get_policy(name, window=8)(pf, pf.n)
    assert res.keep.all()
    cont = ids_of(5, 7)
    a = teacher_forced_logits(pf, cont[0], res)
    b = teacher_forced_logits(pf, cont[0], None)
    assert torch.equal(a, b)


def test_smoothevict_merge_with_nothing_evicted_is_identity():
    model = tiny(*FAMILIES[2])
    pf = prefill(model, ids_of(30), window=8)
    c = pf.layers[0]
    keep = torch.ones(c.k.shape[:2], dtype=torch.bool)
    mass = torch.rand(c.k.shape[:2])
    assert torch.equal(merge_values(c.k, c.v, keep, mass), c.v)
    res = get_policy("smoothevict", window=8)(pf, 1.0)
    assert res.values is None and res.keep.all()  # FullKV's result exactly: no replacement values


@pytest.mark.parametrize("name", ["snapkv", "adakv", "flowkv_global", "smoothevict", "pyramidkv"])
def test_compressed_decode_equals_dense_masked_attention(name):
    """Decoding over the packed ragged cache == dense attention over the full K/V with evicted entries masked
    (per KV head), plus the decoded tokens — checks packing, offsets, values and the causal tail."""
    model = tiny(*FAMILIES[2])
    pf = prefill(model, ids_of(60, 3), window=8)
    res = get_policy(name, window=8)(pf, 20)
    cont = ids_of(4, 11)

    def dense(cache, layer, q, T, scaling):
        c = pf.layers[layer]
        lay = cache.layers[layer]
        G, n, _ = c.k.shape
        r = q.shape[0] // G
        v_full = c.v if res.values is None else res.values[layer]
        end = cache.used + T
        keys = torch.cat([c.k, lay.tail_k[:, :end]], 1).float()  # (G, n + end, d)
        vals = torch.cat([v_full, lay.tail_v[:, :end]], 1).float()
        visible = torch.cat([res.keep[layer].unsqueeze(1).expand(G, T, n),
                             (torch.arange(end) <= cache.used + torch.arange(T)[:, None]).expand(G, T, end)], -1)
        logits = torch.einsum("grtd,gnd->grtn", q.float().view(G, r, T, -1), keys) * scaling
        logits = logits.masked_fill(~visible.unsqueeze(1), float("-inf"))
        return torch.einsum("grtn,gnd->grtd", torch.softmax(logits, -1), vals).reshape(q.shape).to(q.dtype)

    got = decode(model, RaggedCache.from_prefill(pf, res, capacity=2), cont)  # capacity 2 < 4 also exercises tail growth
    want = decode(model, RaggedCache.from_prefill(pf, res, capacity=2), cont, attend=dense)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    full = decode(model, RaggedCache.from_prefill(pf, None), cont)
    assert not torch.allclose(got, full, atol=1e-6), "eviction should change something"


@pytest.mark.parametrize("name", list(REGISTRY))
def test_ragged_bytes_are_the_kept_bytes(name):
    model = tiny(*FAMILIES[0])
    pf = prefill(model, ids_of(120, 5), window=8, **prefill_options([name]))
    res = get_policy(name, window=8)(pf, 24)
    cache = RaggedCache.from_prefill(pf, res)
    L, G, d = len(pf.layers), pf.shape.kv_heads, pf.shape.head_dim
    kept = 2 * res.total_kept * d * pf.layers[0].k.element_size()
    assert cache.kept_entries() == res.total_kept and cache.kept_bytes() == kept
    assert cache.allocated_bytes() == kept + L * (G + 1) * 8  # packed K, V and the int64 offsets, no padding
    assert cache.allocated_bytes() <= 1.05 * kept
    for li, lay in enumerate(cache.layers):
        assert torch.equal(lay.lengths, res.keep[li].sum(-1))


@pytest.mark.parametrize("layout", ["head-major", "token-major"])
def test_packing_from_a_mask_its_positions_or_a_repack_gathers_the_same_rows(layout):
    """A layer packed from its keep mask, from the mask's positions, or packed first from a superset and then
    re-packed to the mask (`keep_positions`), holds the kept rows of each head in order, bit for bit, whether its
    (g, j) lie flat in memory (a chunked prefill's K/V) or not (an unchunked prefill's: a transposed projection,
    gathered without copying the layer)."""
    g = torch.Generator().manual_seed(0)
    G, n, d = 3, 40, 8
    k, v = (torch.randn(n, G, d, generator=g).transpose(0, 1) for _ in range(2))  # (G, n, d), token-major storage
    if layout == "head-major":
        k, v = k.contiguous(), v.contiguous()
    assert k.is_contiguous() == (layout == "head-major")
    keep = torch.rand(G, n, generator=g) < 0.4
    more = keep | (torch.rand(G, n, generator=g) < 0.3)
    lengths = keep.sum(-1)
    want_k = torch.cat([k[h][keep[h]] for h in range(G)])
    want_v = torch.cat([v[h][keep[h]] for h in range(G)])
    from_mask = pack_layer(k, v, keep, capacity=2)
    from_pos = pack_positions(k, v, true_positions(keep.reshape(-1), int(lengths.sum())), lengths.tolist(), 2)
    repacked = pack_layer(k, v, more)
    rows = keep[more]  # which of the superset's packed rows (head-major, in order) the mask keeps
    repacked.keep_positions(true_positions(rows, int(rows.sum())), lengths)
    for lay in (from_mask, from_pos, repacked):
        assert torch.equal(lay.k, want_k) and torch.equal(lay.v, want_v)
        assert torch.equal(lay.offsets, offsets_of(lengths)) and torch.equal(lay.lengths, lengths)
    assert from_mask.tail_k.shape == from_pos.tail_v.shape == (G, 2, d)
    pos = torch.tensor([5, 0, 7])
    assert all(torch.equal(a, b) for a, b in zip(take_rows(pos, want_k, k), (want_k[pos], k.reshape(-1, d)[pos]),
                                                 strict=True))


def test_offsets_from_lengths_of_every_form():
    """`offsets_of`: the same int64 CPU offsets from a tensor (any shape: flattened) or from Python ints."""
    want = torch.tensor([0, 3, 3, 7, 8])
    for lengths in ([3, 0, 4, 1], (3, 0, 4, 1), torch.tensor([3, 0, 4, 1]), torch.tensor([[3, 0], [4, 1]])):
        got = offsets_of(lengths)
        assert got.dtype == torch.long and got.device.type == "cpu" and torch.equal(got, want)
    assert torch.equal(offsets_of([]), torch.zeros(1, dtype=torch.long))


def test_rope_positions_continue_at_n():
    """The cache starts at position n; decoding T tokens moves it to n + T; the key of the first new token is the
    key a longer prefill computes at position n."""
    model = tiny(*FAMILIES[3])
    ids = ids_of(33, 2)
    pf = prefill(model, ids[:, :32], window=4)
    cache = RaggedCache.from_prefill(pf, capacity=4)
    assert cache.next_pos == pf.n == 32
    decode(model, cache, ids[:, 32:])
    assert cache.next_pos == 33 and cache.used == 1
    longer = prefill(model, ids, window=4)
    for li, lay in enumerate(cache.layers):
        torch.testing.assert_close(lay.tail_k[:, 0], longer.layers[li].k[:, 32], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- embedded model
@pytest.mark.model
def test_embedded_fullkv_generate_equals_hf(embedded):
    model, tok = embedded
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    pf = prefill(model, ids, window=4)
    assert generate(pf, None, max_new_tokens=8) == hf_greedy(model, ids, 8)


@pytest.mark.model
@pytest.mark.parametrize("name", list(REGISTRY))
def test_embedded_every_policy_generates_text(embedded, small_prefill, name):
    model, tok = embedded
    res = get_policy(name)(small_prefill, 96)
    out = generate(small_prefill, res, max_new_tokens=6, tok=tok)
    text = tok.decode(out, skip_special_tokens=True)
    assert len(out) > 0 and text.strip(), f"{name}: empty generation"


# ------------------------------------------------------------------------------------------- bad input (API)
def test_bad_token_ids_and_keep_masks_are_clear_errors():
    model = random_model("llama", layers=1, heads=2, kv_heads=1, head_dim=8, vocab=32)
    with pytest.raises(TypeError, match="token ids: dtype torch.float32; must be integers"):
        prefill(model, torch.tensor([[1.0, 2.0, 3.0]]), window=1)
    with pytest.raises(ValueError, match="token id 40 is out of range: the vocabulary has ids 0..31"):
        prefill(model, torch.tensor([[1, 40, 3]]), window=1)
    pf = prefill(model, torch.tensor([[1, 2, 3, 4]]), window=1)
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        decode(model, RaggedCache.from_prefill(pf), torch.tensor([[-1]]))
    c = pf.layers[0]
    with pytest.raises(TypeError, match="dtype torch.int64; a keep mask must be a torch.bool tensor of shape"):
        pack_layer(c.k, c.v, torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(1, 3\); expected \(1, 4\)"):
        pack_layer(c.k, c.v, torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="expected a PolicyResult"):
        RaggedCache.from_prefill(pf, torch.ones(1, 1, 4, dtype=torch.bool))
    from flowkv_utils.budgets import split_evenly
    with pytest.raises(ValueError, match="parts=0; must be a positive int"):
        split_evenly(5, 0)


@pytest.mark.parametrize("cfg", FAMILIES[:2], ids=lambda c: c[0])
def test_concat_decodes_each_sequence_as_alone(cfg):
    """RaggedCache.concat of two compressed caches (prompts of different lengths): the batch's attention of each
    sequence's queries equals that sequence's own cache's, after the same decoded tokens."""
    m = tiny(*cfg)
    caches = []
    for n, seed in ((40, 1), (33, 2)):
        pf = prefill(m, ids_of(n, seed), window=4)
        caches.append(RaggedCache.from_prefill(pf, get_policy("snapkv", window=4)(pf, 12), capacity=2))
    both = RaggedCache.concat(caches, capacity=2)
    G, d = m.config.num_key_value_heads, cfg[4]
    H = m.config.num_attention_heads
    assert both.kept_entries() == sum(c.kept_entries() for c in caches) and both.next_pos == 40
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # the tails grow past their capacity
        k, v, q = (torch.randn(2, n, 1, d, generator=gen) for n in (G, G, H))
        for li in range(len(both.layers)):
            both.append(li, k.reshape(2 * G, 1, d), v.reshape(2 * G, 1, d))
            out = both.attend(li, q.reshape(2 * H, 1, d), 1, 0.3).view(2, H, 1, d)
            for b, c in enumerate(caches):
                c.append(li, k[b], v[b])
                assert torch.allclose(out[b], c.attend(li, q[b], 1, 0.3), atol=1e-6)
        for c in (both, *caches):
            c.advance(1)
    with pytest.raises(ValueError, match="empty tail"):
        RaggedCache.concat(caches)
