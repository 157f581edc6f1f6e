"""Where FlowKV's scoring + selection time goes: each step timed on one synthetic layer of a real shape, the score
kernel's launch-setting variants (the fastest returned as a `ScoreConfig`, never stored in a global), and whole
prefills per re-packing slack."""

from __future__ import annotations

from pathlib import Path

import torch

from ..kernels import DEFAULT_SCORE_CONFIG, ScoreConfig, triton_available
from ..results import Recorder
from .prefill import prefill_context
from .shapes import SHAPES, shape_model
from .tables import RANDOM_WEIGHTS, SCHEMAS
from .timing import free_memory, median_ms

# score-kernel variants timed by `tune_score_kernel`: changes to the base `ScoreConfig` (tokens per program,
# operand columns per product, warps, pipeline stages)
SCORE_TUNE = [dict(tokens=t, cols=c, num_warps=w, num_stages=st)
              for t, c, w, st in [(64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3),
                                  (128, 128, 4, 2), (256, 128, 8, 2), (256, 64, 8, 2)]]


def scoring_parts(rec: Recorder, shape: str = "llama3-8b", contexts: tuple[int, ...] = (131072,),
                  budget: float = 0.05, window: int = 32, device: str = "cuda", reps: int = 5,
                  tune: bool = False, extras: bool = True,
                  score_config: ScoreConfig = DEFAULT_SCORE_CONFIG) -> ScoreConfig:
    """Where FlowKV's scoring + selection time goes, one synthetic layer of a real shape at a time (random bf16
    q/k/v and W_O): window attention, the Gram-form score, the layer's top-k, the per-layer norm, and the global
    cascade (one `add` per layer of the model, each followed by the per-layer count read-back a compressor does).
    SnapKV's score + per-head top-k is timed on the same window attention for comparison. The score kernel runs
    with `score_config`; tune: first time its launch-setting variants (`tune_score_kernel`) at each context and
    use the fastest; extras: also the kernel at other product precisions (information only). Returns the score
    config used at the last context (the tuned one when tune)."""
    from ..policies.flowkv import gram_blocks

    cfg = SHAPES[shape]
    dev = torch.device(device)
    dt = torch.bfloat16 if dev.type != "cpu" else torch.float32
    gen = torch.Generator(device=dev).manual_seed(0)
    H, d, D = cfg["heads"], cfg["head_dim"], cfg["hidden"]
    gram = gram_blocks(torch.randn(H, d, D, device=dev, dtype=dt, generator=gen) * D ** -0.5, cfg["kv_heads"])
    for n in contexts:
        score_config = _parts_at(rec, shape, n, gram, budget, window, dt, gen, reps, tune, extras, score_config)
        free_memory()
    return score_config


