"""CAKE [lit] (Qin et al., 2025, "Cascading and adaptive KV cache eviction with layer preferences").

Layer preference from the window attention restricted to prefix columns A[:, :, :n − w]:
dispersion H_ℓ = −Σ A log(A + 1e-10) (over heads, window rows, columns), shift V_ℓ = Σ_{heads, j} Var_i A[i, j],
P_ℓ = H_ℓ^{1/τ₁} · V_ℓ^{1/τ₂}. Layer budgets ∝ P_ℓ (clipped to n − w per head, excess spread, exact total),
uniform over a layer's KV heads. Eviction indicator per query head I[j] = mean_i A[i, j] + γ·Var_i A[i, j]
(γ = 200; Var is torch's default unbiased variance over the w window rows), avg-pooled (k = 5), then group-mean.
τ₁ = τ₂ = 1 by default [proj] (CAKE tunes them per model, e.g. Llama-3.1-8B 1.6/0.4 at budget 1024).

`allocation="official"` reproduces antgroup/cakekv's budgets (cake/utils.py `adjust_budgets`): per-head layer
budgets ∝ P_ℓ truncated to integers, a clipped layer's excess spread *evenly* over the unclipped layers, the
truncation shortfall likewise, every KV head of a layer the same count (`budgets.even_excess_allocation`). The
default "project" spreads the excess in proportion to preference and splits each layer's entry total over its
heads with ±1 differences (`layer_allocation`); the two differ by up to hundreds of entries per layer once a
layer is clipped. The cascade (below) is the project's, for the default allocation.

Cascading (`cascade_budgets`): after layer m is prefilled the total is re-split over layers 0..m by P_0..P_m.
The real-valued shares only shrink as layers join (water-filling), but largest-remainder rounding of each step
could give a layer one token back; so [proj] the intermediate steps use the *ceiling* of the real shares (never
growing, ≥ the final allocation; the cache may briefly hold up to one extra entry per layer) and the last step
the exact one-shot allocation. Evicting at every step therefore ends at the one-shot keep-set (tested)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budgets import (
    Budget,
    even_excess_allocation,
    fill_to_total,
    proportional_allocation,
    proportional_shares,
    split_evenly,
)
from ..capture import Prefill
from .base import Policy, check_choice, check_odd_kernel, check_param, group_mean, pool1d

ALLOCATIONS = ("project", "official")


def preference_parts(A_prefix: torch.Tensor) -> torch.Tensor:
    """(2,) float64 [H, V]: the dispersion and shift sums of (H, w, m) prefix attention (sums over heads, so the
    parts of a tensor-parallel rank's heads add up to the layer's: `sharded_policies`)."""
    A = A_prefix.double()
    return torch.stack([-(A * torch.log(A + 1e-10)).sum(), A.var(dim=1).sum()])


def preference_of(parts: torch.Tensor, tau1: float = 1.0, tau2: float = 1.0) -> float:
    """P_ℓ = H^{1/τ₁} · V^{1/τ₂} from the parts [H, V] of `preference_parts`."""
    ent, var = parts[0], parts[1]
    return float(ent.clamp_min(0) ** (1.0 / tau1) * var.clamp_min(0) ** (1.0 / tau2))


def preference(A_prefix: torch.Tensor, tau1: float = 1.0, tau2: float = 1.0) -> float:
    """P_ℓ = H^{1/τ₁} · V^{1/τ₂} from (H, w, m) attention over the prefix columns."""
    return preference_of(preference_parts(A_prefix), tau1, tau2)


def indicator(A_prefix: torch.Tensor, kv_heads: int, gamma: float = 200.0, kernel: int = 5) -> torch.Tensor:
    """I[j] = mean_i A[i, j] + γ·Var_i A[i, j], avg-pooled per query head, then group mean: (G, m)."""
    ind = A_prefix.mean(dim=1) + gamma * A_prefix.var(dim=1)  # (H, m)
    return group_mean(pool1d(ind, kernel, kind="avg"), kv_heads)


def layer_allocation(prefs: torch.Tensor, selectable: int, kv_heads: int, n_prefix: int) -> torch.Tensor:
    """(len(prefs), G) selectable budgets: layer totals ∝ preference (cap G·(n − w)), uniform over heads."""
    L = prefs.numel()
    totals = proportional_allocation(prefs, min(selectable, L * kv_heads * n_prefix), kv_heads * n_prefix)
    return torch.stack([split_evenly(int(t), kv_heads) for t in totals])


def official_allocation(prefs: torch.Tensor, selectable: int, kv_heads: int, n_prefix: int) -> torch.Tensor:
    """(len(prefs), G) selectable budgets by antgroup/cakekv's rule: per-head layer budgets from
    `even_excess_allocation` over ⌊S/G⌋ (cap n − w), the same for every head of a layer. [proj] The S mod G
    entries a fractional budget leaves (0 for token budgets) go one per slot, bottom layer's heads first."""
    L = prefs.numel()
    S = min(selectable, L * kv_heads * n_prefix)
    per_head = even_excess_allocation(prefs, S // kv_heads, n_prefix)  # (L,)
    slots = fill_to_total(per_head.repeat_interleave(kv_heads), S, cap=n_prefix)
    return slots.view(L, kv_heads)


def cascade_budgets(prefs: torch.Tensor, selectable: int, kv_heads: int, n_prefix: int) -> list[torch.Tensor]:
    """Budgets after each prefill step m (list of (m+1, G)): the whole total re-split over layers 0..m.

    Steps m < L − 1 take the ceiling of the real shares (capped at G·(n − w)), split evenly over the heads; the
    last step is `layer_allocation`, the one-shot budgets. Every layer's budget is non-increasing in m."""
    L, cap = prefs.numel(), kv_heads * n_prefix
    out = []
    for m in range(L - 1):
        shares = proportional_shares(prefs[: m + 1], min(selectable, (m + 1) * cap), cap)
        totals = torch.ceil(shares - 1e-9).long().clamp(0, cap)  # 1e-9: float noise must not add a token
        out.append(torch.stack([split_evenly(int(t), kv_heads) for t in totals]))
    out.append(layer_allocation(prefs, selectable, kv_heads, n_prefix))
    return out


@dataclass
class CAKE(Policy):
    tau1: float = 1.0
    tau2: float = 1.0
    gamma: float = 200.0
    kernel: int = 5
    allocation: str = "project"
    name = "cake"
    recorded_when_set = ("allocation",)
    layer_adaptive = True
    streams = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for k in ("tau1", "tau2"):
            v = getattr(self, k)
            check_param(self.name, k, v, isinstance(v, (int, float)) and v > 0, "a positive number (temperature)")
        check_param(self.name, "gamma", self.gamma, isinstance(self.gamma, (int, float)) and self.gamma >= 0,
                    "a number ≥ 0 (weight of the variance in the indicator)")
        check_odd_kernel(self.name, self.kernel, "avg-pooling")
        check_choice(self.name, "allocation", self.allocation, ALLOCATIONS,
                     "'project' (excess ∝ preference, exact ±1 head split) or 'official' (antgroup/cakekv's "
                     "adjust_budgets: excess spread evenly, same budget for every head of a layer)")
        if self.window < 2:
            raise ValueError(f"{self.name}: window={self.window} is invalid; CAKE needs ≥ 2 window rows "
                             "(its variance over window rows is undefined for one row)")

    def layer_scores(self, pf: Prefill, layer: int) -> torch.Tensor:
        """(G, n − w) eviction indicator of one layer."""
        A = self.attn(pf, layer)[..., : pf.n - self.window]
        return indicator(A, pf.shape.kv_heads, self.gamma, self.kernel)

    def allocate(self, pf: Prefill, b: Budget) -> tuple[torch.Tensor, dict]:
        """(L, G) head slots ∝ layer preference; reads every layer's window attention first (so it does not
        stream here: the cascade of `cascade_budgets` is tested, not wired into the layer-wise compressor)."""
        m = pf.n - self.window
        prefs = [pf.memo(li, ("cake_preference", self.window, self.tau1, self.tau2),
                         lambda li=li: preference(self.attn(pf, li)[..., :m], self.tau1, self.tau2))
                 for li in range(b.layers)]
        slots = self.layer_slots(prefs, b, m)
        return slots, {"layer_budgets": (slots.sum(1) + b.kv_heads * self.window).tolist(), "preferences": prefs}

    def layer_slots(self, prefs: list[float], b: Budget, n_prefix: int) -> torch.Tensor:
        """(L, G) head slots from the layer preferences, by `allocation`."""
        allocate = layer_allocation if self.allocation == "project" else official_allocation
        return allocate(torch.tensor(prefs, dtype=torch.float64), self.selectable(b), b.kv_heads, n_prefix)
