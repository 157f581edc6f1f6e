"""The throughput side of the analysis (bench tables, `bench.load_results`; notebook 04): the throughput bars
against named targets (`ThroughputTargets`), the prefill out-of-memory frontier, the comparator and peer tables, a
profiled decode step by kernel group, the scale tables of `bench scale`, and prefill FLOPs and achieved rates."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class ThroughputTargets:
    """The project's throughput bars: the targets `bars` reports against (printed, never asserted).

    floor_ratio: a decode step (batch 1, longest context) takes at most this many times its byte floor
    (W + KV_kept) / BW; bound_fraction: FlowKV's measured speed-up over FullKV reaches at least this fraction of
    the bytes-ratio bound (W + KV_full) / (W + KV_kept); batch_gain: at the longest context, tokens/s at FlowKV's
    largest batch is at least this many times FullKV's at its largest; scoring_share: scoring + selection takes at
    most this fraction of prefill time (at `SCORING_CONTEXT`); alloc_over_kept: the ragged cache allocates at most
    this many times the bytes it keeps (every decode row)."""

    floor_ratio: float = 1.3
    bound_fraction: float = 0.8
    batch_gain: float = 10.0
    scoring_share: float = 0.05
    alloc_over_kept: float = 1.05


THROUGHPUT_TARGETS = ThroughputTargets()
SCORING_CONTEXT = 131072  # the prompt length (128K tokens) at which the scoring share is judged


def oom_frontier(prefill_rows: pd.DataFrame, capacity_bytes: float) -> dict[str, float]:
    """Per policy, the context at which prefill peak memory would reach the device's capacity, extrapolated along
    the straight line through the two longest measured contexts (peak memory grows linearly with n)."""
    out = {}
    for policy, g in prefill_rows[prefill_rows.status == "ok"].groupby("policy"):
        g = g.sort_values("context").tail(2)
        if len(g) < 2:
            continue
        (n0, p0), (n1, p1) = g[["context", "peak_alloc_bytes"]].to_numpy(dtype=float)
        slope = (p1 - p0) / (n1 - n0)  # bytes per prompt token
        out[policy] = n1 + (capacity_bytes - p1) / slope if slope > 0 else float("inf")
    return out


def bars(res: dict, budget: float = 0.05, scoring_context: int = SCORING_CONTEXT,
         targets: ThroughputTargets = THROUGHPUT_TARGETS) -> pd.DataFrame:
    """The project's throughput bars, computed from stored bench results (`bench.load_results`; printed, never
    asserted): decode step vs floor at the longest context, the FlowKV speed-up against the bytes-ratio bound,
    throughput at the largest batch, scoring overhead at `scoring_context`, ragged allocated vs kept bytes, each
    against its target in `targets`. Returns a DataFrame (bar, value, target, reached)."""
    t = targets
    d = res["decode"][res["decode"].status == "ok"]
    n = int(d.context.max())
    ctx = d[(d.sweep == "context") & (d.context == n) & (d.batch == 1)]
    full = ctx[ctx.policy == "fullkv"].iloc[0]
    rows = []
    for pol in ("fullkv", "flowkv", "flowkv_global"):
        r = ctx[(ctx.policy == pol) & ((ctx.budget == budget) | (pol == "fullkv"))]
        if len(r):
            r = r.iloc[0]
            rows.append((f"decode step / floor, {pol}, n={n}, batch 1", r.floor_ratio, f"≤ {t.floor_ratio:g}",
                         r.floor_ratio <= t.floor_ratio))
    for pol in ("flowkv", "flowkv_global"):
        r = ctx[(ctx.policy == pol) & (ctx.budget == budget)]
        if len(r):
            r = r.iloc[0]
            frac = (full.decode_ms / r.decode_ms) / r.bound_speedup
            rows.append((f"{pol} speed-up over FullKV / bytes-ratio bound ({full.decode_ms / r.decode_ms:.2f}× of "
                         f"{r.bound_speedup:.2f}×), n={n}", frac, f"≥ {t.bound_fraction:g}",
                         frac >= t.bound_fraction))
    mb = d[d.sweep == "maxbatch"].set_index("policy")
    if {"fullkv", "flowkv_global"} <= set(mb.index):
        f, k = mb.loc["fullkv"], mb.loc["flowkv_global"]
        gain = k.tokens_per_s / f.tokens_per_s
        rows.append((f"tokens/s at the largest batch, n={n}: FlowKV {budget:.0%} (B={k.batch}) / FullKV "
                     f"(B={f.batch}) = {k.tokens_per_s:.0f} / {f.tokens_per_s:.0f}", gain, f"≥ {t.batch_gain:g}",
                     gain >= t.batch_gain))
    if "scoring" in res:
        sc = res["scoring"]
        for pol in ("flowkv", "flowkv_global", "snapkv"):
            r = sc[(sc.policy == pol) & (sc.context == scoring_context)]
            if len(r):
                v = float(r.fraction.iloc[0])
                rows.append((f"{pol} scoring+selection / prefill, n={scoring_context}", v,
                             f"≤ {t.scoring_share:g}", v <= t.scoring_share))
    rag = d[d.layout == "ragged"]
    worst = float((rag.allocated_bytes / rag.kept_bytes).max())
    rows.append(("ragged cache allocated / kept bytes (worst row)", worst, f"≤ {t.alloc_over_kept:g}",
                 worst <= t.alloc_over_kept))
    return pd.DataFrame(rows, columns=["bar", "value", "target", "reached"])


@dataclass(frozen=True)
class H200Targets:
    """Issue 14's bars for one H200 (stricter than `ThroughputTargets`, set for a kernel at the bandwidth):
    floor_ratio for FullKV and FlowKV global at the longest context, batch 1; the split-KV kernel's full-cache row
    and ragged 5 % row as fractions of copy bandwidth (the ragged one a target of the issue's parts, not a bar);
    scoring_share of both FlowKV variants at each of `scoring_contexts`."""

    floor_ratio: float = 1.15
    kernel_full: float = 0.9
    kernel_ragged: float = 0.6
    scoring_share: float = 0.05
    scoring_contexts: tuple[int, ...] = (32768, 131072, 204800)


H200_TARGETS = H200Targets()


def h200_bars(res: dict, budget: float = 0.05, targets: H200Targets = H200_TARGETS) -> pd.DataFrame:
    """Issue 14's bars from a stored `bench gpu` run on an H200 (printed, never asserted): the decode step against
    its floor (FullKV, FlowKV global at `budget`; longest context, batch 1), the split-KV kernel's full and ragged
    rows (the variant marked best), and the scoring share of FlowKV layer-wise and global at each scoring context.
    Same columns as `bars`; a bar whose row the run lacks is reported with value NaN and reached None."""
    t = targets
    d = res["decode"][res["decode"].status == "ok"]
    n = int(d.context.max())
    ctx = d[(d.sweep == "context") & (d.context == n) & (d.batch == 1)]
    rows = []
    for pol in ("fullkv", "flowkv_global"):
        r = ctx[(ctx.policy == pol) & ((ctx.budget == budget) | (pol == "fullkv"))]
        v = float(r.floor_ratio.iloc[0]) if len(r) else float("nan")
        rows.append((f"decode step / floor, {pol}, n={n}, batch 1", v, f"≤ {t.floor_ratio:g}",
                     (v <= t.floor_ratio) if len(r) else None))
    k = res["kernel"]
    k = k[k.best == True]  # noqa: E712 (a boolean column)
    for lengths, target, what in (("full", t.kernel_full, "bar"), ("ragged", t.kernel_ragged, "target of part 3")):
        r = k[k.lengths == lengths]
        v = float(r.frac_of_copy.iloc[0]) if len(r) else float("nan")
        rows.append((f"split-KV kernel, {lengths} lengths, fraction of copy bandwidth ({what})", v, f"≥ {target:g}",
                     (v >= target) if len(r) else None))
    sc = res.get("scoring")
    for m in t.scoring_contexts:
        for pol in ("flowkv", "flowkv_global"):
            r = sc[(sc.policy == pol) & (sc.context == m)] if sc is not None else []
            v = float(r.fraction.iloc[0]) if len(r) else float("nan")
            rows.append((f"{pol} scoring+selection / prefill, n={m}", v, f"≤ {t.scoring_share:g}",
                         (v <= t.scoring_share) if len(r) else None))
    return pd.DataFrame(rows, columns=["bar", "value", "target", "reached"])


# ---- the throughput bars stated as a table (notebook 04 prints them before its GPU figures) ----
TARGET_SENSE = {"floor_ratio": "≤", "bound_fraction": "≥", "batch_gain": "≥", "scoring_share": "≤",
                "alloc_over_kept": "≤"}  # the comparison `bars` applies to each ThroughputTargets field


def targets_table(targets: ThroughputTargets = THROUGHPUT_TARGETS,
                  scoring_context: int = SCORING_CONTEXT) -> pd.DataFrame:
    """One row per field of `targets`: its `name`, the comparison `bars` applies (`sense`, '≤' or '≥'), the
    `value`, the `target` as `bars` prints it in its own `target` column, and what it is judged on (`judged_on`)."""
    from dataclasses import fields

    judged_on = {
        "floor_ratio": "decode step / its byte floor; batch 1, longest stored context; FullKV, FlowKV, FlowKV global",
        "bound_fraction": "FlowKV speed-up over FullKV / bytes-ratio bound; batch 1, longest stored context",
        "batch_gain": "tokens/s at FlowKV global's largest batch / FullKV's at its largest; longest stored context",
        "scoring_share": f"scoring + selection / prefill time; n = {scoring_context} tokens; every policy",
        "alloc_over_kept": "ragged cache allocated / kept bytes; worst decode row",
    }
    rows = []
    for f in fields(targets):
        value = getattr(targets, f.name)
        sense = TARGET_SENSE[f.name]
        rows.append((f.name, sense, value, f"{sense} {value:g}", judged_on[f.name]))
    return pd.DataFrame(rows, columns=["name", "sense", "value", "target", "judged_on"])


# ---- comparators and peers (issue 14) and scale (issue 15): tidy tables from stored bench runs ----
def weight_format_of(weights_label: str) -> str:
    """'fp8' or 'bf16' from a row's weights label (`bench.scale.weights_label`)."""
    return "fp8" if "fp8" in str(weights_label) else "bf16"


def config_label(policy: str, budget, layout: str = "ragged") -> str:
    """How a decode configuration is named in tables and legends: 'FullKV', 'FlowKV 5 %', 'Quest P=16 5 %', ..."""
    from ..plots import policy_label

    if policy == "fullkv":
        return "FullKV"
    b = "" if budget is None or budget != budget else f" {budget:.0%}"
    if policy == "quest":
        return f"{policy_label(policy)}, P={str(layout).removeprefix('pages')}{b}"
    return f"{policy_label(policy)}{b}"


def comparison_table(res: dict, peers: dict | None = None, context: int | None = None) -> pd.DataFrame:
    """One row per way of decoding at `context` (default: the longest of the stored run): every policy's batch-1
    step and its largest batch (decode rows; block-sparse rows included), and, from a stored `bench peers` run,
    the whole-model peers (transformers eager and compiled). Columns: name, kind ('eviction' | 'block-sparse' |
    'full' | 'peer'), batch_1_ms, tokens_per_s_1, floor_ratio_1, max_batch, tokens_per_s_max, kv_resident_gb (the
    cache one sequence holds)."""
    d = res["decode"][res["decode"].status == "ok"]
    n = int(d.context.max()) if context is None else context
    d = d[d.context == n]
    rows = []
    one = d[(d.sweep == "context") & (d.batch == 1) & (d.layout.isin(["ragged"]) | (d.policy == "quest"))]
    for _, r in one.iterrows():
        big = d[(d.sweep == "maxbatch") & (d.policy == r.policy) & (d.layout == r.layout)]
        kind = "full" if r.policy == "fullkv" else "block-sparse" if r.policy == "quest" else "eviction"
        rows.append(dict(name=config_label(r.policy, r.budget, r.layout), kind=kind, batch_1_ms=r.decode_ms,
                         tokens_per_s_1=r.tokens_per_s, floor_ratio_1=r.floor_ratio,
                         max_batch=int(big.batch.iloc[0]) if len(big) else None,
                         tokens_per_s_max=float(big.tokens_per_s.iloc[0]) if len(big) else None,
                         kv_resident_gb=r.kept_bytes / 1e9))
    if peers is not None:
        p = peers["peers"]
        p = p[(p.context == n) & p.what.isin(["hf_eager", "hf_compiled"]) & (p.status == "ok")]
        names = {"hf_eager": "transformers eager (DynamicCache)", "hf_compiled": "transformers StaticCache + compile"}
        for _, r in p.iterrows():
            rows.append(dict(name=names[r.what], kind="peer", batch_1_ms=r.ms, tokens_per_s_1=r.tokens_per_s,
                             floor_ratio_1=r.floor_ratio, max_batch=None, tokens_per_s_max=None,
                             kv_resident_gb=r.kv_read_bytes / 1e9))
    order = {"full": 0, "eviction": 1, "block-sparse": 2, "peer": 3}
    out = pd.DataFrame(rows)
    return out.sort_values(["kind", "batch_1_ms"], key=lambda c: c.map(order) if c.name == "kind" else c,
                           ignore_index=True)


def attention_kernels(res: dict, peers: dict) -> pd.DataFrame:
    """One layer's decode attention at the kernel table's context: the project's split-KV kernel (full cache,
    uniform and ragged 5 % lengths) beside SDPA (full and pre-gathered), FlexAttention (page mask) and FlashInfer
    (or why not) from a `bench peers` run. Columns: name, us, kv_mb, frac_of_copy, status, note."""
    rows = []
    for _, r in res["kernel"].iterrows():
        rows.append(dict(name=f"split-KV (project), {r.lengths} lengths", us=r.us, kv_mb=r.kv_bytes / 1e6,
                         frac_of_copy=r.frac_of_copy, status="ok", note=f"config {r.config}"))
    for _, r in peers["peers"][peers["peers"].what.isin(["sdpa", "flex", "flashinfer"])].iterrows():
        rows.append(dict(name={"sdpa": "torch SDPA", "flex": "FlexAttention", "flashinfer": "FlashInfer"}[r.what]
                         + ("" if r.what != "sdpa" else (", full cache" if "full cache" in r.note else ", gathered 5 %")),
                         us=None if r.ms != r.ms else 1e3 * r.ms, kv_mb=r.kv_read_bytes / 1e6,
                         frac_of_copy=r.frac_of_copy, status=r.status, note=r.note))
    return pd.DataFrame(rows)


GAPS = "gaps between kernels"  # profile_groups' name for the step time no kernel accounts for


def profile_groups(profile: pd.DataFrame) -> pd.DataFrame:
    """Where a profiled decode step's time goes (`bench profile`'s 'profile' table): per (policy, budget) one row
    per kernel group (`bench.timing.KERNEL_GROUPS`, "other") with its µs per step, share of the step and the group's
    byte floor where it has one (matmul: the weights; attention: the kept KV; both over the copy bandwidth), plus a
    `GAPS` row: the step minus the sum of its kernels (launch gaps and idle time inside the CUDA graph). Columns:
    policy, budget, step_ms, floor_ms, group, us, share, floor_us, over_floor_us (us − floor_us, or us where no
    floor); rows by policy as stored, groups by time, the gaps last."""
    rows = []
    for (policy, budget), g in profile.groupby(["policy", "budget"], sort=False, dropna=False):
        step_ms, floor_ms = float(g.step_ms.iloc[0]), float(g.floor_ms.iloc[0])
        per = g.groupby("group").agg(us=("us_per_step", "sum"), floor_us=("group_floor_us", "first"))
        per = per.sort_values("us", ascending=False).reset_index()
        gaps = dict(group=GAPS, us=1e3 * step_ms - per.us.sum(), floor_us=float("nan"))
        per = pd.concat([per, pd.DataFrame([gaps])], ignore_index=True)
        per = per.assign(policy=policy, budget=budget, step_ms=step_ms, floor_ms=floor_ms,
                         share=per.us / (1e3 * step_ms), over_floor_us=per.us - per.floor_us.fillna(0.0))
        rows.append(per)
    cols = ["policy", "budget", "step_ms", "floor_ms", "group", "us", "share", "floor_us", "over_floor_us"]
    return pd.concat(rows, ignore_index=True)[cols]


def scale_tables(res: dict) -> dict[str, pd.DataFrame]:
    """From a stored `bench scale` run: 'decode' (weight format × configuration × context: fits, ms and tokens/s at
    batch 1, floor ratio, peak and kept GB), 'frontier' (per format, FullKV's largest context that decoded and
    the first that did not), 'batch' (the largest batch of the searched configuration), 'prefill' (measured on a
    few layers and extrapolated, per format, policy and context), 'fullkv_curve' (every FullKV context the frontier
    search decoded, with the 'decode' columns: FullKV's memory and speed against the context)."""
    d = res["decode"].assign(format=lambda x: x.weights.map(weight_format_of))
    d["config"] = [config_label(p, b) for p, b in zip(d.policy, d.budget, strict=True)]
    grid = d[d.sweep == "scale"].assign(fits=lambda x: x.status == "ok", peak_gb=lambda x: x.peak_alloc_bytes / 1e9,
                                        kept_gb=lambda x: x.kept_bytes / 1e9)
    cols = ["format", "config", "policy", "budget", "context", "fits", "decode_ms", "tokens_per_s", "floor_ratio",
            "peak_gb", "kept_gb"]
    grid = grid[cols].reset_index(drop=True)
    curve = d[(d.sweep == "frontier") & (d.status == "ok")].assign(fits=True, peak_gb=lambda x: x.peak_alloc_bytes / 1e9,
                                                                   kept_gb=lambda x: x.kept_bytes / 1e9)
    curve = curve[cols].sort_values(["format", "context"]).reset_index(drop=True)
    fr = []
    for fmt, g in d[d.sweep == "frontier"].groupby("format", sort=False):
        ok, oom = g[g.status == "ok"].context, g[g.status == "oom"].context
        largest = int(ok.max()) if len(ok) else 0
        first_oom = oom[oom > largest]
        fr.append(dict(format=fmt, largest_context=largest,
                       first_oom=int(first_oom.min()) if len(first_oom) else None,
                       attempts=len(g)))
    batch = d[d.sweep == "maxbatch"][["format", "config", "context", "batch", "decode_ms", "tokens_per_s",
                                      "floor_ratio"]].reset_index(drop=True)
    p = res.get("scale_prefill")
    if p is not None:
        p = p.assign(format=p.weights.map(weight_format_of))
        p["config"] = [config_label(a, b) for a, b in zip(p.policy, p.budget, strict=True)]
        p = p[["format", "config", "context", "status", "layers_run", "seconds", "seconds_extrapolated",
               "peak_alloc_bytes", "peak_extrapolated_bytes", "device_bytes", "fits_extrapolated"]]
    return {"decode": grid, "frontier": pd.DataFrame(fr), "batch": batch, "prefill": p, "fullkv_curve": curve}


def prefill_flops(layers: int, heads: int, kv_heads: int, head_dim: int, hidden: int, intermediate: int, vocab: int,
                  n: int) -> dict[str, float]:
    """Matrix-multiply FLOPs of a Llama-style prefill of n tokens (2 per multiply-add), as the project's prefill runs
    it: per layer the q/k/v, o and gate/up/down projections of every token, causal attention (query i reads its i
    keys: QKᵀ and PV over n(n+1)/2 pairs per head), and the LM head of the last token only. Returns
    {'linear', 'attention', 'total'}; `tests/test_analysis_throughput.py` checks 'linear' against torch's
    FlopCounterMode on a real prefill."""
    H, G, d, D, inter, L = heads, kv_heads, head_dim, hidden, intermediate, layers
    linear = L * 2 * n * (D * H * d + 2 * D * G * d + H * d * D + 3 * D * inter) + 2 * D * vocab
    attention = L * 2 * 2 * H * d * (n * (n + 1) / 2)
    return {"linear": float(linear), "attention": float(attention), "total": float(linear + attention)}


def prefill_rates(rows: pd.DataFrame, shape: dict, seconds: str = "prefill_s", layers_run: str | None = None,
                  peak_tflops: float | None = None) -> pd.DataFrame:
    """Achieved TFLOP/s of stored prefill rows: `prefill_flops` of each row's context (over `layers_run` layers
    where the rows were run on a few layers, `bench scale`) over its `seconds` column. shape: the run's
    `meta['shape']` (intermediate and vocab are not row columns). Adds columns flops, attention_share, tflops, and
    mfu = tflops / peak_tflops when a measured matmul rate is given (the run's 'compute' table)."""
    out = rows[rows.status == "ok"].copy()
    flops, share = [], []
    for _, r in out.iterrows():
        L = int(r[layers_run]) if layers_run else int(r.layers)
        f = prefill_flops(L, int(r.heads), int(r.kv_heads), int(r.head_dim), int(r.hidden), shape["intermediate"],
                          shape["vocab"] if not layers_run else 0, int(r.context))
        flops.append(f["total"])
        share.append(f["attention"] / f["total"])
    out["flops"], out["attention_share"] = flops, share
    out["tflops"] = out.flops / out[seconds] / 1e12
    out["mfu"] = out.tflops / peak_tflops if peak_tflops else float("nan")
    return out
