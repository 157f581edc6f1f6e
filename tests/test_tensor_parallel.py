"""Tensor parallelism over KV heads (`tensor_parallel`, `sharded_policies`) on the CPU with gloo: for every registered
policy the ranks' keep-sets, concatenated over heads, equal the unsharded keep-set exactly (a fraction and a token
budget); sharded decode logits equal the unsharded ones; N not dividing the KV heads is a clear error; the exact
distributed top-k's merge equals one top-k (ties to the earlier index); compressing layer by layer while prefilling
the shard (`LayerwiseCompressor(tp=...)`) keeps exactly the unsharded compressor's keep-set for every streaming policy
(model-wide ones through `ShardedCascade`, also on tied scores) and decodes the same logits; and the command runs
under torchrun (one-shot and --layerwise).

The 2- and 4-process checks run in one `torch.multiprocessing.spawn` per world size (every check inside it), on a
random-weight Llama of 2 layers, 8 heads, 4 KV heads, head_dim 8."""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowkv_utils import sharded_policies as sp
from flowkv_utils.capture import prefill
from flowkv_utils.fastdecode import FastDecoder, StaticRaggedCache
from flowkv_utils.layerwise import LayerwiseCompressor, streaming_policies
from flowkv_utils.models import random_model
from flowkv_utils.policies import KVPRESS, REGISTRY, FlowKV, get_policy
from flowkv_utils.results import REPO
from flowkv_utils.selection import GlobalCascade, rank_desc
from flowkv_utils.tensor_parallel import TensorParallel, random_shard, shard_model

pytestmark = pytest.mark.usefixtures("one_thread")
WINDOW, N_TOKENS, STEPS = 8, 80, 4
BUDGETS = [0.33, 20, 0.6]  # fractions (80·0.33·8 = 211.2 → 211 entries: an uneven split over slots), a token count
# non-default settings that take other code paths (kvpress's shares of the kept count, CAKE's official budgets, ...)
VARIANTS = [*KVPRESS.items(), ("cake", {"allocation": "official"}), ("h2o", {"normalise": True}),
            ("defensivekv", {"threshold": 0.0}), ("flowkv_global", {"head_floor": 20})]
VARIANT_BUDGETS = [0.33, 0.8]  # 0.8: a safeguard of 0.2·64 > w tokens with shares="kept"
TINY = dict(layers=2, heads=8, kv_heads=4, head_dim=8, vocab=128, seed=0)


def _tiny():
    model = random_model("llama", **TINY)
    ids = torch.randint(0, TINY["vocab"], (1, N_TOKENS), generator=torch.Generator().manual_seed(1))
    return model, ids


# ------------------------------------------------------------------------------------------- in one process


def test_every_registered_policy_has_a_plan():
    assert list(sp.PLANS) == list(REGISTRY)
    local = [n for n, p in sp.PLANS.items() if p.local]
    assert local == ["fullkv", "streamingllm", "h2o", "keydiff", "snapkv", "pyramidkv", "criticalkv"]

    class Mine(FlowKV):  # not registered: no plan is guessed for it
        name = "mine"

    with pytest.raises(ValueError, match="policy 'mine' .* no tensor-parallel plan.*add it to sharded_policies.PLANS"):
        sp.ShardedPolicy(Mine(), TensorParallel(8, 4))


def test_processes_must_divide_the_kv_heads():
    with pytest.raises(ValueError, match=r"N=3 processes do not divide the G=4 KV heads.*use N in \[1, 2, 4\]"):
        TensorParallel(8, 4, rank=0, world_size=3)
    model, _ = _tiny()
    with pytest.raises(ValueError, match="N=3 processes do not divide the G=4"):
        shard_model(model, TensorParallel.for_model(model, 0, 3))
    with pytest.raises(ValueError, match="N=8 processes do not divide the G=2"):
        random_shard("tiny", TensorParallel(4, 2, 0, 8))
    pf = prefill(model, torch.arange(40).view(1, -1), window=WINDOW)  # the whole model's prefill, not a shard's
    with pytest.raises(ValueError, match="the prefill has 4 KV heads, rank 1 of 2 holds 2: prefill the rank's shard"):
        sp.ShardedPolicy(get_policy("snapkv", window=WINDOW), TensorParallel.for_model(model, 1, 2))(pf, 16)


