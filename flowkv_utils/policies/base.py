"""What every policy shares: the result type, the base class and the selection helpers.

A policy turns a `Prefill` and a budget into a keep mask (L, G, n) over (layer, KV head, token). Everything is per
**KV head** (G heads), never per query head: each policy says how it aggregates the query heads of a group.
Ties are always broken towards the earlier token (stable sorts), so every selection is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..budgets import Budget, check_window, resolve_budget
from ..capture import Prefill


@dataclass
class PolicyResult:
    """keep[ℓ, g, j] is True when token j stays in KV head g of layer ℓ.

    scores: what the policy ranked by, (L, G, n) float32, NaN where a token is kept by rule (window, sinks) or
    not scored. values: per-layer replacement values (G, n, d) for merging policies (SmoothEvict), else None."""

    policy: str
    budget: Budget
    keep: torch.Tensor
    scores: torch.Tensor | None = None
    values: list[torch.Tensor] | None = None
    info: dict = field(default_factory=dict)

    @property
    def kept_per_head(self) -> torch.Tensor:  # (L, G)
        return self.keep.sum(-1)

    @property
    def kept_per_layer(self) -> torch.Tensor:  # (L,)
        return self.keep.sum((-1, -2))

    @property
    def total_kept(self) -> int:
        return int(self.keep.sum())


@dataclass
class Policy:
    """Base of all policies: validation, budget resolution and the FullKV short-cut live here once.

    Subclasses set `name` and implement `select(pf, budget) -> (keep, scores, info)`."""

    window: int = 32
    name = "policy"
    uses_window = True  # False for policies that keep no observation window (StreamingLLM, FullKV)

    def __post_init__(self) -> None:
        check_param(self.name, "window", self.window, isinstance(self.window, int) and self.window >= 1,
                    "a positive int (number of last prompt queries)")

    @torch.no_grad()
    def __call__(self, pf: Prefill, budget: int | float) -> PolicyResult:
        s = pf.shape
        b = resolve_budget(budget, pf.n, s.layers, s.kv_heads)
        if self.uses_window:
            if self.window >= pf.n:
                check_window(pf.n, self.window, int(b.per_slot().min()), self.name)
            if pf.window < self.window:
                raise ValueError(f"{self.name}: window={self.window} but the prefill captured only "
                                 f"{pf.window} window queries; prefill with window ≥ {self.window}")
            if not b.full:
                check_window(pf.n, self.window, int(b.per_slot().min()), self.name)
        if b.full:
            keep = torch.ones(s.layers, s.kv_heads, pf.n, dtype=torch.bool)
            return PolicyResult(self.name, b, keep, info={"full": True})
        keep, scores, info = self.select(pf, b)
        got = int(keep.sum())
        if got != b.total:  # every policy spends exactly the budget: a bug if not
            raise RuntimeError(f"{self.name} kept {got} entries, budget total is {b.total}")
        return PolicyResult(self.name, b, keep, scores, info.pop("values", None), info)

    def select(self, pf: Prefill, b: Budget):
        raise NotImplementedError

    # helpers shared by windowed policies -------------------------------------------------------------------
    def attn(self, pf: Prefill, layer: int) -> torch.Tensor:
        """Window attention of this policy's own window: the last `self.window` captured rows, (H, w, n)."""
        return pf.attn(layer)[:, -self.window:]

    def selectable(self, b: Budget) -> int:
        """Model-wide entries left for selection once every head's window is kept."""
        return b.total - self.window * b.layers * b.kv_heads

    def layer_selectable(self, b: Budget) -> torch.Tensor:
        """(L,) uniform per-layer selectable totals (the layer sums of the per-slot budgets, minus windows)."""
        return b.per_slot().sum(1) - self.window * b.kv_heads


def check_param(policy: str, name: str, value, ok: bool, allowed: str) -> None:
    """Raise ValueError naming the policy, the parameter, its bad value and what is allowed."""
    if not ok:
        raise ValueError(f"{policy}: {name}={value!r} is invalid; allowed: {allowed}")


def window_mass(A: torch.Tensor) -> torch.Tensor:
    """a_h[j] = mean over window rows of A_h[i, j]: (H, w, n) → (H, n)."""
    return A.mean(dim=1)


def group_mean(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Mean over the query heads of each KV group: (H, ...) → (G, ...)."""
    return x.view(kv_heads, x.shape[0] // kv_heads, *x.shape[1:]).mean(dim=1)


def pool1d(x: torch.Tensor, kernel: int, kind: str = "max") -> torch.Tensor:
    """1-D pooling along the last axis, stride 1, 'same' padding. kernel ≤ 1 is the identity."""
    if kernel <= 1:
        return x
    if kernel % 2 == 0:
        raise ValueError(f"pool kernel={kernel}: must be odd")
    f = F.max_pool1d if kind == "max" else F.avg_pool1d
    return f(x.unsqueeze(0) if x.dim() == 2 else x, kernel, stride=1, padding=kernel // 2).view_as(x)


def snap_scores(A: torch.Tensor, kv_heads: int, window: int, kernel: int = 7) -> torch.Tensor:
    """SnapKV: s_g[j] = maxpool_k(mean_{h∈g} a_h)[j] for the prefix j < n − w. (H, w, n) → (G, n − w)."""
    n = A.shape[-1]
    return pool1d(group_mean(window_mass(A), kv_heads)[:, : n - window], kernel)


def rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last axis, 0 = best; ties go to the earlier index."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))


def topk_per_row(scores: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Bool mask of the top-k[r] entries of each row r of scores (R, m); k may differ per row."""
    k = torch.as_tensor(k, device=scores.device).reshape(-1, *([1] * (scores.dim() - 1)))
    return rank_desc(scores) < k


def topk_flat(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (same shape) of the k best entries of the whole tensor (flattened, ties to earlier index)."""
    return topk_per_row(scores.reshape(1, -1), int(k)).view_as(scores)


def masked(scores: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """Scores with excluded entries pushed below everything (so they are never chosen by a top-k)."""
    return scores.masked_fill(exclude, float("-inf"))


def with_window(prefix_keep: torch.Tensor, window: int) -> torch.Tensor:
    """Append the always-kept window: (G, n − w) → (G, n)."""
    G = prefix_keep.shape[0]
    return torch.cat([prefix_keep, torch.ones(G, window, dtype=torch.bool, device=prefix_keep.device)], dim=-1)


def pad_scores(prefix_scores: torch.Tensor, window: int) -> torch.Tensor:
    """Append NaN for the window positions (kept by rule, not scored): (G, n − w) → (G, n)."""
    G = prefix_scores.shape[0]
    nan = torch.full((G, window), float("nan"), dtype=torch.float32, device=prefix_scores.device)
    return torch.cat([prefix_scores.float(), nan], dim=-1)


def stack_layers(keeps: list[torch.Tensor], scores: list[torch.Tensor] | None = None):
    """Stack per-layer (G, n) results into (L, G, n) CPU tensors."""
    keep = torch.stack([k.cpu() for k in keeps])
    sc = torch.stack([s.float().cpu() for s in scores]) if scores else None
    return keep, sc
