"""DefensiveKV and Layer-DefensiveKV [lit] (Feng et al., ICLR 2026, "Taming the fragility of KV cache eviction";
official code github.com/FFY0/DefensiveKV, kvpress/presses/efficient_defensivekv_press.py and
efficient_layer_defensivekv_press.py, with the budgets of efficient_ada_scorer_press.py and
efficient_ada_global_scorer_press.py).

Defensive aggregation: a token's importance is its *worst case* over the window, not its mean. Per query head h and
window row i, the attention over the prefix (m = n − w columns) is average-pooled (k = 5) and rescaled so the row keeps
its prefix mass; then

    M_g[j] = max_{h∈g} max_i R_h[i, j],     D_g[j] = max(M_g[j], mean_j' M_g[j'])

(the max runs over the window rows *and* the query heads of the group; the floor at the head's mean leaves the
below-average tokens to be ranked by their values). CriticalKV's value term, normalised across the KV heads:
q_g[j] = pn_g[j] / Σ_g' pn_g'[j] with pn_g[j] = mean_{h∈g} ‖V_g[j] W_O^h‖₁; the score is S_g[j] = D_g[j]·q_g[j].
CriticalKV's stage 1 as the official code does it: per KV head, the tokens of the largest mean attention are taken,
most first, until their share of the head's prefix attention reaches 0.9 − β (β: the mean attention mass on the last
w prefix columns), at most the head's budget minus the window; they get the layer's largest score S_max.

DefensiveKV: one top-k over the flattened G·m scores of a layer fills its total (AdaKV-style head budgets, no
per-head safeguard). Layer-DefensiveKV: the same scores, one top-k over every (ℓ, g, j) of the model (no per-layer
normalisation: the scores are attention mass × a share of the value norm, comparable as they are).
Project departures (docs/method.md): exact budgets, the window kept by rule, ties to the earlier index."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budgets import Budget
from ..capture import Prefill
from ..selection import rank_desc
from .base import Policy, check_odd_kernel, check_param, layer_topk, pool1d
from .criticalkv import projected_value_l1


def defensive_attention(A: torch.Tensor, kv_heads: int, window: int, kernel: int = 5) -> torch.Tensor:
    """D_g[j]: worst-case (max over window rows and group heads) of the mass-preserving avg-pooled attention,
    floored at each head's mean. A (H, w, n) → (G, n − w)."""
    H, w, n = A.shape
    m = n - window
    P = A[:, :, :m]  # (H, w, m) prefix columns
    pooled = pool1d(P, kernel, kind="avg")  # per (head, window row), 'same' padding, ÷ k
    total = pooled.sum(-1, keepdim=True)
    R = torch.where(total > 0, pooled / total * P.sum(-1, keepdim=True), torch.zeros_like(pooled))  # keep row mass
    M = R.view(kv_heads, H // kv_heads, w, m).amax(dim=(1, 2))  # (G, m)
    return torch.maximum(M, M.mean(-1, keepdim=True))


def value_share(pf: Prefill, layer: int, m: int) -> torch.Tensor:
    """q_g[j] = pn_g[j] / Σ_g' pn_g'[j]: CriticalKV's projected-value L1 norm as a share across the KV heads, (G, m)."""
    pn = projected_value_l1(pf, layer, m)
    total = pn.sum(0, keepdim=True)
    return torch.where(total > 0, pn / total, torch.zeros_like(pn))


def bias_rows(A: torch.Tensor, window: int) -> torch.Tensor:
    """(H, w) attention mass of each query head and window row on the last w prefix columns; their mean is stage 1's
    β (`mass_order`). A (H, w, n)."""
    return A[:, :, : A.shape[-1] - window][..., -window:].sum(-1)


def mass_order(A: torch.Tensor, kv_heads: int, window: int, threshold: float,
               bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The budget-free part of stage 1: ((G, m) rank of each token's mean attention, most first; (G,) tokens taken
    before their share of the head's prefix attention reaches threshold − β). β = mean attention mass on the last
    w prefix columns, as the official code computes it (`bias_rows`; given as `bias` when A holds only some of the
    layer's heads, as on a tensor-parallel rank). A (H, w, n)."""
    H, w, n = A.shape
    m = n - window
    P = A[:, :, :m]
    abar = P.mean(1).view(kv_heads, H // kv_heads, m).mean(1)  # (G, m) mean over window rows and group heads
    p = abar / abar.sum(-1, keepdim=True)
    bias = bias_rows(A, window).mean() if bias is None else bias  # a 0-d tensor: no host synchronisation
    order = torch.sort(p, dim=-1, descending=True, stable=True).values
    reached = order.cumsum(-1) >= threshold - bias
    count = torch.where(reached.any(-1), reached.int().argmax(-1), 0)  # tokens before it
    return rank_desc(p), count


def first_stage_mask(ranks: torch.Tensor, counts: torch.Tensor, caps) -> torch.Tensor:
    """(…, G, m) bool: stage 1 from `mass_order`'s ranks (…, G, m) and counts (…, G), at most caps (…,) per head."""
    caps = torch.as_tensor(caps).clamp_min(0).to(counts.device, non_blocking=True)
    return ranks < torch.minimum(counts, caps.unsqueeze(-1)).unsqueeze(-1)


def mass_stage(A: torch.Tensor, kv_heads: int, window: int, threshold: float, cap: int) -> torch.Tensor:
    """(G, m) bool: per KV head the tokens of largest mean attention, taken until their share of the head's prefix
    attention reaches threshold − β, at most `cap` (`mass_order`, `first_stage_mask`). A (H, w, n)."""
    return first_stage_mask(*mass_order(A, kv_heads, window, threshold), cap)


@dataclass
class DefensiveKV(Policy):
    """DefensiveKV (per layer): defensive scores, stage-1 tokens first, then one top-k over the layer's heads.
    kernel: avg-pooling width; threshold: attention share of stage 1 (0.9 in the official code; 0 disables it)."""

    kernel: int = 5
    threshold: float = 0.9
    name = "defensivekv"
    head_adaptive = True
    output_aware = True
    budget_free_scores = False  # stage 1 needs the layer's window attention and the budget

    def __post_init__(self) -> None:
        super().__post_init__()
        check_odd_kernel(self.name, self.kernel, "avg-pooling")
        check_param(self.name, "threshold", self.threshold, isinstance(self.threshold, (int, float))
                    and not isinstance(self.threshold, bool) and 0 <= self.threshold <= 1,
                    "a number in [0, 1] (share of the attention mass taken first; 0: no first stage)")

    def layer_scores(self, pf: Prefill, layer: int) -> torch.Tensor:
        """(G, n − w) S_g[j] = D_g[j]·q_g[j], before stage 1."""
        m = pf.n - self.window
        return defensive_attention(self.attn(pf, layer), pf.shape.kv_heads, self.window, self.kernel) \
            * value_share(pf, layer, m)

    def with_first_stage(self, pf: Prefill, layers, S: torch.Tensor, caps) -> torch.Tensor:
        """Scores S (L', G, m) of `layers` with the stage-1 tokens (at most caps (L',) per head) raised to their
        layer's largest score. The stage-1 ranks and counts are budget-free: memoised once per prompt."""
        ranks, counts = pf.memo_layers(layers, ("defensive_stage1", self.window, self.threshold), lambda li: mass_order(
            self.attn(pf, li), pf.shape.kv_heads, self.window, self.threshold))
        first = first_stage_mask(ranks, counts, caps)
        return torch.where(first, S.amax((-2, -1), keepdim=True), S)

    def keep_layers(self, pf: Prefill | None, layers, S: torch.Tensor, slots: torch.Tensor):
        """Stage 1 capped at each layer's smallest per-head slot, then the flattened top-k fills Σ slots."""
        s = self.with_first_stage(pf, layers, S, torch.as_tensor(slots).amin(-1))
        return layer_topk(s, slots), s

    def head_counts(self, scores: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{self.name}: kept counts at another budget need each layer's window attention (stage 1), "
                         "which is gone after a compressing prefill; run the policy at that budget")


@dataclass
class LayerDefensiveKV(DefensiveKV):
    """Layer-DefensiveKV: DefensiveKV's scores (stage 1 included), one top-k over every (ℓ, g, j) of the model."""

    name = "layer_defensivekv"
    scope = "model"
    layer_adaptive = True

    def model_scores(self, pf: Prefill, layer: int, b: Budget) -> torch.Tensor:
        cap = int(b.per_slot()[layer].min()) - self.kept_window
        return self.with_first_stage(pf, [layer], self.scores(pf, layer).unsqueeze(0), [cap])[0]