@settings(max_examples=60, deadline=None)
@given(world=st.integers(1, 4), rows=st.integers(1, 3), per_rank=st.integers(1, 12), levels=st.integers(1, 5),
       data=st.data())
def test_merged_candidates_are_the_one_topk_with_ties_to_the_earlier_index(world, rows, per_rank, levels, data):
    """Scores of few distinct values (many ties), split into `world` contiguous blocks: each block's candidates,
    merged, give exactly `rank_desc(scores) < k` of the whole rows."""
    M = world * per_rank
    vals = data.draw(st.lists(st.integers(0, levels), min_size=rows * M, max_size=rows * M))
    scores = torch.tensor(vals, dtype=torch.float32).view(rows, M)
    k = torch.tensor(data.draw(st.lists(st.integers(0, M), min_size=rows, max_size=rows)))
    kk = min(int(k.max()), per_rank)
    if kk == 0:
        return
    cands = [sp.local_candidates(scores[:, r * per_rank:(r + 1) * per_rank], kk) for r in range(world)]
    values = torch.stack([v for v, _ in cands])
    ids = torch.stack([pos + r * per_rank for r, (_, pos) in enumerate(cands)])
    chosen = sp.choose_candidates(values, ids, k)
    got = torch.zeros(rows, M, dtype=torch.bool)
    for r in range(world):
        got.scatter_(-1, ids[r], chosen[r])
    assert torch.equal(got, rank_desc(scores) < k.view(-1, 1))


def test_one_process_is_the_unsharded_policy():
    """World size 1: the plans run without any process group and give every policy's own keep-set."""
    model, ids = _tiny()
    pf = prefill(model, ids, window=WINDOW, all_queries=True)
    tp = TensorParallel.for_model(model)
    for name in REGISTRY:
        ref, got = get_policy(name, window=WINDOW)(pf, 0.33), sp.ShardedPolicy(get_policy(name, window=WINDOW),
                                                                                tp)(pf, 0.33)
        assert torch.equal(ref.keep, got.keep), name


def test_layerwise_under_tensor_parallelism_refuses_what_it_cannot_do():
    """A compressor of rank 1 of 2 needs the rank's shard, and no keep_scores (no re-selection across ranks); a
    policy that does not stream has no layer-by-layer plan."""
    model, ids = _tiny()
    tp = TensorParallel.for_model(model, 1, 2)
    with pytest.raises(ValueError, match="the model has 4 KV heads, rank 1 of 2 holds 2: pass the rank's shard"):
        LayerwiseCompressor(model, ids, "flowkv", 0.33, window=WINDOW, tp=tp)
    local = shard_model(model, tp)
    with pytest.raises(ValueError, match="keep_scores=True under tensor parallelism"):
        LayerwiseCompressor(local, ids, "flowkv", 0.33, window=WINDOW, keep_scores=True, tp=tp)
    with pytest.raises(ValueError, match="policy 'cake' cannot compress layer by layer: allowed are"):
        LayerwiseCompressor(local, ids, "cake", 0.33, window=WINDOW, tp=tp)
    one = TensorParallel.for_model(model)
    pf = prefill(model, ids, window=WINDOW)
    cake = get_policy("cake", window=WINDOW)
    b = cake.budget_for(pf.n, 2, 4, 0.33)
    with pytest.raises(ValueError, match=r"cake selects every layer at once \(streams = False\)"):
        sp.PLANS["cake"].select(cake, pf, b, one, [0])


# --------------------------------------------------------------------------- 2 and 4 processes (gloo, spawn)


