"""StreamingLLM [lit] (Xiao et al., 2023): keep s attention sinks (the first tokens) and the most recent
B − s tokens; the same positions in every head and layer. Position-only: no attention is read.

As a score: sinks rank first (score n), then newer tokens above older ones (score = position); the per-head top-k
of the shared loop then keeps min(s, B) sinks and the B − min(s, B) most recent tokens, exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture import Prefill
from .base import Policy, check_param


@dataclass
class StreamingLLM(Policy):
    sinks: int = 4
    name = "streamingllm"
    uses_window = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_param(self.name, "sinks", self.sinks, isinstance(self.sinks, int) and self.sinks >= 0,
                    "an int ≥ 0 (first tokens always kept)")

    def layer_scores(self, pf: Prefill, layer: int) -> torch.Tensor:
        """(G, n) recency scores: sinks first (ties go to the earlier sink), then newer tokens rank higher."""
        pos = torch.arange(pf.n, device=pf.layers[layer].k.device).float()
        return torch.where(pos < self.sinks, float(pf.n), pos).expand(pf.shape.kv_heads, pf.n)
