"""Correctness of the fast paths against their references, on fresh random inputs (one 'check' row each): the
split-KV kernels, FlowKV's score kernel, the fast decoder's logits, and chunked prefill."""

from __future__ import annotations

import torch

from .. import generate
from ..capture import prefill
from ..fastdecode import FastDecoder, SplitKVAttend, StaticRaggedCache
from ..kernels import DEFAULT_CONFIG, DEFAULT_SCORE_CONFIG, ScoreConfig, SplitKVConfig, triton_available
from ..layerwise import LayerwiseCompressor
from ..models import shape_of
from ..results import Recorder
from .prefill import score_params
from .shapes import prompt_ids
from .timing import fast_path, free_memory, peak, reset_peak


def kernel_checks(rec: Recorder, device="cuda", seed: int = 0, config: SplitKVConfig = DEFAULT_CONFIG) -> bool:
    """Split-KV (Triton when available, and the torch version; launch settings `config`) against
    RaggedCache.attend on fresh random inputs: uneven head lengths, empty heads, several tail fills, GQA groups of
    1–8, head dims 64/128, bf16."""
    from ..cache import RaggedCache, RaggedLayer

    torch.manual_seed(seed)
    impls = ["torch"] + (["triton"] if triton_available() and torch.device(device).type == "cuda" else [])
    ok_all = True
    configs = [  # (G, r, d, lengths, used)
        (8, 4, 128, [20000, 0, 1, 4097, 333, 12000, 64, 5], 0),
        (8, 4, 128, [100] * 8, 7),
        (2, 4, 64, [0, 0], 3),
        (3, 3, 64, [1, 2, 3], 0),
        (4, 8, 128, [50000, 10, 0, 777], 15),
        (8, 1, 128, [513, 1024, 2047, 1, 0, 64, 65, 4096], 2),
    ]
    for G, r, d, lens, used in configs:
        lengths = torch.tensor(lens)
        off = torch.zeros(G + 1, dtype=torch.long)
        off[1:] = torch.cumsum(lengths, 0)
        N, cap = int(off[-1]), 16
        bf = torch.bfloat16
        k, v = (torch.randn(N, d, dtype=bf, device=device) for _ in range(2))
        tk, tv = (torch.randn(G, cap, d, dtype=bf, device=device) for _ in range(2))
        cache = RaggedCache([RaggedLayer(k, v, off, tk, tv)], next_pos=N)
        cache.used = used
        q = torch.randn(G * r, 1, d, dtype=bf, device=device)
        ref = cache.attend(0, q.double(), 1, d ** -0.5) if device == "cpu" else None
        if ref is None:  # float64 reference through the same code on upcast inputs
            lay64 = RaggedLayer(k.double(), v.double(), off, tk.double(), tv.double())
            c64 = RaggedCache([lay64], next_pos=N)
            c64.used = used
            ref = c64.attend(0, q.double(), 1, d ** -0.5)
        for impl in impls:
            out = SplitKVAttend(impl=impl, config=config)(cache, 0, q, 1, d ** -0.5)
            err = float((out.double() - ref).norm() / ref.norm())
            ok = bool(torch.isfinite(out).all()) and err < 1e-2
            ok_all &= ok
            rec.add("check", kind="split_kv", impl=impl, what=f"split-KV {impl} vs RaggedCache.attend (float64)",
                    config=f"G={G} r={r} d={d} lengths={lens} tail={used + 1}", rel_err=err, tol=1e-2, ok=ok)
    return ok_all