def _layerwise_checks(model, local, ids, tp, gathered) -> tuple[dict, list]:
    """Compression layer by layer while prefilling the shard (`LayerwiseCompressor(tp=...)`, chunked prefill) for every
    streaming policy: {policy: entries differing from the unsharded compressor's keep-set (whose equality with the
    one-shot selection test_layerwise checks)}, also the counts of policies computed alongside; and the decode
    logits' differences after four of them."""
    wrong, steps = {}, []
    for k in (5, 37, 500):  # the cascade itself, on scores of few values (ties go to the earlier (layer, head, token))
        full = torch.randint(0, 4, (3, tp.kv_heads, 20), generator=torch.Generator().manual_seed(k)).float()
        one, mine = GlobalCascade(k), sp.ShardedCascade(k, tp)
        for li, s in enumerate(full):
            one.add(li, s)
            mine.add(li, s[tp.kv_start: tp.kv_start + tp.local_kv_heads])
        got = torch.stack([mine.keep_mask(li) for li in range(3)])
        wrong[f"cascade k={k}"] = int((gathered(got) != torch.stack([one.keep_mask(li) for li in range(3)])).sum())
    for name in streaming_policies():
        also = ("flowkv", "flowkv_global") if name == "snapkv" else ()
        ref = LayerwiseCompressor(model, ids, name, BUDGETS[0], window=WINDOW, also=also)
        ref_pf = prefill(model, ids, window=WINDOW, chunk=32, on_layer=ref, keep_kv=False, **ref.prefill_options)
        got = LayerwiseCompressor(local, ids, name, BUDGETS[0], window=WINDOW, also=also, tp=tp)
        prefill(local, ids, window=WINDOW, chunk=32, on_layer=got, keep_kv=False, **got.prefill_options)
        ref.finish_counts()
        got.finish_counts()
        wrong[name] = int((gathered(got.keep_mask()) != ref.keep_mask()).sum())
        for other in also:
            wrong[f"{name}+{other}"] = int((gathered(got.counts[other]) != ref.counts[other]).sum())
        if name in ("snapkv", "adakv", "flowkv", "flowkv_global"):
            dec_ref = FastDecoder(model, StaticRaggedCache.from_ragged([ref.cache(STEPS)], STEPS), impl="torch",
                                  fuse=False, compile=False)
            dec = FastDecoder(local, StaticRaggedCache.from_ragged([got.cache(STEPS)], STEPS), impl="torch",
                              fuse=False, compile=False)
            tok = ref_pf.logits.argmax().view(1)
            for _ in range(STEPS):
                a, b = dec_ref.step(tok), dec.step(tok)
                steps.append(float((a - b).abs().max()))
                tok = a.argmax(-1)
    return wrong, steps


