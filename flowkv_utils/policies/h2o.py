"""H2O [lit] (Zhang et al., 2023), one-shot at the end of the prefill: heavy hitters by accumulated attention.

Every prompt query votes, not only the window: c_h[j] = Σ_{i=0}^{n−1} A_h[i, j] (column sums of the causal
attention of query head h, raw softmax weights as in the official code, FMInference/H2O
h2o_hf/utils_real_drop/modify_llama.py, `_update_hh_score`). Per KV head g: s_g[j] = mean_{h∈g} c_h[j] for the
prefix j < n − w (the official code is MHA-only; the group mean is the project's GQA rule, as for SnapKV); keep the
top B − w prefix tokens plus the last w tokens (H2O's "recent" tokens: the window).

Bias, kept as in the official code: token j receives n − j contributions, so earlier tokens collect more mass (the
first tokens most). `normalise=True` divides by n − j — the mean attention token j receives from the queries that
see it, as NVIDIA kvpress's ObservedAttentionPress does — which removes the positional bias.

The accumulated attention needs every prompt query: prefill with `all_queries=True` (`policies.prefill_options`).
`Prefill.column_sums` computes it block by block of query rows, never an n × n map; the block size is not a
parameter of the result."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture import Prefill
from .base import Policy, check_param, group_mean


@dataclass
class H2O(Policy):
    normalise: bool = False
    name = "h2o"
    needs_all_queries = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_param(self.name, "normalise", self.normalise, isinstance(self.normalise, bool),
                    "True (divide each column sum by the n − j queries that see token j) or False (raw sums, "
                    "as the official code)")

    def layer_scores(self, pf: Prefill, layer: int) -> torch.Tensor:
        """(G, n − w) accumulated attention of every prompt query, group mean over the query heads of a KV head."""
        try:
            acc = pf.column_sums(layer)  # (H, n)
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None
        n = acc.shape[-1]
        if self.normalise:
            acc = acc / torch.arange(n, 0, -1, device=acc.device, dtype=acc.dtype)  # queries that see token j
        return group_mean(acc, pf.shape.kv_heads)[:, : n - self.window]
