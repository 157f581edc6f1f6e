"""CAKE [lit] (Qin et al., 2025, "Cascading and adaptive KV cache eviction with layer preferences").

Layer preference from the window attention restricted to prefix columns A[:, :, :n − w]:
dispersion H_ℓ = −Σ A log(A + 1e-10) (over heads, window rows, columns), shift V_ℓ = Σ_{heads, j} Var_i A[i, j],
P_ℓ = H_ℓ^{1/τ₁} · V_ℓ^{1/τ₂}. Layer budgets ∝ P_ℓ (clipped to n − w per head, excess spread, exact total),
uniform over a layer's KV heads. Eviction indicator per query head I[j] = mean_i A[i, j] + γ·Var_i A[i, j]
(γ = 200; Var is torch's default unbiased variance over the w window rows), avg-pooled (k = 5), then group-mean.
τ₁ = τ₂ = 1 by default [proj] (CAKE tunes them per model, e.g. Llama-3.1-8B 1.6/0.4 at budget 1024).

Cascading (`cascade_budgets`): after layer m is prefilled the total is re-split over layers 0..m by P_0..P_m.
The real-valued shares only shrink as layers join (water-filling), but largest-remainder rounding of each step
could give a layer one token back; so [proj] the intermediate steps use the *ceiling* of the real shares (never
growing, ≥ the final allocation; the cache may briefly hold up to one extra entry per layer) and the last step
the exact one-shot allocation. Evicting at every step therefore ends at the one-shot keep-set (tested)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budgets import Budget, proportional_allocation, proportional_shares, split_evenly
from ..capture import Prefill
from .base import Policy, check_param, group_mean, pad_scores, pool1d, stack_layers, topk_per_row, with_window


def preference(A_prefix: torch.Tensor, tau1: float = 1.0, tau2: float = 1.0) -> float:
    """P_ℓ = H^{1/τ₁} · V^{1/τ₂} from (H, w, m) attention over the prefix columns."""
    A = A_prefix.double()
    ent = -(A * torch.log(A + 1e-10)).sum()
    var = A.var(dim=1).sum()
    return float(ent.clamp_min(0) ** (1.0 / tau1) * var.clamp_min(0) ** (1.0 / tau2))


def indicator(A_prefix: torch.Tensor, kv_heads: int, gamma: float = 200.0, kernel: int = 5) -> torch.Tensor:
    """I[j] = mean_i A[i, j] + γ·Var_i A[i, j], avg-pooled per query head, then group mean: (G, m)."""
    ind = A_prefix.mean(dim=1) + gamma * A_prefix.var(dim=1)  # (H, m)
    return group_mean(pool1d(ind, kernel, kind="avg"), kv_heads)


def layer_allocation(prefs: torch.Tensor, selectable: int, kv_heads: int, n_prefix: int) -> torch.Tensor:
    """(len(prefs), G) selectable budgets: layer totals ∝ preference (cap G·(n − w)), uniform over heads."""
    L = prefs.numel()
    totals = proportional_allocation(prefs, min(selectable, L * kv_heads * n_prefix), kv_heads * n_prefix)
    return torch.stack([split_evenly(int(t), kv_heads) for t in totals])


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
    name = "cake"

    def __post_init__(self) -> None:
        super().__post_init__()
        for k in ("tau1", "tau2"):
            v = getattr(self, k)
            check_param(self.name, k, v, isinstance(v, (int, float)) and v > 0, "a positive number (temperature)")
        check_param(self.name, "gamma", self.gamma, isinstance(self.gamma, (int, float)) and self.gamma >= 0,
                    "a number ≥ 0 (weight of the variance in the indicator)")
        check_param(self.name, "kernel", self.kernel, isinstance(self.kernel, int) and self.kernel >= 1
                    and self.kernel % 2 == 1, "an odd positive int (avg-pooling width; 1 = no pooling)")
        if self.window < 2:
            raise ValueError(f"{self.name}: window={self.window} is invalid; CAKE needs ≥ 2 window rows "
                             "(its variance over window rows is undefined for one row)")

    def select(self, pf: Prefill, b: Budget):
        w, G = self.window, b.kv_heads
        m = pf.n - w
        prefs, inds = [], []
        for li in range(b.layers):
            A = self.attn(pf, li)[..., :m]
            prefs.append(preference(A, self.tau1, self.tau2))
            inds.append(indicator(A, G, self.gamma, self.kernel))
        prefs_t = torch.tensor(prefs, dtype=torch.float64)
        slots = layer_allocation(prefs_t, self.selectable(b), G, m)  # (L, G)
        keeps = [with_window(topk_per_row(inds[li], slots[li]), w) for li in range(b.layers)]
        keep, sc = stack_layers(keeps, [pad_scores(s, w) for s in inds])
        return keep, sc, {"layer_budgets": (slots.sum(1) + G * w).tolist(), "preferences": prefs}