def score_checks(rec: Recorder, device="cuda", score_config: ScoreConfig = DEFAULT_SCORE_CONFIG) -> bool:
    """FlowKV's score kernel (Triton, launch settings `score_config`) against the PyTorch Gram form (itself tested
    against the direct transcription) on fresh random inputs: GQA groups of 1–8, head dims 64/80/128, windows
    8–32, bf16 values."""
    from ..policies.flowkv import flowkv_scores, gram_blocks

    ok_all = True
    for G, r, d, D, w, n in [(8, 4, 128, 4096, 32, 70000), (3, 3, 64, 576, 32, 5000), (2, 1, 128, 256, 17, 999),
                             (4, 8, 80, 2560, 8, 3001)]:
        A = torch.softmax(torch.randn(G * r, w, n, device=device) * 3, -1)
        v = torch.randn(G, n, d, device=device, dtype=torch.bfloat16)
        gram = gram_blocks(torch.randn(G * r, d, D, device=device, dtype=torch.bfloat16) * D ** -0.5, G)
        m = n - w
        ref = flowkv_scores(A, v, gram, m, impl="torch")
        out = flowkv_scores(A, v, gram, m, impl="triton", config=score_config)
        err = float((out.double() - ref.double()).norm() / ref.double().norm())
        ok = bool(torch.isfinite(out).all()) and err < 1e-4
        ok_all &= ok
        rec.add("check", kind="score_kernel", impl="triton", what="FlowKV score Triton vs PyTorch (float32)",
                config=f"G={G} r={r} d={d} D={D} w={w} n={n}", rel_err=err, tol=1e-4, ok=ok)
    return ok_all


def decode_parity(rec: Recorder, model, n: int, budget=0.05, steps: int = 4, window: int = 32,
                  tol: float | None = 3e-2, config: SplitKVConfig = DEFAULT_CONFIG,
                  score_config: ScoreConfig = DEFAULT_SCORE_CONFIG) -> bool:
    """Whole-model check: FastDecoder (graph) logits vs generate.decode with the reference attention, on the real
    compressed cache of an n-token prefill (FlowKV global), over a few greedy steps. tol=None records the error
    without judging it (deep random-weight models amplify bf16 rounding: compare with `chunked_prefill_check`'s
    error on the same model, two exact computations that differ only in rounding)."""
    dev = next(model.parameters()).device
    ids = prompt_ids(n, model.config.vocab_size, seed=1)
    comp = LayerwiseCompressor(model, ids, "flowkv_global", budget, window=window,
                               policy_params=score_params(score_config))
    prefill(model, ids, window=window, chunk=4096, on_layer=comp, keep_kv=False)
    ref_cache = comp.cache(capacity=steps + 1)
    fast = StaticRaggedCache.from_ragged([ref_cache], capacity=steps + 4, config=config)
    dec = FastDecoder(model, fast, config=config)
    if dev.type == "cuda":
        dec.capture()
    ok_all = True
    tok = torch.randint(0, model.config.vocab_size, (1,))
    for i in range(steps):
        ref = generate.decode(model, ref_cache, tok.view(1, 1))[-1]
        got = dec.step(tok.to(dev))[0].float()
        err = float((got - ref).norm() / ref.norm())
        ok = bool(torch.isfinite(got).all()) and (tol is None or err < tol)
        ok_all &= ok
        if tol is None:
            ok = "info" if ok else False
        rec.add("check", kind="decode_parity", impl=dec.impl_used,
                what=f"FastDecoder ({fast_path(dec)['impl']}) vs generate.decode reference, logits",
                config=f"{shape_of(model).name} n={n} budget={budget} step={i}", rel_err=err, tol=tol, ok=ok)
        tok = ref.argmax().view(1).cpu()
    del comp, ref_cache, fast, dec
    free_memory()
    return ok_all


def chunked_prefill_check(rec: Recorder, model, n: int, chunk: int, tol: float | None = 2e-2) -> bool:
    """Chunked prefill equals unchunked (last-token logits) and does not hold n × n: peak memory of each."""
    dev = next(model.parameters()).device
    ids = prompt_ids(n, model.config.vocab_size, seed=2)
    out = {}
    for c in (None, chunk):
        free_memory()
        reset_peak(dev)
        base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
        pf = prefill(model, ids, window=32, chunk=c, keep_kv=False)
        pa, _ = peak(dev)
        out[c] = (pf.logits.float(), (pa or 0) - base)
        del pf
    err = float((out[chunk][0] - out[None][0]).norm() / out[None][0].norm())
    ok = bool(torch.isfinite(out[chunk][0]).all()) and (tol is None or err < tol)
    rec.add("check", kind="chunked_prefill", what="chunked prefill logits vs unchunked",
            config=f"{shape_of(model).name} n={n} chunk={chunk} peak_extra_bytes unchunked={out[None][1]} "
                   f"chunked={out[chunk][1]}", rel_err=err, tol=tol, ok=ok if tol is not None else "info")
    return ok
