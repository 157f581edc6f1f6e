"""Batched decoding of many compressed caches of one prompt: the sweep's fast path.

Every (policy, budget) point of a task instance shares the prefill, so its compressed caches can decode together
as one batch over the ragged layout (`fastdecode.StaticRaggedCache` of all points' `cache.RaggedCache`s) with the
split-KV kernel and, on CUDA, one captured CUDA graph per instance: greedy answers for all points at once, then the
teacher-forced continuation (FullKV's answer) for the next-token KL, again for all points at once.

The reference path (`generate.generate`, `generate.teacher_forced_logits`: one point at a time, the per-head
reference attention) stays the definition; `tests/test_evaluate.py` checks that this path gives the same greedy
answers and the same KL within tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .capture import Prefill
from .fastdecode import FastDecoder, StaticRaggedCache
from .generate import stop_ids
from .selection import PolicyResult


@dataclass
class BatchDecode:
    """answers[b]: greedy token ids of point b (stop tokens cut); logits: (B, T + 1, vocab) float32 next-token
    logits after the prompt and after each continuation token (None without a continuation)."""

    answers: list[list[int]]
    logits: torch.Tensor | None
    continuation: torch.Tensor | None


def stack_keeps(pf: Prefill, results: list[PolicyResult | None]) -> torch.Tensor:
    """(B, L, G, n) bool keep masks of the points on the prefill's device (None: the full cache)."""
    dev = pf.layers[0].k.device
    full = torch.ones(len(pf.layers), pf.shape.kv_heads, pf.n, dtype=torch.bool, device=dev)
    return torch.stack([full if r is None else r.keep.to(dev) for r in results])


@torch.no_grad()
def batched_decode(pf: Prefill, results: list[PolicyResult | None], max_new_tokens: int, tok=None,
                   kl_tokens: int = 0, continuation: torch.Tensor | None = None, impl: str = "auto",
                   graph: bool | None = None, keeps: torch.Tensor | None = None,
                   prefix: torch.Tensor | None = None) -> BatchDecode:
    """Greedy answers (and teacher-forced logits along a continuation) of every compressed cache in one batch.

    results: one PolicyResult per point (None: the full cache). The continuation is `continuation` if given, else
    the first `kl_tokens` tokens of row 0's own answer (row 0 should then be the full cache: the sweep's KL is
    along FullKV's answer); kl_tokens = 0 and no continuation: no teacher forcing. graph: capture the step as a
    CUDA graph (default: on CUDA). keeps: `stack_keeps(pf, results)` if the caller has it already. The first
    answer token comes from the shared prefill (the same for every point, as in `generate`) — or, with `prefix`
    (tokens fed after every compressed cache first, as `generate`'s), from each point's logits after it."""
    if not results:
        return BatchDecode([], None, None)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be ≥ 1")
    T = kl_tokens if continuation is None else int(continuation.numel())
    B = len(results)
    keeps = stack_keeps(pf, results) if keeps is None else keeps
    prefix = [] if prefix is None else torch.as_tensor(prefix).view(-1).tolist()
    sc = StaticRaggedCache.from_keeps(pf, keeps, [None if r is None else r.values for r in results],
                                      capacity=len(prefix) + max(max_new_tokens - 1, T, 1))
    dec = FastDecoder(pf.model, sc, impl=impl, fuse=False, compile=False)
    if graph if graph is not None else sc.device.type == "cuda":
        dec.capture()
    dev = sc.device
    stops = torch.tensor(sorted(stop_ids(tok)) or [-1], device=dev)
    def feed_prefix() -> torch.Tensor:  # (B, vocab) logits after the prefix (the shared prefill's without one)
        last = pf.logits.to(dev).float().expand(B, -1)
        for t in prefix:
            last = dec.step(torch.full((B,), t, dtype=torch.long, device=dev)).float()
        return last.clone()  # the step's output buffer is reused by the next step

    first = feed_prefix()
    cur = first.argmax(-1)  # (B,) the first answer token
    toks = [cur]
    done = torch.isin(cur, stops)
    for _ in range(max_new_tokens - 1):
        if bool(done.all()):
            break
        cur = dec.step(cur).argmax(-1)
        toks.append(cur)
        done |= torch.isin(cur, stops)
    ids = torch.stack(toks, 1).cpu().tolist()  # (B, steps)
    stop_set = set(stop_ids(tok))
    answers = []
    for row in ids:
        cut = next((i for i, t in enumerate(row) if t in stop_set), len(row))
        answers.append(row[:cut])
    logits = None
    if T and continuation is None:
        continuation = torch.tensor((answers[0] or [int(first[0].argmax())])[:T])
    if T:
        sc.rewind()
        rows = [feed_prefix()]
        for t in continuation.view(-1).tolist():
            rows.append(dec.step(torch.full((B,), t, dtype=torch.long, device=dev)).float().clone())
        logits = torch.stack(rows, 1)  # (B, T + 1, vocab)
    return BatchDecode(answers, logits, continuation)
