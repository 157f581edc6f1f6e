"""The benchmark tables: one schema per table (`SCHEMAS`), the recorder every bench job writes through, and the
loader notebook 04 reads stored runs with (`load_results`).

Every row also carries `results.META` (device, versions, date, command, git). Columns a notebook filters on are
ids or booleans, never free text: decode rows say which decoder / attention / fusion / graph they timed, check rows
their `kind`, parts rows whether they are a launch-setting `variant`, the `best` one, and `on_path`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd

from .. import results
from ..models import shape_of

RANDOM_WEIGHTS = "random weights, real shape"
EMBEDDED_WEIGHTS = "embedded (real weights)"

MODEL_COLS = ["model", "weights", "dtype", "layers", "heads", "kv_heads", "head_dim", "hidden"]
SCHEMAS: dict[str, list[str]] = {
    # the accuracy sweep's evaluation rate (bench eval): one row per path (fast batched | reference)
    "eval": ["model", "model_sha", "dtype", "context", "question", "instances", "policies", "budgets", "fidelity", "path",
             "points", "compressed_points", "seconds", "points_per_s", "check_points", "check_same_predictions",
             "check_differs", "check_max_abs_diff", "prefill_s", "select_s", "decode_s", "fidelity_s", "write_s", "note"],
    # one decode configuration: median time per step over the steps after warm-up. decoder: 'fast' (FastDecoder)
    # or 'eager' (generate.decode); attention: 'triton' | 'torch' (split-KV) | 'reference' (RaggedCache.attend);
    # fused / graph: fused projections, CUDA graph; impl: the same as one readable label
    "decode": MODEL_COLS + ["sweep", "policy", "budget", "context", "batch", "layout", "impl", "decoder",
                            "attention", "fused", "graph", "steps", "decode_ms", "decode_ms_p10", "decode_ms_p90",
                            "tokens_per_s", "kept_bytes", "allocated_bytes", "full_kv_bytes", "weight_bytes",
                            "bandwidth_GBps", "floor_ms", "floor_ratio", "bound_speedup", "peak_alloc_bytes",
                            "peak_reserved_bytes", "status", "note"],
    # one prefill (with layer-by-layer compression by `policy`, or FullKV)
    "prefill": MODEL_COLS + ["policy", "budget", "context", "chunk", "slack", "prefill_s", "scoring_total_s",
                             "peak_alloc_bytes", "peak_reserved_bytes", "kept_bytes", "allocated_bytes",
                             "full_kv_bytes", "weight_bytes", "status", "note"],
    # a compressing prefill of a large shape run on its first `layers_run` layers (every layer's weights resident)
    # and extrapolated to all of them (`bench.scale`): time × L/k, kept × L/k, peak + (L − k) layers' kept bytes
    "scale_prefill": MODEL_COLS + ["policy", "budget", "context", "chunk", "layers_run", "seconds",
                                   "seconds_per_layer", "seconds_extrapolated", "kept_bytes", "kept_bytes_extrapolated",
                                   "peak_alloc_bytes", "peak_reserved_bytes", "peak_extrapolated_bytes",
                                   "device_bytes", "fits_extrapolated", "weight_bytes", "full_kv_bytes", "status",
                                   "note"],
    # what users would run instead (`bench.peers`): one row per peer and context; what: hf_eager | hf_compiled |
    # sdpa | flex | flashinfer; status ok | oom | failed | unavailable (note: why); setup_s: cache fill + compile
    "peers": ["what", "context", "batch", "ms", "tokens_per_s", "kv_read_bytes", "weight_bytes", "GBps",
              "frac_of_copy", "floor_ms", "floor_ratio", "setup_s", "peak_alloc_bytes", "status", "note"],
    # scoring + selection of one policy during one prefill, against that prefill's time
    "scoring": MODEL_COLS + ["policy", "budget", "context", "slack", "scoring_s", "prefill_s", "fraction",
                             "kept_bytes", "allocated_bytes", "alloc_over_kept"],
    # one step of scoring + selection on one synthetic layer of a real shape (where the scoring time goes);
    # variant: a launch-setting variant of the score kernel (tuning), best: the variant then used;
    # on_path: the step is on the path its policy runs (False: the PyTorch reference, precisions not used)
    "parts": ["shape", "part", "context", "budget", "ms_per_layer", "ms_per_model", "variant", "best", "on_path",
              "note"],
    # correctness of a fast path against the reference; kind: 'score_kernel' | 'split_kv' | 'decode_parity' |
    # 'chunked_prefill'; ok: True, False, or 'info' (recorded, not judged: tol empty)
    "check": ["kind", "impl", "what", "config", "rel_err", "tol", "ok"],
    "bandwidth": ["bytes", "ms", "GBps"],
    # the device's dense matmul rate (`timing.matmul_rate`): what prefill FLOPs utilisation is measured against
    "compute": ["dtype", "n", "ms", "TFLOPs"],
    # the split-KV attention kernel alone, one layer, against the copy bandwidth; lengths: 'full' | 'uniform' |
    # 'ragged' per-head lengths; best: the variant (summed over lengths) the sweep then used
    "kernel": ["config", "lengths", "impl", "split", "block", "num_warps", "num_stages", "waves", "kv_bytes", "us",
               "GBps", "frac_of_copy", "best"],
    # one batch-1 projection (`bench.gemv`): a fused Triton kernel's launch setting, or cuBLAS's plain product over
    # the same weight; best: the fastest fused variant of that projection (the tile `gemv_speed` returns)
    "gemv": ["shape", "projection", "rows_out", "width", "weight_bytes", "impl", "rows", "block_k", "num_warps",
             "num_stages", "us", "GBps", "frac_of_copy", "best", "note"],
    # one decode step's kernels under the profiler (`bench profile`): per kernel name its group (`timing.kernel_group`),
    # calls and device µs per step, share of the timed step; group_floor_us: the bytes that group must read over the
    # copy bandwidth (matmul: the weights; attention: the kept KV; empty for the others)
    "profile": MODEL_COLS + ["policy", "budget", "context", "batch", "mode", "step_ms", "floor_ms", "group", "kernel",
                             "calls_per_step", "us_per_step", "share", "group_floor_us"],
    "load": ["what", "seconds", "note"],
    "notebooks": ["notebook", "param_set", "seconds", "status"],
}

# column types for `load_results` (every other column is a number, missing values NaN)
TEXT = set(results.META) | {"model", "weights", "dtype", "sweep", "policy", "layout", "impl", "decoder", "attention",
                            "status", "note", "shape", "part", "kind", "what", "config", "ok", "lengths", "notebook",
                            "param_set", "mode", "group", "kernel", "projection"}
BOOL = {"fused", "graph", "variant", "best", "on_path", "fits_extrapolated"}
INTEGER = {"layers", "heads", "kv_heads", "head_dim", "hidden", "context", "batch", "layers_run"}  # never missing


def recorder(out: Path | str | None, command: str | None = None, echo: bool = True) -> results.Recorder:
    """A `results.Recorder` of the bench tables in folder `out` (None: rows in memory only); model columns are not
    echoed."""
    return results.Recorder(out, results.environment(command), SCHEMAS, echo=echo, skip=MODEL_COLS)


def model_cols(model, weights: str) -> dict:
    """The model columns of a row: name, weights label, dtype and shape."""
    s = shape_of(model)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return dict(model=s.name, weights=weights, dtype=dtype, layers=s.layers, heads=s.heads, kv_heads=s.kv_heads,
                head_dim=s.head_dim, hidden=s.hidden)


# ---- reading stored results (notebook 04) --------------------------------------------------------------------
def load_results(folder: Path | str) -> dict:
    """The tables a `bench gpu --out folder` run wrote: {'meta': dict, '<table>': DataFrame, ...}, each table with
    the columns `results.META + SCHEMAS[table]` typed (text, booleans, integers, numbers). Tables written before a
    column existed load with it derived from the old labels where they say it (`_legacy`), else empty."""
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(f"{folder}: no meta.json — create it with "
                                f"`python -m flowkv_utils.bench gpu --out {folder}` on a CUDA machine")
    out: dict = {"meta": json.loads((folder / "meta.json").read_text())}
    for table, schema in SCHEMAS.items():
        f = folder / f"{table}.csv"
        if f.is_file():
            out[table] = _read(f, results.META + schema)
    return out


def _read(path: Path, columns: list[str]) -> pd.DataFrame:
    with open(path, encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh), [])
    have = [c for c in columns if c in header]
    if have != header:  # not an older version of this schema (a column unknown or out of order)
        have = columns  # let read_table name the mismatch
    df = results.read_table(path, have, numeric=[c for c in have if c not in TEXT | BOOL | INTEGER],
                            integer=[c for c in have if c in INTEGER])
    for c in have:
        if c in BOOL:
            df[c] = df[c].map({"True": True, "False": False, "": pd.NA}).astype("boolean")
    missing = [c for c in columns if c not in have]
    if missing:
        df = _legacy(path.stem, df, missing)
    return df[columns]


def _legacy(table: str, df: pd.DataFrame, missing: list[str]) -> pd.DataFrame:
    """Columns a table written before they existed lacks: derived from the free-text labels of that time where
    those say it (decode `impl`, check `what`, parts `part`, kernel `config` / `impl`), else empty."""
    df = df.copy()
    derived: dict[str, pd.Series] = {}

    def flag(mask: pd.Series, where: pd.Series | None = None) -> pd.Series:  # nullable booleans, NA outside where
        out = mask.astype("boolean")
        return out if where is None else out.where(where, pd.NA)

    if table == "decode":
        impl = df.impl.astype(str)
        timed, eager = impl != "", impl.str.endswith("-eager")
        derived["decoder"] = eager.map({True: "eager", False: "fast"}).where(timed, "")
        derived["attention"] = impl.str.split(r"[+\- ]", regex=True).str[0]
        derived["fused"] = flag(impl.str.contains("+fused", regex=False) & ~eager, timed)
        derived["graph"] = flag(impl.str.contains("+graph", regex=False) & ~eager, timed)
    elif table == "check":
        what = df.what.astype(str)
        kinds = {"FlowKV score": "score_kernel", "split-KV": "split_kv", "FastDecoder": "decode_parity",
                 "chunked prefill": "chunked_prefill"}
        derived["kind"] = what.map(lambda w: next((k for p, k in kinds.items() if w.startswith(p)), ""))
        impl = what.str.extract(r"^(?:split-KV |FastDecoder \()(\w+)")[0]
        derived["impl"] = impl.where(impl.notna(), what.str.startswith("FlowKV score Triton").map(
            {True: "triton", False: ""}))
    elif table == "parts":
        part = df.part.astype(str)
        rerun = part.str.contains("fastest settings", regex=False)  # the fastest variant, timed once more
        tuning = part.str.startswith("score kernel ")
        variant = tuning | rerun
        ms = df.ms_per_layer.where(tuning)
        fastest = ms == ms.groupby([df["shape"], df["context"]]).transform("min")
        derived["variant"] = flag(variant)
        derived["best"] = flag(fastest | rerun, variant)
        derived["on_path"] = flag(~part.str.contains("PyTorch|not used"), ~variant)
    elif table == "kernel":
        derived["lengths"] = df.config.astype(str).str.split().str[0]
        derived["waves"] = pd.to_numeric(df.impl.astype(str).str.extract(r"waves=(\d+)")[0])
        one = len(df[["block", "num_warps", "num_stages"]].assign(w=derived["waves"]).drop_duplicates()) == 1
        derived["best"] = pd.Series(True if one else pd.NA, index=df.index, dtype="boolean")  # one variant run
    for c in missing:
        df[c] = derived[c] if c in derived else pd.Series(pd.NA, index=df.index,
                                                          dtype="boolean" if c in BOOL else "object")
    return df