def _parts_at(rec: Recorder, shape: str, n: int, gram: torch.Tensor, budget: float, window: int, dt, gen,
              reps: int, tune: bool, extras: bool, score_config: ScoreConfig) -> ScoreConfig:
    """`scoring_parts` at one context n (random inputs drawn here, freed on return); returns the score config
    used."""
    from ..attention import window_attention
    from ..budgets import check_window, resolve_budget
    from ..policies.base import snap_scores
    from ..policies.flowkv import flowkv_scores
    from ..selection import GlobalCascade, topk_flat, topk_per_row

    cfg = SHAPES[shape]
    H, G, d, D, L = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["hidden"], cfg["layers"]
    dev = gram.device
    m = n - window
    b = resolve_budget(budget, n, L, G)
    check_window(n, window, int(b.per_slot().min()), "flowkv")
    q = torch.randn(H, window, d, device=dev, dtype=dt, generator=gen)
    k = torch.randn(G, n, d, device=dev, dtype=dt, generator=gen)
    v = torch.randn(G, n, d, device=dev, dtype=dt, generator=gen)
    resid = torch.randn(window, D, device=dev, dtype=dt, generator=gen)
    A = window_attention(q, k, d ** -0.5)
    gpu_kernel = dev.type == "cuda" and triton_available()
    if tune and gpu_kernel:  # before the timings: 'as used' is the fastest
        score_config = tune_score_kernel(rec, A, v, gram, m, reps, f"{shape}, n={n}", score_config)
    s = flowkv_scores(A, v, gram, m, config=score_config)
    layer_total = int(b.per_slot()[0].sum()) - window * G
    slots = (b.per_slot()[0] - window).to(dev)
    parts = {  # part: (what to time, on the path its policy runs)
        "window attention (H, w, n), float32": (lambda: window_attention(q, k, d ** -0.5), True),
        "flowkv score (Gram form), as used": (lambda: flowkv_scores(A, v, gram, m, config=score_config), True),
        "flowkv score, PyTorch path": (lambda: flowkv_scores(A, v, gram, m, impl="torch"), False),
        "flowkv layer top-k (stable sort)": (lambda: topk_flat(s, layer_total), True),
        "per-layer norm N2 (host read)": (lambda: float(resid.float().norm()), True),
        "snapkv score + per-head top-k": (lambda: topk_per_row(snap_scores(A, G, window), slots), True),
    }
    if extras and gpu_kernel:  # for information: other product precisions
        from ..kernels import flowkv_scores_triton
        for prec in ("tf32x3", "tf32"):
            other = score_config.replace(precision=prec)
            parts[f"flowkv score, Triton {prec} products [not used]"] = (
                lambda c=other: flowkv_scores_triton(A, v, gram, m, c), False)
    for part, (fn, on_path) in parts.items():
        t = median_ms(fn, dev, reps)
        rec.add("parts", shape=shape, part=part, context=n, budget=budget, ms_per_layer=t, ms_per_model=t * L,
                variant=False, on_path=on_path)
    k_total = int(b.total) - window * L * G
    scales = torch.rand(L, generator=torch.Generator().manual_seed(1)).tolist()

    def cascade():
        c = GlobalCascade(k_total)
        for li in range(L):
            c.add(li, s * (0.5 + scales[li]))
            c.kept_table().cpu().tolist()  # the compressor's one read per layer (`LayerwiseCompressor._compact`)
    t = median_ms(cascade, dev, max(1, reps // 2))
    rec.add("parts", shape=shape, part="global cascade add + counts", context=n, budget=budget,
            ms_per_layer=t / L, ms_per_model=t, variant=False, on_path=True,
            note=f"{L} adds of {G * m} entries, k = {k_total}")
    return score_config


def tune_score_kernel(rec: Recorder, A, v, gram, m: int, reps: int = 5, label: str = "",
                      base: ScoreConfig = DEFAULT_SCORE_CONFIG) -> ScoreConfig:
    """Time the score kernel's launch-setting variants (`SCORE_TUNE`, changes to `base`) on one layer's inputs and
    return the fastest; one 'parts' row per variant (variant=True, best=True on the fastest), written once all
    are timed."""
    from ..policies.flowkv import flowkv_scores

    best, best_t, rows = base, float("inf"), []
    for changes in SCORE_TUNE:
        cfg = base.replace(**changes)
        row = dict(shape=label, part="score kernel " + " ".join(f"{key}={val}" for key, val in changes.items()),
                   context=A.shape[-1], variant=True)
        try:
            t = median_ms(lambda cfg=cfg: flowkv_scores(A, v, gram, m, config=cfg), A.device, reps)
        except Exception as e:  # e.g. triton's OutOfResources (shared memory): that variant does not run here
            rows.append((None, dict(row, note=f"failed: {str(e)[:120]}")))
            continue
        rows.append((cfg, dict(row, ms_per_layer=t, note="launch-setting variant")))
        if t < best_t:
            best, best_t = cfg, t
    for cfg, row in rows:
        rec.add("parts", **row, best=cfg is not None and cfg == best)
    return best


def scoring_prefills(rec: Recorder, shape: str = "llama3-8b", contexts: tuple[int, ...] = (131072,),
                     budget: float = 0.05, slacks: tuple[float, ...] = (0.0,), device: str = "cuda",
                     chunk: int = 8192, score_config: ScoreConfig = DEFAULT_SCORE_CONFIG) -> Recorder:
    """Whole-model prefills of a random-weight model of `shape` compressing with FlowKV (global) layer by layer,
    once per re-packing slack, each after an untimed one of the same length and slack (steady state, as `bench
    gpu`): the scoring rows (every policy's share of prefill) and peak memory of each."""
    dev = torch.device(device)
    model = shape_model(shape, dev, max(contexts), torch.bfloat16 if dev.type == "cuda" else torch.float32)
    for n in contexts:
        for slack in slacks:
            prefill_context(rec, model, n, weights=RANDOM_WEIGHTS, budget=budget, chunk=chunk, slack=slack,
                            keep_scores=False, score_config=score_config, warmup=1)
            free_memory()
    del model
    free_memory()
    return rec


PROFILE_RANGES = ("flowkv select", "flowkv cascade add", "flowkv re-pack earlier layers", "flowkv pack layer")


def range_times(events) -> dict[str, tuple[float, float, int]]:
    """Per named range of a profile (`key_averages()` entries; the profiler lists a range once for the host and once
    for the device): (host ms, device ms, calls)."""
    out: dict[str, tuple[float, float, int]] = {}
    for e in events:
        host, dev, calls = out.get(e.key, (0.0, 0.0, 0))
        dev_us = getattr(e, "device_time_total", None)
        dev_us = e.cuda_time_total if dev_us is None else dev_us
        out[e.key] = (max(host, e.cpu_time_total / 1e3), max(dev, dev_us / 1e3), max(calls, e.count))
    return out


def profile_prefill(path, shape: str = "llama3-8b", n: int = 32768, budget: float = 0.05, device: str = "cuda",
                    chunk: int = 8192, score_config: ScoreConfig = DEFAULT_SCORE_CONFIG) -> str:
    """One compressing prefill of a random-weight model of `shape` (FlowKV global applied, SnapKV and FlowKV
    layer-wise scored on the same layers, as `scoring_prefills`) under `torch.profiler`, after two untimed ones.
    Writes to `path` the compressor's seconds per policy, the time inside each of its named ranges
    (`PROFILE_RANGES`: per-policy selection, the global cascade's merge, the re-packing of earlier layers, the
    packing of each layer) and the profiler's top operators by device and by host time; returns the text."""
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device(device)
    model = shape_model(shape, dev, n, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    quiet = Recorder(None, {}, SCHEMAS, echo=False)
    for _ in range(2):  # library initialisation and kernel compilation stay out of the profile
        prefill_context(quiet, model, n, weights=RANDOM_WEIGHTS, budget=budget, chunk=chunk, keep_scores=False,
                        score_config=score_config)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        comp = prefill_context(quiet, model, n, weights=RANDOM_WEIGHTS, budget=budget, chunk=chunk,
                               keep_scores=False, score_config=score_config)
    events = prof.key_averages()
    sort = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    ranges = [e for e in events if e.key.startswith(PROFILE_RANGES)]
    lines = [f"compressing prefill: {shape} (random weights, real shape), n = {n}, budget {budget}, device {device}",
             f"prefill (hooks excluded) {quiet.rows['prefill'][-1]['prefill_s']:.3f} s; scoring + selection, s: "
             + ", ".join(f"{k} {v:.4f}" for k, v in comp.seconds.items()),
             f"re-packs of earlier layers: {comp.repacks} (slack {comp.slack})",
             "", "named ranges (ms summed over layers; host: Python inside the range, which does not wait for the GPU;"
             " device: the kernels inside the range):"]
    lines += [f"  {key:<40} host {host:9.2f} ms  device {dev_ms:9.2f} ms  ({calls} calls)"
              for key, (host, dev_ms, calls) in sorted(range_times(ranges).items(), key=lambda kv: -kv[1][0])]
    lines += ["", events.table(sort_by=sort, row_limit=30, max_name_column_width=60), "",
              events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60)]
    text = "\n".join(lines)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text + "\n")
    del model
    free_memory()
    return text
