"""LAVa [lit] (Shen et al., 2025, arXiv 2509.09754, "Layer-wise KV cache eviction with dynamic budget allocation";
official code github.com/MGDDestiny/Lava, adaptive_snapkv/monkeypatch/snapkv_utils.py `LavaKVCluster` and the
layer loop of adaptive_mistral_hijack_lava.py; defaults from experiments/*/eval_*_lava.sh: w = 32, max-pooling
k = 7, α = 0.2, GQA support on, no score normalisation, no skipped layers).

The paper scores entries by the loss they cause in the layer's attention output (the residual stream); the code's
score per query head is SnapKV's pooled window attention times the head's largest value L1 norm over the prefix (a
per-head scale, no W_O), and under GQA the max over the group:

    s_g[j] = max_{h∈g} maxpool_7(a_h)[j] · ν_g,     ν_g = max_{j' < n−w} ‖V_g[j']‖₁,     a_h[j] = mean_i A_h[i, j].

Layer budgets: the normalised entropy σ_ℓ = −Σ p log p / log(G·m) of the layer's flattened scores p = s/Σs; layer
totals ∝ σ_ℓ. Head budgets inside a layer of total T: c_g = head g's entries in the flattened top-T, then
B_g = (1 − α)·c_g + α·T/G (AdaKV's original safeguard rule); each head keeps its top B_g and its window.
Project departures (docs/method.md): exact totals (water-filling with a cap at n − w, largest-remainder rounding),
the floor α·T/G of the layer's own budget (the official code keeps α·B of the uniform budget), one-shot selection
(the official cascade, re-splitting the total after each layer, ends at the same keep-set)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..budgets import Budget, fill_to_total
from ..capture import Prefill
from ..selection import rank_desc
from .base import Policy, check_odd_kernel, check_param, pool1d
from .cake import layer_allocation


def lava_scores(A: torch.Tensor, v: torch.Tensor, kv_heads: int, window: int, kernel: int = 7,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """s_g[j] = max_{h∈g} maxpool_k(a_h)[j] · ν_g for the prefix j < n − w. A (H, w, n), v (G, n, d) → (G, n − w)
    in `dtype` (float32 for selection; the allocation asks for float64, accumulated without a float64 copy of A)."""
    H, w, n = A.shape
    m = n - window
    pooled = pool1d(A[:, :, :m].sum(1, dtype=dtype) / w, kernel)  # (H, m) window mean, per query head
    nu = v[:, :m].abs().sum(-1, dtype=dtype).amax(-1)  # (G,) the head's largest value L1 norm
    return pooled.view(kv_heads, H // kv_heads, m).amax(1) * nu.unsqueeze(-1)


def normalised_entropy(s: torch.Tensor) -> float:
    """σ = −Σ p log(p + 1e-16) / log(N) of p = s / (Σ s + 1e-16) over all N entries (0 for a single entry)."""
    flat = s.double().reshape(-1)
    if flat.numel() < 2:
        return 0.0
    p = flat / (flat.sum() + 1e-16)
    return float(-(p * torch.log(p + 1e-16)).sum() / math.log(flat.numel()))


def head_budgets(scores: torch.Tensor, total, alpha: float, flat_ranks: torch.Tensor | None = None) -> torch.Tensor:
    """(…, G) budgets of the heads of each layer: B_g = (1 − α)·c_g + α·total/G, c_g = head g's entries in the
    layer's flattened top-`total`, rounded by largest remainder (ties to the earlier head) so they sum to `total`
    (each ≤ m). scores (…, G, m); total: an int or (…,) per layer; flat_ranks: the ranks of each layer's flattened
    scores when already known. One read-back to the host for every layer together."""
    G, m = scores.shape[-2:]
    totals = torch.as_tensor(total).reshape(-1).cpu()
    if flat_ranks is None:
        flat_ranks = rank_desc(scores.flatten(-2)).view_as(scores)
    top = flat_ranks < totals.to(scores.device, non_blocking=True).view(*scores.shape[:-2], 1, 1)
    counts = top.sum(-1).reshape(-1, G).cpu()  # (L', G)
    return budgets_from_counts(counts, totals, alpha, m).view(*scores.shape[:-2], G)


def budgets_from_counts(counts: torch.Tensor, totals: torch.Tensor, alpha: float, m: int) -> torch.Tensor:
    """(L', G) head budgets B_g = (1 − α)·c_g + α·total/G from each head's count c_g (L', G) in its layer's flattened
    top-`total` (totals (L',)), largest-remainder rounded to the exact total, each ≤ m (`head_budgets`)."""
    G = counts.shape[-1]
    x = (1 - alpha) * counts.double() + (alpha * totals.double() / G).unsqueeze(-1)
    base = torch.floor(x).long()
    deficit = (totals - base.sum(-1)).clamp_min(0)
    base += rank_desc(x - base) < deficit.unsqueeze(-1)  # the largest remainders get one more
    base = base.clamp(0, m)
    for i in torch.nonzero(base.sum(-1) != totals).flatten().tolist():  # a no-op but for float noise at the cap
        base[i] = fill_to_total(base[i], int(totals[i]), m)
    return base


@dataclass
class LAVa(Policy):
    """LAVa: per-head value-scaled attention scores, entropy-driven layer budgets, AdaKV-style head budgets.
    kernel: max-pooling width; alpha: share of a layer's budget split evenly over its heads."""

    kernel: int = 7
    alpha: float = 0.2
    name = "lava"
    head_adaptive = True
    layer_adaptive = True
    output_aware = True
    streams = False  # layer budgets need every layer's entropy (the official cascade is not wired in layerwise.py)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_odd_kernel(self.name, self.kernel)
        check_param(self.name, "alpha", self.alpha, isinstance(self.alpha, (int, float))
                    and not isinstance(self.alpha, bool) and 0 <= self.alpha <= 1,
                    "a number in [0, 1] (share of a layer's budget split evenly over its heads)")

    def layer_scores(self, pf: Prefill, layer: int) -> torch.Tensor:
        """(G, n − w) LAVa scores of one layer."""
        return lava_scores(self.attn(pf, layer), pf.layers[layer].v, pf.shape.kv_heads, self.window, self.kernel)

    def sparsity(self, pf: Prefill, layer: int) -> float:
        """σ_ℓ of one layer, from its scores recomputed in float64 (so the rounding of the layer split is exact)."""
        return normalised_entropy(lava_scores(self.attn(pf, layer), pf.layers[layer].v, pf.shape.kv_heads,
                                              self.window, self.kernel, dtype=torch.float64))

    def allocate(self, pf: Prefill, b: Budget) -> tuple[torch.Tensor, dict]:
        """(L, G) slots: layer totals ∝ σ_ℓ (capped at G·(n − w), exact total), split evenly; `keep_layer` then
        re-splits each layer's total over its heads."""
        sig = [pf.memo(li, ("lava_sparsity", repr(self)), lambda li=li: self.sparsity(pf, li))
               for li in range(b.layers)]
        slots = self.layer_slots(sig, b, pf.n - self.window)
        return slots, {"layer_budgets": (slots.sum(1) + b.kv_heads * self.window).tolist(), "sparsity": sig}

    def layer_slots(self, sig: list[float], b: Budget, n_prefix: int) -> torch.Tensor:
        """(L, G) slots from the layers' σ_ℓ: layer totals ∝ σ_ℓ (capped at G·(n − w), exact total), split evenly."""
        return layer_allocation(torch.tensor(sig, dtype=torch.float64), self.selectable(b), b.kv_heads, n_prefix)

    def keep_layers(self, pf: Prefill | None, layers, S: torch.Tensor, slots: torch.Tensor):
        k = head_budgets(S, torch.as_tensor(slots).sum(-1), self.alpha, self.score_ranks(pf, layers, S, "layer"))
        return self.score_ranks(pf, layers, S) < k.to(S.device, non_blocking=True).unsqueeze(-1), S
