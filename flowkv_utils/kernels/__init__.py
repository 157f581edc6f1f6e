"""GPU kernels — a leaf package: it imports nothing else of the project, so every stage may use it.

- `split_kv`: split-KV ("flash-decoding") decode attention over a packed ragged layout (PyTorch + Triton);
- `flowkv_score`: FlowKV's derived score as one fused Triton kernel (prefill-time scoring);
- `gemv`: the batch-1 decode projections with their norms, RoPE, cache write, SiLU·up and residuals fused in;
- `_triton`: lazy Triton builds and the `impl` switch ('auto' | 'triton' | 'torch').
Launch settings are values (`SplitKVConfig`, `ScoreConfig`) passed to the calls, never module globals.
"""

from ._triton import triton_available, use_triton
from .flowkv_score import DEFAULT_SCORE_CONFIG, ScoreConfig, flowkv_scores_triton, tf32_split
from .gemv import DEFAULT_GEMV_CONFIG, GemvConfig, GemvTile
from .split_kv import (
    DEFAULT_CONFIG,
    SplitKVConfig,
    SplitKVWorkspace,
    TritonTables,
    WorkItems,
    auto_split,
    choose_split,
    make_workspace,
    split_kv,
    split_kv_torch,
    split_kv_triton,
    target_programs,
    triton_tables,
    work_items,
)

__all__ = ["DEFAULT_CONFIG", "DEFAULT_GEMV_CONFIG", "DEFAULT_SCORE_CONFIG", "GemvConfig", "GemvTile", "ScoreConfig", "SplitKVConfig", "SplitKVWorkspace",
           "TritonTables", "WorkItems", "auto_split", "choose_split", "flowkv_scores_triton", "make_workspace",
           "split_kv", "split_kv_torch", "split_kv_triton", "target_programs", "tf32_split", "triton_available",
           "triton_tables", "use_triton", "work_items"]
