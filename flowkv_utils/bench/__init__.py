"""Benchmarks: throughput and memory of compressed-cache decoding, and the CPU timings other notebooks cite.

    python -m flowkv_utils.bench load        # embedded model: cold load (temp FLOWKV_CACHE) and warm load
    python -m flowkv_utils.bench notebooks   # each notebook headless with default parameters (flowkv_utils.runner)
    python -m flowkv_utils.bench policies    # embedded model, 4K prompt: scoring+selection / prefill, bytes kept/allocated
    python -m flowkv_utils.bench decode      # embedded model on CPU: prefill, scoring, decode per token vs the floor
    python -m flowkv_utils.bench gpu --out results/gpu   # the GPU sweep (Llama-3-8B shape, random weights) to 200K
    python -m flowkv_utils.bench profile     # one 200K decode step's kernels by group (matmul, attention, ...) vs floors
    python -m flowkv_utils.bench gemv --tune # the batch-1 fused projection kernels vs cuBLAS, per launch setting
    python -m flowkv_utils.bench scoring     # FlowKV scoring step by step at 128K (GPU), + whole prefills per slack
    python -m flowkv_utils.bench scoring --profile 32768   # + one compressing prefill under torch.profiler, by range
    python -m flowkv_utils.bench scale --out results/scale_h200   # what one GPU holds: Llama-3-70B shape, fp8/bf16
    python -m flowkv_utils.bench peers --out results/peers_h200   # HF eager/compiled, SDPA, FlexAttention, FlashInfer
    python -m flowkv_utils.bench all         # load, notebooks, policies, decode (the CPU ones)

Every table is tidy CSV (`results.TableFile`), one measurement per row, and every row carries the device, torch /
transformers / triton versions, the date, the command and the git commit; a JSON file beside the tables holds the
same metadata plus the measured copy bandwidth and the kernels' launch settings. The floor of a decode step is the
bytes it must read once — the weights W (embedding table excluded: one row is read) and the kept KV bytes — over
the measured device-to-device copy bandwidth:

    floor = (W + KV_kept) / BW,     bytes-ratio speed-up bound of a policy over FullKV = (W + KV_full) / (W + KV_kept).

Speed and memory do not depend on weight values, so GPU figures use random-weight models of real shapes (said on
every row: weights = "random weights, real shape"); decode-only sweeps fill caches of the policies' real per-head
lengths with random contents. Tests never assert timings; this package only measures and prints. The analysis of
stored runs (bars, OOM frontier, comparators, scale) is `analysis.throughput`'s.

Modules, one job each: `tables` (schemas, recorder, loading stored runs), `timing` (bandwidth, bytes, step timings,
the decode row), `shapes` (model shapes, prompts, synthetic caches), `prefill` (one compressing prefill), `cpu`
(the CPU benchmarks), `scoring` (scoring step by step, score-kernel tuning, the profiled prefill), `checks` (fast paths vs references),
`gpu` (the GPU sweep, split-KV kernel timing), `gemv` (the batch-1 fused projection kernels), `scale` (what one GPU holds of a large shape), `peers` (what users would run instead), `cli` (the subcommands).
"""

from .checks import chunked_prefill_check, decode_parity, kernel_checks, score_checks
from .cli import main, summary
from .cpu import context_sweep, load_times, notebook_times, policies_overhead
from .gemv import GEMV_TUNE, gemv_speed
from .gpu import TUNE, decode_profile, gpu_sweep, kernel_speed, largest_batch, largest_that_fits
from .peers import PEERS, peers_sweep
from .prefill import prefill_context
from .scale import scale_sweep
from .scoring import SCORE_TUNE, scoring_parts, scoring_prefills, tune_score_kernel
from .shapes import SHAPES, prompt_ids, shape_model, synthetic_cache
from .tables import EMBEDDED_WEIGHTS, MODEL_COLS, RANDOM_WEIGHTS, SCHEMAS, load_results, model_cols, recorder
from .timing import (
    copy_bandwidth,
    decode_row,
    median_ms,
    time_fast_decode,
    time_generate_decode,
    weight_bytes,
)

__all__ = ["EMBEDDED_WEIGHTS", "GEMV_TUNE", "MODEL_COLS", "PEERS", "RANDOM_WEIGHTS", "SCHEMAS", "SCORE_TUNE", "SHAPES", "TUNE", "decode_profile",
           "chunked_prefill_check", "context_sweep", "copy_bandwidth", "decode_parity", "decode_row", "gemv_speed", "gpu_sweep",
           "kernel_checks", "kernel_speed", "largest_batch", "largest_that_fits", "load_results", "load_times", "main", "median_ms",
           "model_cols", "notebook_times", "peers_sweep", "policies_overhead", "prefill_context", "prompt_ids", "recorder", "scale_sweep",
           "score_checks", "scoring_parts", "scoring_prefills", "shape_model", "summary", "synthetic_cache",
           "time_fast_decode", "time_generate_decode", "tune_score_kernel", "weight_bytes"]
