"""One prefill with layer-wise compression: its time, peak memory and kept bytes, and the scoring + selection
time of every policy timed on the same layers (CPU and GPU sweeps share it)."""

from __future__ import annotations

import time

import torch

from ..cache import kept_bytes
from ..capture import prefill
from ..kernels import DEFAULT_SCORE_CONFIG, ScoreConfig
from ..layerwise import DEFAULT_SLACK, LayerwiseCompressor
from ..models import shape_of
from ..policies import REGISTRY
from ..results import Recorder
from .shapes import prompt_ids
from .tables import model_cols
from .timing import free_memory, full_kv_bytes, peak, reset_peak, sync, weight_bytes


def score_params(score_config: ScoreConfig) -> dict[str, dict]:
    """`LayerwiseCompressor(policy_params=...)` giving both FlowKV policies the score kernel's launch settings."""
    return {"flowkv_global": {"score_config": score_config}, "flowkv": {"score_config": score_config}}


def kept_lengths(comp: LayerwiseCompressor, policy: str, budget) -> torch.Tensor:
    """(L, G) kept tokens per head of `policy` at `budget` after a compressing prefill: the applied policy's own
    counts at the prefill's budget, every token for a reference policy (FullKV), else `comp.kept_counts`."""
    L, G = comp.shape.layers, comp.shape.kv_heads
    if policy == comp.main and comp.policies[policy].budget_for(comp.n, L, G, budget) == comp.budget:
        return comp.counts[policy].clone()
    if policy not in comp.policies and REGISTRY[policy].role == "reference":
        return torch.full((L, G), comp.n, dtype=torch.long)
    return comp.kept_counts(policy, budget)


def prefill_context(rec: Recorder, model, n: int, *, weights: str, policy: str = "flowkv_global",
                    budget: float | int = 0.05, also: tuple[str, ...] = ("snapkv", "flowkv"), window: int = 32,
                    chunk: int | None = 8192, tok=None, keep_scores: bool = True, slack: float = DEFAULT_SLACK,
                    score_config: ScoreConfig = DEFAULT_SCORE_CONFIG, warmup: int = 0):
    """Prefill n tokens compressing layer by layer with `policy` (scoring + selection of `also` timed on the same
    layers; FlowKV's score kernel launched with `score_config`). Records a prefill row and one scoring row per
    policy; returns the compressor (its cache, counts). warmup: identical prefills run first and not recorded, so
    the recorded one is a steady-state prefill of this length, as every decode timing is after warm-up steps (the
    first prefill at a new length also pays for what libraries choose once per shape)."""
    dev = next(model.parameters()).device
    s = shape_of(model)
    esz = next(model.parameters()).element_size()
    ids = prompt_ids(n, model.config.vocab_size, tok)
    full_kv = policy == "fullkv"
    for _ in range(warmup + 1):
        comp = None
        free_memory()
        reset_peak(dev)
        comp = LayerwiseCompressor(model, ids, policy, 1.0 if full_kv else budget, window=window,
                                   also=() if full_kv else also, keep_scores=keep_scores, slack=slack,
                                   policy_params=score_params(score_config))
        sync(dev)
        t0 = time.perf_counter()
        prefill(model, ids, window=window, chunk=chunk, on_layer=comp, keep_kv=False, **comp.prefill_options)
        sync(dev)
        total = time.perf_counter() - t0
    comp.finish_counts()
    hooks = sum(comp.seconds.values())
    pa, pr = peak(dev)
    kept = kept_bytes(comp.layers)
    alloc = sum(lay.k.untyped_storage().nbytes() + lay.v.untyped_storage().nbytes() for lay in comp.layers)
    mc = model_cols(model, weights)
    rec.add("prefill", **mc, policy=policy, budget=None if full_kv else budget, context=n, chunk=chunk,
            slack=slack if policy == "flowkv_global" else None, prefill_s=total - hooks, scoring_total_s=hooks,
            peak_alloc_bytes=pa, peak_reserved_bytes=pr, kept_bytes=kept, allocated_bytes=alloc,
            full_kv_bytes=full_kv_bytes(s, n, esz), weight_bytes=weight_bytes(model), status="ok",
            note="layer-wise compression inside prefill; prefill_s excludes the scoring hooks"
            + (f"; after {warmup} untimed prefill(s) of the same length" if warmup else ""))
    if not full_kv:
        per_token = s.kv_bytes_per_token(esz) / s.layers / s.kv_heads  # bytes of one (ℓ, g, j) entry
        for name in comp.names:
            kb = int(comp.counts[name].sum()) * per_token
            rec.add("scoring", **mc, policy=name, budget=budget, context=n,
                    slack=slack if name == policy == "flowkv_global" else None, scoring_s=comp.seconds[name],
                    prefill_s=total - hooks, fraction=comp.seconds[name] / (total - hooks), kept_bytes=kb,
                    allocated_bytes=alloc if name == policy else None,
                    alloc_over_kept=alloc / kept if name == policy and kept else None)
    return comp
