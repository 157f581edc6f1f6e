"""AdaKV [lit] (Feng et al., 2024), kvpress-style safeguard with exact totals: head-adaptive budgets.

SnapKV scores; per layer every KV head is guaranteed its own top ⌊α·B'⌋ (α = 0.2, B' = B − w), then one top-k
over the flattened G·(n − w) scores of the layer fills the layer total G·B'. Each head keeps its window too.
Head budgets vary; the layer total does not.

`shares="kept"` takes the safeguard of the kept count B with the window inside, as kvpress's AdaKVPress
(`int(α·n_kept)` ranks the window first): max(0, ⌊α·B⌋ − w) prefix tokens per head — none at all while
α·B < w (B = 128, w = 32, α = 0.2: 25 < 32). `policies.KVPRESS["adakv"]` adds kvpress's pooling too."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture import Prefill
from ..selection import masked, rank_desc
from .base import SHARES, check_choice, check_param, share_of
from .snapkv import SnapKV

SHARES_HELP = ("'selectable' (shares of the B − w prefix tokens, the project's) or 'kept' (shares of the kept "
               "count B with the window inside, as kvpress)")


def adaptive_head_mask(scores: torch.Tensor, layer_total, floor, ranks: torch.Tensor | None = None) -> torch.Tensor:
    """(…, G, m) bool: each head's own top `floor`, then one top-k over the layer's flattened scores fills the layer
    total exactly. scores (…, G, m); layer_total and floor: ints or (…,) per layer; ranks: `rank_desc(scores)` when
    already known (memoised by the caller)."""
    G, m = scores.shape[-2:]
    dev = scores.device
    total = torch.as_tensor(layer_total).to(dev, non_blocking=True).reshape(-1, 1)
    floor = torch.as_tensor(floor).clamp(max=m).to(dev, non_blocking=True).reshape(-1, 1)
    lead = scores.shape[:-2]
    ranks = rank_desc(scores) if ranks is None else ranks
    keep = ranks < floor.view(*lead, 1, 1)  # exactly G·floor entries per layer (known without reading it back)
    rest = rank_desc(masked(scores, keep).reshape(-1, G * m)) < total - G * floor
    return keep | rest.view_as(keep)


@dataclass
class AdaKV(SnapKV):
    alpha: float = 0.2
    shares: str = "selectable"
    name = "adakv"
    head_adaptive = True
    recorded_when_set = ("pool", "shares")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_param(self.name, "alpha", self.alpha, isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1,
                    "a number in [0, 1] (share of each head's budget guaranteed to it)")
        check_choice(self.name, "shares", self.shares, SHARES, SHARES_HELP)

    def safeguard(self, layer_total: int, kv_heads: int) -> int:
        """Prefix tokens every head of a layer is guaranteed: ⌊α·B'⌋ with B' = ⌊layer_total / G⌋ (see `shares`)."""
        return share_of(self.alpha, layer_total // kv_heads, self.window, self.shares)

    def floors(self, totals: torch.Tensor, kv_heads: int) -> torch.Tensor:
        """(L',) the safeguard of each layer of totals (L',) (host integers: nothing waits for the GPU)."""
        return torch.tensor([self.safeguard(int(t), kv_heads) for t in totals], dtype=torch.long)

    def keep_layers(self, pf: Prefill | None, layers, S: torch.Tensor, slots: torch.Tensor):
        totals = torch.as_tensor(slots).sum(-1).cpu()
        return adaptive_head_mask(S, totals, self.floors(totals, S.shape[-2]), self.score_ranks(pf, layers, S)), S
