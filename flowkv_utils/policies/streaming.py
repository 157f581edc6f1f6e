"""StreamingLLM [lit] (Xiao et al., 2023): keep s attention sinks (the first tokens) and the most recent
B − s tokens; the same positions in every head and layer. Position-only: no attention is read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budgets import Budget
from ..capture import Prefill
from .base import Policy, check_param, stack_layers


@dataclass
class StreamingLLM(Policy):
    sinks: int = 4
    name = "streamingllm"
    uses_window = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_param(self.name, "sinks", self.sinks, isinstance(self.sinks, int) and self.sinks >= 0,
                    "an int ≥ 0 (first tokens always kept)")

    def select(self, pf: Prefill, b: Budget):
        n = pf.n
        slots = b.per_slot()  # (L, G) budgets, differ by ≤ 1 only for fractional budgets
        pos = torch.arange(n)
        keeps, scores = [], []
        for layer_slots in slots:
            s = torch.clamp(torch.as_tensor(self.sinks), max=layer_slots).unsqueeze(-1)  # (G, 1)
            recent = (layer_slots.unsqueeze(-1) - s)  # (G, 1)
            keep = (pos < s) | (pos >= n - recent)
            keeps.append(keep)
            # the "score" is recency: sinks first, then newer tokens rank higher
            scores.append(torch.where(pos < self.sinks, float(n), pos.float()).expand(len(layer_slots), n))
        keep, sc = stack_layers(keeps, scores)
        return keep, sc, {"sinks": self.sinks}
