"""KV budgets: parsing, exact totals, and the allocation schedules of the layer-adaptive policies.

A budget B is the *average* number of kept tokens per KV head per layer, sinks and observation window included
(as in every official repository). A layer of G KV heads keeps B·G entries in total, the model B·G·L. It is given,
everywhere in the project (policies, sweeps, benchmarks, notebook parameters), in one of three forms:

    a token count (int ≥ 1) · a fraction of the prompt (float in (0, 1]) · "full" (`FULL`: keep everything)

`parse_budget` checks one and `budget_label` writes it the one way tables store it ("128", "0.05", "full");
fractions round so that the model total is exact. A token budget ≥ n keeps everything.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

FULL = "full"  # the budget that keeps the whole cache
BUDGET_HELP = 'a positive token count per KV head (int, e.g. 128), a fraction of the prompt in (0, 1] (float, e.g. 0.05) or "full"'


def parse_budget(budget) -> int | float | str:
    """Check a budget and return it in canonical form: int tokens, float fraction or FULL. Text from a table or a
    command line ("128", "0.05", "full") parses to the same values."""
    if isinstance(budget, str):
        text = budget.strip().lower()
        if text == FULL:
            return FULL
        try:
            budget = int(text) if text.lstrip("+").isdigit() else float(text)
        except ValueError:
            raise ValueError(f"budget={budget!r}: must be {BUDGET_HELP}") from None
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget={budget!r}: must be {BUDGET_HELP}")
    if isinstance(budget, numbers.Integral):
        if budget <= 0:
            raise ValueError(f"budget={budget}: must be {BUDGET_HELP}")
        return int(budget)
    if not 0.0 < float(budget) <= 1.0:
        raise ValueError(f"budget={budget}: a fractional budget must lie in (0, 1]; token budgets are positive "
                         "integers (e.g. 64, 128, ... 2048)")
    return float(budget)


def budget_argument(text: str) -> int | float | str:
    """`parse_budget` as an argparse `type`: a bad budget is reported with `parse_budget`'s message (naming the
    value and what is allowed), not argparse's bare "invalid value"."""
    import argparse

    try:
        return parse_budget(text)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def budget_label(budget) -> str:
    """The one text form of a budget in tables: '128', '0.05', 'full'."""
    b = parse_budget(budget)
    return b if b == FULL else repr(b)


