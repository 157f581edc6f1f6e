"""The sweep's fast path (`evaluate.batched_decode`: all points of an instance decoded as one batch over the
ragged caches) against the reference path (one point at a time): the same greedy answers and the same fidelity
values within tolerance, on random-weight models of two families and on the real embedded model."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from flowkv_utils import sweep
from flowkv_utils.capture import prefill
from flowkv_utils.evaluate import batched_decode
from flowkv_utils.generate import generate, teacher_forced_logits
from flowkv_utils.models import chat_ids, random_model
from flowkv_utils.policies import STUDY, get_policy
from flowkv_utils.tasks import TaskInstance

pytestmark = pytest.mark.usefixtures("one_thread")


def _compare(fast: pd.DataFrame, ref: pd.DataFrame) -> None:
    key = sweep.KEY
    a = fast.drop(columns=sweep.TIMING).sort_values(key).reset_index(drop=True)
    b = ref.drop(columns=sweep.TIMING).sort_values(key).reset_index(drop=True)
    assert (a.prediction == b.prediction).all(), "greedy answers differ between the fast and the reference path"
    pd.testing.assert_frame_equal(a.drop(columns=["value"]), b.drop(columns=["value"]))
    assert torch.allclose(torch.tensor(a.value.values), torch.tensor(b.value.values), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fast_sweep_equals_reference_sweep(family, tmp_path):
    m = random_model(family, layers=2, heads=4, kv_heads=2, head_dim=8, vocab=128, seed=0)
    g = torch.Generator().manual_seed(0)
    insts = [TaskInstance("t", f"i{i}", torch.randint(0, 128, (1, 48 + 8 * i), generator=g), ["5"], 6, "contains")
             for i in range(2)]
    args = (m, None, insts, STUDY, [12, 24, "full"])
    ref = sweep.run_sweep(*args, tmp_path / "ref.csv", window=8, progress=False, fast=False)
    fast = sweep.run_sweep(*args, tmp_path / "fast.csv", window=8, progress=False, fast=True)
    _compare(fast, ref)


@pytest.mark.model
def test_fast_path_on_the_embedded_model(embedded):
    """Real weights, a real prompt: each policy's batched answer and teacher-forced logits equal its own decode."""
    model, tok = embedded
    from conftest import PROMPT

    pf = prefill(model, chat_ids(tok, PROMPT), window=32)
    names = ["snapkv", "adakv", "flowkv", "flowkv_global", "smoothevict", "streamingllm"]
    results = [None] + [get_policy(p, window=32)(pf, 64) for p in names]
    out = batched_decode(pf, results, 12, tok, kl_tokens=6)
    for r, ans, lg in zip(results, out.answers, out.logits, strict=True):
        assert ans == generate(pf, r, 12, tok)
        want = teacher_forced_logits(pf, out.continuation, r)
        assert float((lg - want).norm() / want.norm()) < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_caches_packed_from_keeps_equal_the_ragged_caches(family):
    """`StaticRaggedCache.from_keeps` (one gather per layer) packs exactly what `from_ragged` of the points'
    own RaggedCaches packs, merged values included; the batched fidelity equals the per-point one."""
    from flowkv_utils.cache import RaggedCache
    from flowkv_utils.evaluate import stack_keeps
    from flowkv_utils.fastdecode import StaticRaggedCache
    from flowkv_utils.metrics import attention_output_errors, attention_output_errors_batch, window_output

    m = random_model(family, layers=2, heads=4, kv_heads=2, head_dim=8, vocab=128, seed=1)
    pf = prefill(m, torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(1)), window=8)
    results = [None] + [get_policy(p, window=8)(pf, b) for p in ("snapkv", "smoothevict", "flowkv_global")
                        for b in (16, 0.5)]
    a = StaticRaggedCache.from_keeps(pf, stack_keeps(pf, results), [None if r is None else r.values for r in results], 4)
    b = StaticRaggedCache.from_ragged([RaggedCache.from_prefill(pf, r, capacity=0) for r in results], 4)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert torch.equal(x.offsets, y.offsets) and torch.equal(x.k, y.k) and torch.equal(x.v, y.v)
    comp = [r for r in results if r is not None]
    got = attention_output_errors_batch(pf, torch.stack([r.keep for r in comp]), [r.values for r in comp],
                                        max_bytes=1)  # one point per chunk and all at once agree
    assert torch.allclose(got, attention_output_errors_batch(pf, torch.stack([r.keep for r in comp]),
                                                             [r.values for r in comp]), rtol=1e-6, atol=1e-7)
    for row, r in zip(got, comp, strict=True):
        single = []
        for li in range(2):  # the definition, one layer at a time
            full = window_output(pf, li)
            kept = window_output(pf, li, r.keep[li], None if r.values is None else r.values[li])
            single.append((kept - full).norm() / full.norm())
        assert torch.allclose(row, torch.stack(single), rtol=1e-5, atol=1e-7)
        assert torch.allclose(row, attention_output_errors(pf, r.keep, r.values), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_question_agnostic_fast_sweep_equals_reference_sweep(family, tmp_path):
    """Question-agnostic: the context alone is prefilled and compressed, the question fed after it; the batched
    path and the one-point-at-a-time path agree, and the settings say which mode a row comes from."""
    m = random_model(family, layers=2, heads=4, kv_heads=2, head_dim=8, vocab=128, seed=1)
    g = torch.Generator().manual_seed(1)
    insts = [TaskInstance("t", f"i{i}", torch.randint(0, 128, (1, 64 + 8 * i), generator=g), ["5"], 6, "contains",
                          question_at=50 + 4 * i) for i in range(2)]
    args = (m, None, insts, STUDY, [12, 24, "full"])
    ref = sweep.run_sweep(*args, tmp_path / "ref.csv", window=8, progress=False, fast=False, question="agnostic")
    fast = sweep.run_sweep(*args, tmp_path / "fast.csv", window=8, progress=False, fast=True, question="agnostic")
    _compare(fast, ref)
    assert (ref.settings.str.contains('"question": "agnostic"')).all()
    assert sorted(set(ref.context_tokens)) == [50, 54]  # the compressed context's length
    aware = sweep.run_sweep(*args, tmp_path / "ref.csv", window=8, progress=False, fast=False)
    assert not aware.settings.str.contains("question").any() and len(sweep.load_results(tmp_path / "ref.csv")) == \
        len(ref) + len(aware)  # one table holds both runs side by side, under different settings


def test_the_question_fed_after_a_full_cache_is_the_full_prompt(tmp_path):
    """With nothing evicted, prefilling the context and feeding the question over the cache is the same computation
    as prefilling the whole prompt: the same logits (float32 rounding) and the same greedy answer."""
    m = random_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8, vocab=128, seed=2)
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(2))
    whole, ctx = prefill(m, ids, window=8), prefill(m, ids[:, :55], window=8)
    cont = torch.tensor([3, 9, 4])
    torch.testing.assert_close(teacher_forced_logits(ctx, cont, None, prefix=ids[0, 55:]),
                               teacher_forced_logits(whole, cont, None), rtol=1e-4, atol=1e-5)
    assert generate(ctx, None, 8, None, prefix=ids[0, 55:]) == generate(whole, None, 8, None)
    out = batched_decode(ctx, [None], 8, None, prefix=ids[0, 55:])
    assert out.answers[0] == generate(whole, None, 8, None)


def test_question_agnostic_needs_the_question_position(tmp_path):
    m = random_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8, vocab=128, seed=0)
    inst = TaskInstance("t", "i", torch.randint(0, 128, (1, 40)), ["5"], 4, "contains")
    with pytest.raises(ValueError, match="does not say"):
        sweep.run_sweep(m, None, [inst], ["snapkv"], [12], tmp_path / "x.csv", window=8, progress=False,
                        question="agnostic")
    with pytest.raises(ValueError, match="question='both'"):
        sweep.run_sweep(m, None, [inst], ["snapkv"], [12], tmp_path / "x.csv", window=8, progress=False,
                        question="both")
