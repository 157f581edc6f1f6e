"""What every policy shares: the base class that owns validation, the budget and the per-layer loop, and the
scoring helpers of the attention-based policies.

A policy turns a `Prefill` and a budget into a keep mask (L, G, n) over (layer, KV head, token). Everything is per
**KV head** (G heads), never per query head: each policy says how it aggregates the query heads of a group.
A policy supplies up to three small pieces, and `Policy.select` runs them for every layer:

    layer_scores(pf, ℓ)                  → (G, m) scores of the selectable prefix (m = n − w; w = 0 without a window)
                                           (budget-independent: computed once per prompt, `Policy.scores`)
    allocate(pf, b)                      → (L, G) selectable tokens per head, and info (default: uniform split)
    keep_layers(pf, layers, S, slots)    → ((L', G, m) bool kept prefix, (L', G, m) scores to show) of several
                                           layers at once, S (L', G, m), slots (L', G)  (default: by `rule`)

`keep_layers` is batched over layers (a sweep's selection is a few tensor operations per budget, not a loop of
small ones); `keep_layer` is the same for one layer (what the layer-wise compressor calls) and is not overridden.

A model-wide policy (scope "model": one top-k over every layer) gives `model_scores(pf, ℓ, b)` instead; the
layer-wise compressor runs the same pieces one layer at a time while prefilling (`layerwise.py`). What a policy *is*
is said by class attributes (role, head_adaptive, layer_adaptive, output_aware, scope, streams), which the sweep,
the compressor and the notebooks read: nowhere else lists policies by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..budgets import Budget, check_window, resolve_budget
from ..capture import Prefill
from ..selection import (
    PolicyResult,
    floor_first,
    pad_scores,
    rank_desc,
    shown,
    topk_flat,
    with_window,
)

__all__ = ["POOLS", "ROLES", "SHARES", "Policy", "PolicyResult", "check_choice", "check_odd_kernel", "check_param",
           "group_mean", "layer_topk", "pool1d", "share_of", "snap_scores", "window_mass"]

ROLES = ("reference", "baseline", "derived", "ablation")
POOLS = ("max", "avg")  # SnapKV-family pooling: "max" (SnapKV's LongBench setting, the project's) | "avg" (kvpress)
# what a policy's fractions (AdaKV's safeguard α, CriticalKV's first stage) are taken of: "selectable" the B − w
# prefix tokens (the project's), "kept" the kept count B with the window inside (kvpress); see `share_of`
SHARES = ("selectable", "kept")


@dataclass
class Policy:
    """Base of all policies: validation, budget resolution, the FullKV short-cut and the per-layer loop live here.

    Subclasses set `name` (and the category attributes below) and implement `layer_scores` (plus `allocate`
    and/or `keep_layer` where they differ from a uniform per-head top-k)."""

    window: int = 32
    name: ClassVar[str] = "policy"
    uses_window: ClassVar[bool] = True  # False: no observation window is kept (StreamingLLM, FullKV)
    # what the policy is — read by the sweep, the layer-wise compressor and the notebooks
    role: ClassVar[str] = "baseline"  # "reference" (FullKV) | "baseline" (published method) | "derived" (this project)
    # | "ablation" (a derived policy with one default changed, for ablation studies)
    head_adaptive: ClassVar[bool] = False  # heads of a layer compete: per-head budgets differ
    layer_adaptive: ClassVar[bool] = False  # layer totals differ
    output_aware: ClassVar[bool] = False  # scores read the values / W_O, not attention alone
    scope: ClassVar[str] = "layer"  # "layer": each layer selects alone; "model": one top-k over every layer
    streams: ClassVar[bool] = True  # can compress layer by layer during prefill (LayerwiseCompressor)
    in_study: ClassVar[bool] = True  # drawn in the study's figures and tables (variants may opt out)
    rule: ClassVar[str] = "head"  # the default keep_layer: "head" (per-head top-k) | "layer" (one top-k per layer)
    # what the policy needs from the prefill beyond the window (`policies.prefill_options` turns it into arguments)
    needs_all_queries: ClassVar[bool] = False  # every prompt query, not only the window's (H2O)
    # False: the keep-set needs more than the kept scores and slots (e.g. the layer's attention again, or scores that
    # depend on the budget), so LayerwiseCompressor.kept_counts cannot re-select at another budget from them
    budget_free_scores: ClassVar[bool] = True
    # parameters added after results were stored: a result row's policy_params names them only when they differ
    # from their defaults, so the stored rows keep their identity (`sweep.policy_params_json`)
    recorded_when_set: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        check_param(self.name, "window", self.window, isinstance(self.window, int) and not isinstance(
            self.window, bool) and self.window >= 1, "a positive int (number of last prompt queries)")

    @property
    def kept_window(self) -> int:
        """Tokens at the end of the prompt every head keeps by rule (the window; 0 without one)."""
        return self.window if self.uses_window else 0

    @torch.no_grad()
    def __call__(self, pf: Prefill, budget) -> PolicyResult:
        b = self.budget_for(pf.n, pf.shape.layers, pf.shape.kv_heads, budget)
        if self.uses_window and pf.window < self.window:
            raise ValueError(f"{self.name}: window={self.window} but the prefill captured only "
                             f"{pf.window} window queries; prefill with window ≥ {self.window}")
        if b.full:
            keep = torch.ones(b.layers, b.kv_heads, pf.n, dtype=torch.bool, device=pf.layers[0].k.device)
            return PolicyResult(self.name, b, keep, info={"full": True})
        keep, scores, info = self.select(pf, b)
        got = int(keep.sum())
        if got != b.total:  # every policy spends exactly the budget: a bug if not
            raise RuntimeError(f"{self.name} kept {got} entries, budget total is {b.total}")
        return PolicyResult(self.name, b, keep, scores, info.pop("values", None), info)

    def budget_for(self, n: int, layers: int, kv_heads: int, budget) -> Budget:
        """Resolve a budget for this policy, with the window errors every policy shares."""
        b = resolve_budget(budget, n, layers, kv_heads)
        if self.uses_window and (self.window >= n or not b.full):
            check_window(n, self.window, int(b.per_slot().min()), self.name)
        return b

    # the pieces a policy supplies ---------------------------------------------------------------------------
    def layer_scores(self, pf: Prefill, layer: int) -> torch.Tensor:
        """(G, m) scores of the selectable prefix of one layer (higher = keep)."""
        raise NotImplementedError(f"{self.name}: a policy implements layer_scores (or overrides select)")

    def allocate(self, pf: Prefill, b: Budget) -> tuple[torch.Tensor, dict]:
        """(L, G) selectable tokens per head (window excluded) and info; default: the uniform per-slot split."""
        return b.per_slot() - self.kept_window, {}

    def keep_layers(self, pf: Prefill | None, layers: Sequence[int], S: torch.Tensor,
                    slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept prefix (L', G, m) of `layers` given their scores S (L', G, m) — this policy's own `scores` — and
        per-head slots (L', G), and the scores to show. Default, by `rule`: "head" — each head its own top
        slots[ℓ, g]; "layer" — the heads of a layer compete, one top-k over its flattened (G, m) scores fills
        Σ_g slots[ℓ, g]. pf may be None (kept counts from scores alone, `head_counts`)."""
        slots = torch.as_tensor(slots).to(S.device, non_blocking=True)  # no wait for the GPU
        k = slots.unsqueeze(-1) if self.rule == "head" else slots.sum(-1).view(-1, 1, 1)
        return self.score_ranks(pf, layers, S, self.rule) < k, S

    def keep_layer(self, pf: Prefill | None, layer: int, scores: torch.Tensor,
                   slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`keep_layers` of one layer: scores (G, m), slots (G,) → ((G, m) kept prefix, (G, m) scores to show)."""
        keep, s = self.keep_layers(pf, [layer], scores.unsqueeze(0), torch.as_tensor(slots).unsqueeze(0))
        return keep[0], s[0]

    def head_counts(self, scores: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """(G,) prefix entries each head keeps, from its scores alone (the compressor's `kept_counts`)."""
        if not self.head_adaptive:
            return torch.as_tensor(slots).clone()
        return self.keep_layer(None, -1, scores, slots)[0].sum(-1)

    def model_scores(self, pf: Prefill, layer: int, b: Budget) -> torch.Tensor:
        """Scope "model" only: (G, m) scores of one layer, comparable across layers (one top-k over all)."""
        raise NotImplementedError(f"{self.name}: a model-wide policy implements model_scores")

    def model_floor(self, b: Budget) -> int:
        """Scope "model" only: prefix tokens every head keeps before the model-wide top-k (0: none)."""
        return 0

    def scores(self, pf: Prefill, layer: int) -> torch.Tensor:
        """`layer_scores`, computed once per prompt and reused by every budget (`Prefill.memo`, keyed by the
        policy's class and parameters). The returned tensor is shared: never modify it in place."""
        return pf.memo(layer, ("layer_scores", repr(self)), lambda: self.layer_scores(pf, layer))

    def stacked_scores(self, pf: Prefill, layers: Sequence[int]) -> torch.Tensor:
        """`scores` of `layers` stacked, (L', G, m) (memoised once per prompt for every layer)."""
        return pf.memo_layers(layers, ("layer_scores", repr(self)), lambda li: self.layer_scores(pf, li))

    def score_ranks(self, pf: Prefill | None, layers: Sequence[int], S: torch.Tensor,
                    rule: str = "head") -> torch.Tensor:
        """Ranks (0 = best, ties to the earlier token) of this policy's own scores S (L', G, m): per head ("head")
        or over each layer's flattened heads ("layer"). Budget-independent, so memoised with the prefill when S
        is every layer's `stacked_scores` (never pass other scores with pf: call `rank_desc`)."""
        def ranks():
            return rank_desc(S) if rule == "head" else rank_desc(S.flatten(-2)).view_as(S)

        if pf is None or list(layers) != list(range(len(pf.layers))):
            return ranks()
        return pf.memo(-1, ("ranks", rule, repr(self)), ranks)

    # the loop ---------------------------------------------------------------------------------------------
    def select(self, pf: Prefill, b: Budget):
        """Scores → kept prefix → + window, every layer at once. Returns (keep (L, G, n), shown scores (L, G, n),
        info). Scope "model": one top-k over every layer's `model_scores` (what `selection.GlobalCascade` reaches
        layer by layer while prefilling)."""
        w = self.kept_window
        if self.scope == "model":
            s = torch.stack([self.model_scores(pf, li, b) for li in range(b.layers)])  # (L, G, m)
            top = topk_flat(floor_first(s, self.model_floor(b)), self.selectable(b))
            keep, sc = with_window(top, w), pad_scores(shown(s), w)
            return keep, sc, {"layer_budgets": keep.sum((1, 2)).tolist()}
        slots, info = self.allocate(pf, b)
        layers = range(b.layers)
        S = self.stacked_scores(pf, layers)
        mask, s = self.keep_layers(pf, layers, S, slots)
        keep = with_window(mask, w)
        if s is S:  # the scores themselves: their padded form is budget-independent too
            sc = pf.memo(-1, ("shown_scores", repr(self)), lambda: pad_scores(shown(S), w))
        else:
            sc = pad_scores(shown(s), w)
        if self.layer_adaptive:
            info.setdefault("layer_budgets", keep.sum((1, 2)).tolist())
        return keep, sc, info

    # helpers shared by windowed policies -------------------------------------------------------------------
    def attn(self, pf: Prefill, layer: int) -> torch.Tensor:
        """Window attention of this policy's own window: the last `self.window` captured rows, (H, w, n)."""
        return pf.attn(layer)[:, -self.window:]

    def selectable(self, b: Budget) -> int:
        """Model-wide entries left for selection once every head's window is kept."""
        return b.total - self.kept_window * b.layers * b.kv_heads


def check_param(policy: str, name: str, value, ok: bool, allowed: str) -> None:
    """Raise ValueError naming the policy, the parameter, its bad value and what is allowed."""
    if not ok:
        raise ValueError(f"{policy}: {name}={value!r} is invalid; allowed: {allowed}")


def check_choice(policy: str, name: str, value, allowed: tuple[str, ...], help_text: str) -> None:
    """ValueError unless value is one of the allowed strings (help_text says what each means)."""
    check_param(policy, name, value, isinstance(value, str) and value in allowed, help_text)


def share_of(fraction: float, selectable: int, window: int, shares: str) -> int:
    """Tokens of the selectable prefix that a share `fraction` stands for, for a head keeping `selectable`
    prefix tokens plus its window w: ⌊f·B'⌋ ("selectable", B' = B − w, the project's) or
    max(0, ⌊f·(B' + w)⌋ − w) ("kept": the share is of the kept count B, whose first w are the window — kvpress's
    `int(n_kept · α)`, which ranks the window first, so the window uses up the first w of the share)."""
    if shares == "selectable":
        return int(fraction * selectable)
    return max(0, int(fraction * (selectable + window)) - window)


def check_odd_kernel(policy: str, kernel, what: str = "max-pooling") -> None:
    check_param(policy, "kernel", kernel, isinstance(kernel, int) and not isinstance(kernel, bool) and kernel >= 1
                and kernel % 2 == 1, f"an odd positive int ({what} width; 1 = no pooling)")


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


def snap_scores(A: torch.Tensor, kv_heads: int, window: int, kernel: int = 7, pool: str = "max") -> torch.Tensor:
    """SnapKV: s_g[j] = pool_k(mean_{h∈g} a_h)[j] for the prefix j < n − w (max-pooling by default; "avg" as
    kvpress, which pools each query head before the group mean — the same numbers, both being linear).
    (H, w, n) → (G, n − w)."""
    n = A.shape[-1]
    return pool1d(group_mean(window_mass(A), kv_heads)[:, : n - window], kernel, pool)


def layer_topk(scores: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The heads of each layer compete: one top-k over a layer's flattened (G, m) scores fills its total Σ_g slots.
    scores (…, G, m), slots (…, G) → (…, G, m) bool."""
    k = torch.as_tensor(slots).to(scores.device, non_blocking=True).sum(-1)[..., None, None]
    return rank_desc(scores.flatten(-2)).view_as(scores) < k