@dataclass(frozen=True)
class Budget:
    """A resolved budget for a prompt of n tokens in a model of L layers × G KV heads."""

    total: int  # kept (layer, KV head, token) entries in the whole model
    n: int
    layers: int
    kv_heads: int

    @property
    def per_head(self) -> float:
        """Average kept tokens per KV head per layer (the literature's budget axis)."""
        return self.total / (self.layers * self.kv_heads)

    @property
    def full(self) -> bool:
        return self.total >= self.n * self.layers * self.kv_heads

    def per_layer(self) -> torch.Tensor:
        """Layer totals (L,) of the uniform per-slot split (so per-layer and per-head policies spend the same
        entries in every layer); bottom layers take the remainder."""
        return self.per_slot().sum(1)

    def per_slot(self) -> torch.Tensor:
        """Uniform split over (layer, KV head) slots (L, G); entries differ by at most one token."""
        return split_evenly(self.total, self.layers * self.kv_heads).view(self.layers, self.kv_heads)

    def default_window(self, longest: int = 32) -> int:
        """The benchmarks' observation window: `longest` tokens, or half the smallest per-slot budget when that is
        less (the window is part of every head's budget)."""
        return min(longest, max(1, int(self.per_slot().min()) // 2))


def resolve_budget(budget: int | float | str, n: int, layers: int, kv_heads: int) -> Budget:
    """Turn a user budget (tokens per KV head, a fraction of the prompt, or "full") into an exact model total."""
    b = parse_budget(budget)
    per_head = float(n) if b == FULL else float(b) if isinstance(b, int) else b * n
    per_head = min(per_head, float(n))
    total = max(1, round(per_head * layers * kv_heads))
    return Budget(total=int(total), n=n, layers=layers, kv_heads=kv_heads)


def split_evenly(total: int, parts: int) -> torch.Tensor:
    """Integer shares of `total` over `parts` that differ by at most 1; the first ones get the remainder."""
    if isinstance(parts, bool) or not isinstance(parts, numbers.Integral) or parts < 1:
        raise ValueError(f"split_evenly: parts={parts!r}; must be a positive int")
    if isinstance(total, bool) or not isinstance(total, numbers.Integral) or total < 0:
        raise ValueError(f"split_evenly: total={total!r}; must be an int ≥ 0")
    base, rem = divmod(int(total), parts)
    out = torch.full((parts,), base, dtype=torch.long)
    out[:rem] += 1
    return out


def check_window(n: int, window: int, slot_budget_min: int, policy: str) -> None:
    """Errors for windows that do not fit: w ≥ n, or a budget that cannot hold the window it includes."""
    if window >= n:
        raise ValueError(f"{policy}: window={window} ≥ prompt length n={n}; the observation window must be "
                         f"shorter than the prompt (use window < {n})")
    if slot_budget_min < window:
        raise ValueError(f"{policy}: budget of {slot_budget_min} tokens per KV head is smaller than the "
                         f"window={window} it includes; use a budget ≥ {window} or a smaller window")


def pyramid_layer_budgets(selectable: int, layers: int, n_prefix: int, beta: int = 20,
                          window: int = 0) -> torch.Tensor:
    """PyramidKV's per-layer selectable budgets B'_ℓ (outside the window), bottom layer largest.

    selectable = B' = B − w (mean over layers); n_prefix = n − w tokens that can be selected; window = w, so
    that n = n_prefix + window. [lit] schedule: min = ⌊B'/β⌋, max = 2B' − min (capped at n − w, then
    min = 2B' − max), step = ⌊(max − min)/(L − 1)⌋, B'_ℓ = max − ℓ·step. If n < 2B' every layer uses B' (SnapKV,
    as the official `q_len < (max_capacity_prompt − window_size)·2`). [proj] flooring the step can only leave
    the schedule *over* L·B' (top layer ≥ min): the excess is taken back one token per layer from the top layer
    down, cyclically, so the model total is exactly L·B' and the schedule stays non-increasing with depth."""
    if layers == 1 or n_prefix + window < 2 * selectable:
        return torch.full((layers,), min(selectable, n_prefix), dtype=torch.long)
    lo = selectable // beta
    hi = 2 * selectable - lo
    if hi >= n_prefix:
        hi = n_prefix
        lo = 2 * selectable - hi
    step = (hi - lo) // (layers - 1)
    out = torch.tensor([hi - i * step for i in range(layers)], dtype=torch.long)
    return fill_to_total(out.flip(0), layers * selectable, cap=n_prefix).flip(0)  # top layer first


def fill_to_total(alloc: torch.Tensor, total: int, cap: int | torch.Tensor) -> torch.Tensor:
    """Add (or remove) single tokens, bottom entries first, until alloc sums to total, never exceeding cap
    nor going below 0. Used wherever flooring loses a few tokens."""
    alloc = alloc.clone()
    cap_t = torch.as_tensor(cap).expand_as(alloc)
    diff = int(total - alloc.sum())
    i = stalled = 0
    while diff != 0:
        j = i % len(alloc)
        if diff > 0 and alloc[j] < cap_t[j]:
            alloc[j] += 1
            diff -= 1
            stalled = 0
        elif diff < 0 and alloc[j] > 0:
            alloc[j] -= 1
            diff += 1
            stalled = 0
        else:
            stalled += 1
            if stalled >= len(alloc):  # a full pass moved nothing: every entry is at its cap (or at 0)
                raise ValueError(f"cannot place total={total} into {len(alloc)} slots capped at {cap}")
        i += 1
    return alloc


def _weights(weights: torch.Tensor, total: int, cap: int) -> torch.Tensor:
    """Non-negative float64 weights (all zero: equal), after checking that `total` fits under the caps."""
    if total > weights.numel() * cap:
        raise ValueError(f"total={total} exceeds {weights.numel()} × cap {cap}")
    w = weights.double().clamp_min(0)
    return w if w.sum() > 0 else torch.ones_like(w)


def proportional_shares(weights: torch.Tensor, total: int, cap: int) -> torch.Tensor:
    """Real-valued shares (float64) ∝ weights, each ≤ cap, summing to total (water-filling).

    Clipped entries give their excess to the unclipped ones in proportion to their weights (repeated until no
    entry exceeds cap). Adding an entry never increases the others' shares (CAKE's cascade relies on it)."""
    L, w = weights.numel(), _weights(weights, total, cap)
    alloc = torch.zeros(L, dtype=torch.double)
    free = torch.ones(L, dtype=torch.bool)
    remaining = float(total)
    while True:
        share = torch.zeros(L, dtype=torch.double)
        wf = w[free] if w[free].sum() > 0 else torch.ones_like(w[free])  # only zero weights left: equal split
        share[free] = wf / wf.sum() * remaining
        over = free & (share > cap)
        if not over.any():
            alloc[free] = share[free]
            break
        alloc[over] = cap
        remaining -= cap * int(over.sum())
        free &= ~over
        if not free.any():
            break
    return alloc


def proportional_allocation(weights: torch.Tensor, total: int, cap: int) -> torch.Tensor:
    """Integer allocation ∝ weights with each entry ≤ cap and an exact sum (CAKE's layer budgets):
    `proportional_shares`, then largest-remainder rounding (ties to the earlier entry) makes the total exact."""
    alloc = proportional_shares(weights, total, cap)
    base = torch.floor(alloc).long()
    rem = total - int(base.sum())
    order = torch.argsort(alloc - base, descending=True, stable=True)
    for j in order.tolist():
        if rem <= 0:
            break
        if base[j] < cap:
            base[j] += 1
            rem -= 1
    return fill_to_total(base, total, cap)


def _spread_evenly(alloc: torch.Tensor, amount: int, cap: int) -> torch.Tensor:
    """Add `amount` over the entries below cap: the same share to each, one more to the first (amount mod k)."""
    below = (alloc < cap).nonzero().flatten()
    if amount > 0 and below.numel():
        alloc[below] += amount // below.numel()
        alloc[below[: amount % below.numel()]] += 1
    return alloc


def even_excess_allocation(weights: torch.Tensor, total: int, cap: int) -> torch.Tensor:
    """Integer allocation ∝ weights with each entry ≤ cap and an exact sum, by CAKE's official rule
    (antgroup/cakekv, cake/utils.py `adjust_budgets`): shares truncated to integers; entries over cap clipped and
    their excess spread *evenly* over the entries below cap (the first ones take the remainder); then the
    truncation shortfall spread the same way. [proj] Where an even share pushes an entry past cap (the official
    code then clips it when evicting and spends less than the total), the excess is spread again, until none is
    over, so the total stays exact. `proportional_allocation` is the project's rule (excess ∝ weights)."""
    w = _weights(weights, total, cap)
    alloc = torch.floor(w / w.sum() * total).long()  # int() of non-negative floats, as np.array(..., dtype=int)
    excess = int((alloc - cap).clamp_min(0).sum())
    alloc = _spread_evenly(alloc.clamp_max(cap), excess, cap)
    alloc = _spread_evenly(alloc, total - int(alloc.sum()), cap)
    while (alloc > cap).any():
        excess = int((alloc - cap).clamp_min(0).sum())
        alloc = _spread_evenly(alloc.clamp_max(cap), excess, cap)
    return alloc
