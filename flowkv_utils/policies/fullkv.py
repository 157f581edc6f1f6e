"""FullKV: keep every token — the reference every other policy is compared with."""

from __future__ import annotations

import torch

from ..budgets import resolve_budget
from ..capture import Prefill
from ..selection import PolicyResult
from .base import Policy


class FullKV(Policy):
    name = "fullkv"
    uses_window = False
    role = "reference"

    @torch.no_grad()
    def __call__(self, pf: Prefill, budget=None) -> PolicyResult:
        """The budget is ignored (but still validated): FullKV always keeps all n tokens of every KV head."""
        s = pf.shape
        if budget is not None:
            resolve_budget(budget, pf.n, s.layers, s.kv_heads)  # same errors as every policy for a bad budget
        b = resolve_budget(pf.n, pf.n, s.layers, s.kv_heads)
        keep = torch.ones(s.layers, s.kv_heads, pf.n, dtype=torch.bool, device=pf.layers[0].k.device)
        return PolicyResult(self.name, b, keep, info={"full": True})

    def layer_scores(self, pf: Prefill, layer: int) -> torch.Tensor:  # keeps everything: every score equal
        return torch.zeros(pf.shape.kv_heads, pf.n, device=pf.layers[0].k.device)