def _worker(rank: int, world: int, out: str) -> None:
    """One rank: every policy × budget sharded vs unsharded, then decode; writes what it found to out/rank<r>.json."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world,
                            timeout=_dt.timedelta(seconds=120))
    model, ids = _tiny()
    tp = TensorParallel.for_model(model, rank, world)
    local = shard_model(model, tp)
    pf = prefill(model, ids, window=WINDOW, all_queries=True)
    lpf = prefill(local, ids, window=WINDOW, all_queries=True)
    found = {"prefill_logits": float((pf.logits - lpf.logits).abs().max()), "keep": {}, "values": {}}

    def gathered(x):  # (L, G/N, ...) of every rank → (L, G, ...): the test's reference only, never the library's
        return tp.all_gather(x).transpose(0, 1).flatten(1, 2)

    kept = {}
    for name in REGISTRY:
        for budget in BUDGETS:
            ref = get_policy(name, window=WINDOW)(pf, budget)
            got = sp.ShardedPolicy(get_policy(name, window=WINDOW), tp)(lpf, budget)
            whole = gathered(got.keep)
            found["keep"][f"{name}@{budget}"] = int((whole != ref.keep).sum())
            if ref.values is not None:
                v = gathered(torch.stack(got.values))
                found["values"][f"{name}@{budget}"] = float((v - torch.stack(ref.values)).abs().max())
            kept[name, budget] = (ref, got)
    for name, params in VARIANTS:
        for budget in VARIANT_BUDGETS:
            ref = get_policy(name, window=WINDOW, **params)(pf, budget)
            got = sp.ShardedPolicy(get_policy(name, window=WINDOW, **params), tp)(lpf, budget)
            found["keep"][f"{name}{params}@{budget}"] = int((gathered(got.keep) != ref.keep).sum())
    steps = []
    for name in ("flowkv", "flowkv_global", "snapkv"):
        ref, got = kept[name, BUDGETS[0]]
        dec_ref = FastDecoder(model, StaticRaggedCache.from_keeps(pf, ref.keep[None], None, STEPS), impl="torch",
                              fuse=False, compile=False)
        dec = FastDecoder(local, StaticRaggedCache.from_keeps(lpf, got.keep[None], None, STEPS), impl="torch",
                          fuse=False, compile=False)
        tok = pf.logits.argmax().view(1)
        for _ in range(STEPS):  # greedy on the unsharded logits; both decoders are fed the same token
            a, b = dec_ref.step(tok), dec.step(tok)
            steps.append(float((a - b).abs().max()))
            tok = a.argmax(-1)
    found["decode_logits"] = steps
    found["layerwise"], found["layerwise_decode"] = _layerwise_checks(model, local, ids, tp, gathered)
    found["kept_bytes"] = StaticRaggedCache.from_keeps(lpf, kept["flowkv", BUDGETS[0]][1].keep[None], None,
                                                       1).kept_bytes()
    Path(out, f"rank{rank}.json").write_text(json.dumps(found))
    dist.barrier()  # every rank done with the group before any tears it down (gloo can abort otherwise)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_keep_sets_and_decode_equal_the_unsharded_model(world, tmp_path):
    torch.multiprocessing.spawn(_worker, args=(world, str(tmp_path)), nprocs=world, join=True)  # a file rendezvous
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for r, found in enumerate(ranks):
        assert found["prefill_logits"] < 1e-4, (r, found["prefill_logits"])
        assert len(found["keep"]) == len(REGISTRY) * len(BUDGETS) + len(VARIANTS) * len(VARIANT_BUDGETS)
        wrong = {k: v for k, v in found["keep"].items() if v}
        assert not wrong, f"rank {r}/{world}: entries differing from the unsharded keep-set: {wrong}"
        assert found["values"] and max(found["values"].values()) < 1e-5, found["values"]  # SmoothEvict's merge
        assert max(found["decode_logits"]) < 1e-4, found["decode_logits"]
        lw = found["layerwise"]
        assert set(lw) >= {"snapkv", "adakv", "flowkv", "flowkv_global", "snapkv+flowkv_global", "cascade k=37"}, lw
        assert not any(lw.values()), f"rank {r}/{world}: layer-wise keep-sets differing: {lw}"
        assert len(found["layerwise_decode"]) == 4 * STEPS and max(found["layerwise_decode"]) < 1e-4
    assert ranks[0]["keep"] == ranks[-1]["keep"]
    entries = round(N_TOKENS * BUDGETS[0] * TINY["layers"] * TINY["kv_heads"])  # the budget's model total
    kept = [found["kept_bytes"] for found in ranks]
    assert sum(kept) == entries * 2 * TINY["head_dim"] * 4  # K and V, float32: each rank holds only its own heads
    assert max(kept) < sum(kept)


# ------------------------------------------------------------------------------------------ the command line


@pytest.mark.parametrize("extra", [("--policy", "flowkv"),
                                   ("--policy", "flowkv_global", "--layerwise", "--chunk", "48", "--weights", "fp8")])
def test_command_under_torchrun_two_processes(extra):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "flowkv_utils.tensor_parallel", "--shape", "tiny", "--context", "128", "--budget",
                          "0.25", *extra, "--steps", "3", "--device", "cpu"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().split("\n")
    assert ("layer-wise compression, chunk 48" in lines[0]) == ("--layerwise" in extra), lines[0]
    assert ("layers fp8-e4m3" in lines[0]) == ("fp8" in extra), lines[0]
    assert any(line.startswith("rank 0 ") for line in lines) and any(line.startswith("rank 1 ") for line in lines)
    total = [line for line in lines if line.startswith("total")]
    assert len(total) == 1 and "2 ranks" in total[0], run.stdout
