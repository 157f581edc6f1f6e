"""Direct, naive transcriptions of /work/shared/method.md §2-3: the ground truth the policy tests compare with.

Loops over layers and heads, plain-Python top-k by sorting, float64 throughout. Nothing from `flowkv_utils` is
used except `window_attention` (the one place attention weights are computed) — no scoring, pooling, budget or
selection helper of the package — so a shared bug cannot hide.

Every reference returns a `Ref`: keep (L, G, n) bool; scores (L, G, n) float64 with NaN where a token is kept by
rule (or None); ambiguous (L, G) bool marking rows whose selection hit a *near*-tie (two different values within
TIE_RTOL at a top-k boundary, where float32-vs-float64 rounding may legitimately flip the choice; exact ties are
broken deterministically and are compared); info (layer budgets, merged values, ...).

Choices the method leaves open, transcribed as the project makes them ([proj]):
- budget: model total = round(B·L·G), B = f·n for a fraction f, capped at n; slot (ℓ, g) gets ⌊total/LG⌋, plus
  one for the first (total mod LG) slots in (ℓ, g) row-major order; a layer's total is the sum of its slots.
- ties: the earlier index wins — token order within a head, flattened (g, j) within a layer, (ℓ, g, j) globally.
- pooling (SnapKV max, CAKE average): over the prefix columns j < n − w only (as the official code slices
  before pooling), width k, stride 1, 'same' padding; the average divides by k (padding counted, F.avg_pool1d).
- Var over window rows: unbiased (÷ (w − 1)), as torch.var in CAKE's code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from flowkv_utils.attention import window_attention

TIE_RTOL = 1e-4  # relative gap below which two different scores count as a near-tie (float32 vs float64)
ALLOC_RTOL = 1e-9  # the same for CAKE's float64 allocation


@dataclass
class Ref:
    keep: torch.Tensor  # (L, G, n) bool
    scores: torch.Tensor | None  # (L, G, n) float64, NaN where kept by rule
    ambiguous: torch.Tensor  # (L, G) bool
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- basics
def geometry(pf):
    """(L, H, G, d, D, n) read off the captures and the model weights."""
    c = pf.layers[0]
    H, _, d = c.q.shape
    G, n, _ = c.k.shape
    D = pf.model.model.layers[0].self_attn.o_proj.weight.shape[0]
    return len(pf.layers), H, G, d, D, n


def model_total(budget, n: int, L: int, G: int) -> int:
    """§3: B tokens per KV head per layer (or f·n), window included; model total B·G·L, exact."""
    B = float(budget) * n if isinstance(budget, float) else float(budget)
    return max(1, round(min(B, n) * L * G))


def slot_budgets(total: int, L: int, G: int) -> list[list[int]]:
    base, rem = divmod(total, L * G)
    return [[base + (1 if li * G + g < rem else 0) for g in range(G)] for li in range(L)]


def attention(pf, layer: int, w: int) -> torch.Tensor:
    """A (H, w, n) of the policy's window (the last w captured queries), float64."""
    c = pf.layers[layer]
    return window_attention(c.q, c.k, c.scaling)[:, -w:].double()


def w_o(pf, layer: int, h: int) -> torch.Tensor:
    """W_O^h (d, D) read straight from o_proj.weight (D, H·d)."""
    W = pf.model.model.layers[layer].self_attn.o_proj.weight.detach().double()
    d = pf.layers[layer].q.shape[-1]
    return W[:, h * d:(h + 1) * d].T


def top(items: list[tuple[float, tuple]], k: int) -> tuple[set, bool]:
    """The k best (value, key) items — larger value first, then the smaller key — and whether the boundary
    between the k-th and (k+1)-th is a near-tie."""
    order = sorted(items, key=lambda t: (-t[0], t[1]))
    k = max(0, min(k, len(order)))
    chosen = {key for _, key in order[:k]}
    amb = False
    if 0 < k < len(order) and math.isfinite(a := order[k - 1][0]):
        # values within TIE_RTOL of the k-th on both sides of the boundary, not all exactly equal: float32 may order
        # them otherwise (it can round them to one value, and then the smaller key wins), also where the k-th and
        # (k+1)-th themselves tie exactly (a run of max-pooled equal scores next to a near-equal run)
        def near(v):
            return math.isfinite(v) and abs(v - a) <= TIE_RTOL * max(abs(v), abs(a))
        inside = {v for v, _ in order[:k] if near(v)}
        outside = {v for v, _ in order[k:] if near(v)}
        amb = bool(outside) and len(inside | outside) > 1
    return chosen, amb


def pool(x: list[float], k: int, kind: str) -> list[float]:
    """1-D pooling of a list, width k, stride 1, 'same' padding (max ignores padding, avg divides by k)."""
    if k <= 1:
        return list(x)
    r, m = k // 2, len(x)
    out = []
    for j in range(m):
        win = x[max(0, j - r): min(m, j + r + 1)]
        out.append(max(win) if kind == "max" else sum(win) / k)
    return out


def new_ref(L: int, G: int, n: int) -> Ref:
    return Ref(torch.zeros(L, G, n, dtype=torch.bool), torch.full((L, G, n), float("nan"), dtype=torch.float64),
               torch.zeros(L, G, dtype=torch.bool))


def keep_window(ref: Ref, layer: int, w: int) -> None:
    ref.keep[layer, :, ref.keep.shape[-1] - w:] = True


# ---------------------------------------------------------------------------------------------------- scores
def snap_scores(pf, layer: int, w: int, kernel: int, pool_kind: str = "max") -> list[list[float]]:
    """s_g[j] = maxpool_k(mean_{h∈g} a_h)[j], j < n − w, a_h[j] = mean_i A_h[i, j] (group mean *before* pooling).
    pool_kind "avg": kvpress's SnapKVPress order instead — each query head's a_h average-pooled, then the group mean."""
    L, H, G, d, D, n = geometry(pf)
    r, m = H // G, n - w
    A = attention(pf, layer, w).tolist()
    if pool_kind == "avg":
        per_head = [pool([sum(A[h][i][j] for i in range(w)) / w for j in range(m)], kernel, "avg") for h in range(H)]
        return [[sum(per_head[h][j] for h in range(g * r, (g + 1) * r)) / r for j in range(m)] for g in range(G)]
    out = []
    for g in range(G):
        mean = []
        for j in range(m):
            tot = 0.0
            for h in range(g * r, (g + 1) * r):
                tot += sum(A[h][i][j] for i in range(w)) / w
            mean.append(tot / r)
        out.append(pool(mean, kernel, "max"))
    return out


def projected_l1(pf, layer: int, m: int) -> list[list[float]]:
    """pn_g[j] = mean_{h∈g} ‖V_g[j] W_O^h‖₁."""
    L, H, G, d, D, n = geometry(pf)
    r = H // G
    v = pf.layers[layer].v.double()
    out = []
    for g in range(G):
        tot = torch.zeros(m, dtype=torch.float64)
        for h in range(g * r, (g + 1) * r):
            tot += (v[g, :m] @ w_o(pf, layer, h)).abs().sum(-1)
        out.append((tot / r).tolist())
    return out


def flowkv_direct(pf, layer: int, w: int) -> torch.Tensor:
    """s_g[j] = ‖Σ_{h∈g} A_h[:, j] P_h[j, :]ᵀ‖_F with P_h = V_g W_O^h, for j < n − w: (G, n − w) float64.
    The w×D contribution of every entry is built explicitly (one outer product per head and token)."""
    L, H, G, d, D, n = geometry(pf)
    r, m = H // G, n - w
    A = attention(pf, layer, w)
    v = pf.layers[layer].v.double()
    out = torch.zeros(G, m, dtype=torch.float64)
    for g in range(G):
        contrib = torch.zeros(m, w, D, dtype=torch.float64)
        for h in range(g * r, (g + 1) * r):
            P = v[g, :m] @ w_o(pf, layer, h)  # (m, D)
            contrib += A[h, :, :m].T.unsqueeze(2) * P.unsqueeze(1)  # outer products A_h[:, j] P_h[j]ᵀ, (m, w, D)
        out[g] = contrib.flatten(1).norm(dim=1)
    return out


def flowkv_ablation_direct(pf, layer: int, w: int, form: str, p: int) -> torch.Tensor:
    """FlowKV's score ablations for j < n − w, (G, n − w) float64, from the explicit w×D contribution matrices
    C_h[j] = A_h[:, j] P_h[j, :]ᵀ of every query head h of the group (one outer product per head and token),
    with ‖·‖_p the entrywise p-norm of a matrix (p = 2: Frobenius):
      exact     ‖Σ_{h∈g} C_h[j]‖_p
      no_cross  (Σ_{h∈g} ‖C_h[j]‖_F²)^½   (the squared Frobenius norm of the sum, cross terms between heads dropped)
      per_head  Σ_{h∈g} ‖C_h[j]‖_p        (each head's rank-1 term on its own, summed)."""
    L, H, G, d, D, n = geometry(pf)
    r, m = H // G, n - w
    A = attention(pf, layer, w)
    v = pf.layers[layer].v.double()

    def norm(C):  # (m, w, D) → (m,): entrywise p-norm of each token's matrix
        return C.abs().pow(p).sum((1, 2)).pow(1 / p)

    out = torch.zeros(G, m, dtype=torch.float64)
    for g in range(G):
        per_head = []
        for h in range(g * r, (g + 1) * r):
            P = v[g, :m] @ w_o(pf, layer, h)  # (m, D)
            per_head.append(A[h, :, :m].T.unsqueeze(2) * P.unsqueeze(1))  # C_h[j], (m, w, D)
        if form == "exact":
            out[g] = norm(sum(per_head))
        elif form == "no_cross":
            out[g] = sum(C.square().sum((1, 2)) for C in per_head).sqrt()
        else:
            out[g] = sum(norm(C) for C in per_head)
    return out


def dkm_products(pf, layer: int, w: int) -> torch.Tensor:
    """‖A_h[:, j]‖ · ‖V_h[j] W_O^h‖ per head (only meaningful when G == H): (H, n − w)."""
    L, H, G, d, D, n = geometry(pf)
    A = attention(pf, layer, w)
    v = pf.layers[layer].v.double()
    return torch.stack([A[h, :, : n - w].norm(dim=0) * (v[h, : n - w] @ w_o(pf, layer, h)).norm(dim=1)
                        for h in range(H)])


# ---------------------------------------------------------------------------------------------------- policies
def fullkv(pf, budget=None, **_) -> Ref:
    L, H, G, d, D, n = geometry(pf)
    ref = new_ref(L, G, n)
    ref.keep[:] = True
    ref.scores = None
    return ref


def streamingllm(pf, budget, sinks: int = 4, **_) -> Ref:
    """First s sinks and the last B − s tokens of every head (s capped at the slot budget)."""
    L, H, G, d, D, n = geometry(pf)
    total = model_total(budget, n, L, G)
    ref = new_ref(L, G, n)
    ref.scores = None
    if total >= n * L * G:
        ref.keep[:] = True
        return ref
    slots = slot_budgets(total, L, G)
    for li in range(L):
        for g in range(G):
            b = slots[li][g]
            s = min(sinks, b)
            for j in range(n):
                ref.keep[li, g, j] = j < s or j >= n - (b - s)
    return ref


def _per_head_topk(pf, budget, w: int, scores_of) -> Ref:
    """Shared shape of SnapKV-like policies: per (ℓ, g) the top (slot − w) by scores_of(ℓ) plus the window."""
    L, H, G, d, D, n = geometry(pf)
    total = model_total(budget, n, L, G)
    ref = new_ref(L, G, n)
    if total >= n * L * G:
        ref.keep[:] = True
        return ref
    slots = slot_budgets(total, L, G)
    for li in range(L):
        s = scores_of(li)
        for g in range(G):
            chosen, amb = top([(s[g][j], (j,)) for j in range(n - w)], slots[li][g] - w)
            for (j,) in chosen:
                ref.keep[li, g, j] = True
            ref.scores[li, g, : n - w] = torch.tensor(s[g], dtype=torch.float64)
            ref.ambiguous[li, g] = amb
        keep_window(ref, li, w)
    return ref


def snapkv(pf, budget, window: int = 32, kernel: int = 7, pool: str = "max", **_) -> Ref:
    return _per_head_topk(pf, budget, window, lambda li: snap_scores(pf, li, window, kernel, pool))


def pyramid_schedule(Bp: int, L: int, n: int, w: int, beta: int) -> list[int]:
    """PyramidKV [lit] B'_ℓ, then [proj] the excess of the floored step (the schedule sums to ≥ L·B') taken back
    one token per layer from the top layer down, cyclically, so the total is exactly L·B'."""
    n_prefix = n - w
    if L == 1 or n < 2 * Bp:
        sched = [Bp] * L
    else:
        lo = Bp // beta
        hi = 2 * Bp - lo
        if hi >= n_prefix:
            hi = n_prefix
            lo = 2 * Bp - hi
        step = (hi - lo) // (L - 1)
        sched = [hi - li * step for li in range(L)]
    diff, i = L * Bp - sum(sched), 0
    while diff != 0:
        li = L - 1 - i % L
        if diff > 0 and sched[li] < n_prefix:
            sched[li] += 1
            diff -= 1
        elif diff < 0 and sched[li] > 0:
            sched[li] -= 1
            diff += 1
        i += 1
    return sched


def pyramidkv(pf, budget, window: int = 32, kernel: int = 7, beta: int = 20, pool: str = "max", **_) -> Ref:
    L, H, G, d, D, n = geometry(pf)
    w = window
    total = model_total(budget, n, L, G)
    ref = new_ref(L, G, n)
    if total >= n * L * G:
        ref.keep[:] = True
        return ref
    S = total - w * L * G
    Bp = S // (L * G)
    sched = pyramid_schedule(Bp, L, n, w, beta)
    slots = [[sched[li]] * G for li in range(L)]
    rem, i = S - L * G * Bp, 0  # [proj] fractional budgets: leftover entries to the bottom slots, one each
    while rem > 0:
        li, g = divmod(i % (L * G), G)
        if slots[li][g] < n - w:
            slots[li][g] += 1
            rem -= 1
        i += 1
    for li in range(L):
        s = snap_scores(pf, li, w, kernel, pool)
        for g in range(G):
            chosen, amb = top([(s[g][j], (j,)) for j in range(n - w)], slots[li][g])
            for (j,) in chosen:
                ref.keep[li, g, j] = True
            ref.scores[li, g, : n - w] = torch.tensor(s[g], dtype=torch.float64)
            ref.ambiguous[li, g] = amb
        keep_window(ref, li, w)
    ref.info["layer_budgets"] = [sum(slots[li]) + G * w for li in range(L)]
    return ref


def share(fraction: float, prefix: int, w: int, shares: str) -> int:
    """Prefix tokens a share stands for: ⌊f·B'⌋ of the selectable B' ("selectable"), or of the kept count B' + w
    whose first w are the window ("kept", kvpress): max(0, ⌊f·(B' + w)⌋ − w)."""
    if shares == "selectable":
        return math.floor(fraction * prefix)
    return max(0, math.floor(fraction * (prefix + w)) - w)


def adaptive_prefix(s: list[list[float]], layer_total: int, alpha: float, w: int = 0,
                    shares: str = "selectable") -> tuple[list[set], bool]:
    """AdaKV in one layer: each head's own top safeguard (α of B' = ⌊layer_total / G⌋, see `share`), then the
    flattened top over all (g, j) fills layer_total. Returns per-head chosen token sets and the near-tie flag."""
    G, m = len(s), len(s[0])
    safe = share(alpha, layer_total // G, w, shares)
    chosen = [set() for _ in range(G)]
    amb = False
    for g in range(G):
        c, a = top([(s[g][j], (j,)) for j in range(m)], safe)
        chosen[g] = {j for (j,) in c}
        amb |= a
    rest = [(s[g][j], (g, j)) for g in range(G) for j in range(m) if j not in chosen[g]]
    c, a = top(rest, layer_total - sum(len(x) for x in chosen))
    for g, j in c:
        chosen[g].add(j)
    return chosen, amb or a


def adakv(pf, budget, window: int = 32, kernel: int = 7, alpha: float = 0.2, pool: str = "max",
          shares: str = "selectable", **_) -> Ref:
    L, H, G, d, D, n = geometry(pf)
    w = window
    total = model_total(budget, n, L, G)
    ref = new_ref(L, G, n)
    if total >= n * L * G:
        ref.keep[:] = True
        return ref
    slots = slot_budgets(total, L, G)
    heads = []
    for li in range(L):
        s = snap_scores(pf, li, w, kernel, pool)
        chosen, amb = adaptive_prefix(s, sum(slots[li]) - G * w, alpha, w, shares)
        for g in range(G):
            for j in chosen[g]:
                ref.keep[li, g, j] = True
            ref.scores[li, g, : n - w] = torch.tensor(s[g], dtype=torch.float64)
        ref.ambiguous[li] = amb
        keep_window(ref, li, w)
        heads.append([len(c) + w for c in chosen])
    ref.info["head_budgets"] = heads
    return ref


def two_stage(base: list[float], crit: list[float], k: int, first: float, w: int = 0, shares: str = "selectable",
              at_least: int = 0) -> tuple[set, bool]:
    """CriticalKV in one head: the top k1 by base — k1 = `share` of first over k prefix tokens, raised to
    `at_least` — then the rest of k by crit among the others."""
    k1 = max(share(first, k, w, shares), at_least)
    s1, a1 = top([(base[j], (j,)) for j in range(len(base))], k1)
    rest = [(crit[j], (j,)) for j in range(len(base)) if (j,) not in s1]
    s2, a2 = top(rest, k - k1)
    return {j for (j,) in s1 | s2}, a1 or a2


def criticalkv(pf, budget, window: int = 32, kernel: int = 7, first_stage: float = 0.5, pool: str = "max",
               shares: str = "selectable", **_) -> Ref:
    L, H, G, d, D, n = geometry(pf)
    w = window
    total = model_total(budget, n, L, G)
    ref = new_ref(L, G, n)
    if total >= n * L * G:
        ref.keep[:] = True
        return ref
    slots = slot_budgets(total, L, G)
    for li in range(L):
        s = snap_scores(pf, li, w, kernel, pool)
        pn = projected_l1(pf, li, n - w)
        for g in range(G):
            crit = [(s[g][j] + 1e-4) * pn[g][j] for j in range(n - w)]
            chosen, amb = two_stage(s[g], crit, slots[li][g] - w, first_stage, w, shares)
            for j in chosen:
                ref.keep[li, g, j] = True
            ref.scores[li, g, : n - w] = torch.tensor(crit, dtype=torch.float64)
            ref.ambiguous[li, g] = amb
        keep_window(ref, li, w)
    return ref


def criticaladakv(pf, budget, window: int = 32, kernel: int = 7, alpha: float = 0.2, first_stage: float = 0.5,
                  pool: str = "max", shares: str = "selectable", **_) -> Ref:
    """AdaKV head budgets on attention, then CriticalKV's two stages inside each head's budget; with
    shares="kept" (kvpress) stage 1 holds at least the head's safeguard."""
    L, H, G, d, D, n = geometry(pf)
    w = window
    total = model_total(budget, n, L, G)
    ref = new_ref(L, G, n)
    if total >= n * L * G:
        ref.keep[:] = True
        return ref
    slots = slot_budgets(total, L, G)
    for li in range(L):
        s = snap_scores(pf, li, w, kernel, pool)
        pn = projected_l1(pf, li, n - w)
        layer_prefix = sum(slots[li]) - G * w
        heads, amb = adaptive_prefix(s, layer_prefix, alpha, w, shares)
        safe = share(alpha, layer_prefix // G, w, shares) if shares == "kept" else 0
        for g in range(G):
            crit = [(s[g][j] + 1e-4) * pn[g][j] for j in range(n - w)]
            chosen, a = two_stage(s[g], crit, len(heads[g]), first_stage, w, shares, safe)
            for j in chosen:
                ref.keep[li, g, j] = True
            ref.scores[li, g, : n - w] = torch.tensor(crit, dtype=torch.float64)
            ref.ambiguous[li, g] = amb or a
        keep_window(ref, li, w)
    return ref


# ---------------------------------------------------------------------------------------------------- CAKE
def cake_preference(pf, layer: int, w: int, tau1: float, tau2: float) -> float:
    """P_ℓ = H^{1/τ₁}·V^{1/τ₂}: H = −Σ A log(A + 1e-10), V = Σ_{h, j} Var_i A[h, i, j], prefix columns only."""
    L, H, G, d, D, n = geometry(pf)
    A = attention(pf, layer, w)[:, :, : n - w]
    ent = float(-(A * torch.log(A + 1e-10)).sum())
    At = A.transpose(1, 2).tolist()  # [h][j][i]
    var = 0.0
    for h in range(H):
        for j in range(n - w):
            col = At[h][j]
            mu = sum(col) / w
            var += sum((x - mu) ** 2 for x in col) / (w - 1)
    return max(ent, 0.0) ** (1 / tau1) * max(var, 0.0) ** (1 / tau2)


def cake_indicator(pf, layer: int, w: int, gamma: float, kernel: int) -> list[list[float]]:
    """I_h[j] = mean_i A[h, i, j] + γ·Var_i A[h, i, j], avg-pooled per query head, then the group mean."""
    L, H, G, d, D, n = geometry(pf)
    r, m = H // G, n - w
    At = attention(pf, layer, w).transpose(1, 2).tolist()  # [h][j][i]
    per_head = []
    for h in range(H):
        ind = []
        for j in range(m):
            col = At[h][j]
            mu = sum(col) / w
            ind.append(mu + gamma * sum((x - mu) ** 2 for x in col) / (w - 1))
        per_head.append(pool(ind, kernel, "avg"))
    return [[sum(per_head[h][j] for h in range(g * r, (g + 1) * r)) / r for j in range(m)] for g in range(G)]


def cake_layer_totals(prefs: list[float], S: int, cap: int) -> tuple[list[int], bool]:
    """Layer totals ∝ P_ℓ with each ≤ cap (excess spread over the unclipped layers in proportion), then
    largest-remainder rounding (ties to the earlier layer) so they sum to S exactly."""
    L = len(prefs)
    wts = [max(p, 0.0) for p in prefs]
    share = [0.0] * L
    free = list(range(L))
    remaining = float(S)
    while free:
        tot = sum(wts[li] for li in free)
        prop = {li: (wts[li] / tot if tot > 0 else 1 / len(free)) * remaining for li in free}
        over = [li for li in free if prop[li] > cap]
        if not over:
            for li in free:
                share[li] = prop[li]
            break
        for li in over:
            share[li] = float(cap)
        remaining -= cap * len(over)
        free = [li for li in free if li not in over]
    base = [math.floor(x) for x in share]
    fracs = [(share[li] - base[li], (li,)) for li in range(L)]
    rem = S - sum(base)
    order = sorted(fracs, key=lambda t: (-t[0], t[1]))
    amb = any(abs(x - round(x)) < ALLOC_RTOL * max(1.0, x) and x != round(x) for x in share)
    if 0 < rem < L:
        a, b = order[rem - 1][0], order[rem][0]
        amb |= a != b and abs(a - b) < ALLOC_RTOL
    for _, (li,) in order[:rem]:
        base[li] += 1
    assert sum(base) == S and max(base) <= cap, "rounding needed the cap fallback (measure-zero)"
    return base, amb


def cake_official_slots(prefs: list[float], S: int, G: int, cap: int) -> tuple[list[list[int]], bool]:
    """antgroup/cakekv's adjust_budgets on per-head budgets (total ⌊S/G⌋, cap n − w): int() of the shares;
    clip, the excess spread evenly over the layers below cap (the first take the remainder); the truncation
    shortfall the same way; [proj] spread again while an even share pushed a layer past cap. Every head of a layer
    the same; [proj] the S mod G left over go one per (ℓ, g) slot in row-major order, skipping full slots."""
    L = len(prefs)
    T = S // G
    wts = [max(p, 0.0) for p in prefs]
    if sum(wts) <= 0:
        wts = [1.0] * L
    tot = sum(wts)
    raw = [x / tot * T for x in wts]
    amb = any(abs(x - round(x)) < ALLOC_RTOL * max(1.0, x) for x in raw)  # truncation may flip in float
    b = [int(x) for x in raw]

    def spread(amount: int) -> None:
        below = [li for li in range(L) if b[li] < cap]
        if amount > 0 and below:
            q, r = divmod(amount, len(below))
            for i, li in enumerate(below):
                b[li] += q + (1 if i < r else 0)

    excess = sum(max(x - cap, 0) for x in b)
    b = [min(x, cap) for x in b]
    spread(excess)
    spread(T - sum(b))
    while any(x > cap for x in b):
        excess = sum(max(x - cap, 0) for x in b)
        b = [min(x, cap) for x in b]
        spread(excess)
    slots = [[b[li]] * G for li in range(L)]
    left, i = S - G * T, 0
    while left > 0:
        li, g = divmod(i % (L * G), G)
        if slots[li][g] < cap:
            slots[li][g] += 1
            left -= 1
        i += 1
    assert sum(map(sum, slots)) == S
    return slots, amb


def cake(pf, budget, window: int = 32, tau1: float = 1.0, tau2: float = 1.0, gamma: float = 200.0,
         kernel: int = 5, allocation: str = "project", **_) -> Ref:
    L, H, G, d, D, n = geometry(pf)
    w, m = window, n - window
    total = model_total(budget, n, L, G)
    ref = new_ref(L, G, n)
    if total >= n * L * G:
        ref.keep[:] = True
        return ref
    prefs = [cake_preference(pf, li, w, tau1, tau2) for li in range(L)]
    if allocation == "official":
        slots, amb = cake_official_slots(prefs, total - w * L * G, G, m)
    else:
        totals, amb = cake_layer_totals(prefs, total - w * L * G, G * m)
        slots = [[t // G + (1 if g < t % G else 0) for g in range(G)] for t in totals]  # ±1 over the KV heads
    for li in range(L):
        ind = cake_indicator(pf, li, w, gamma, kernel)
        for g in range(G):
            b = slots[li][g]
            chosen, a = top([(ind[g][j], (j,)) for j in range(m)], b)
            for (j,) in chosen:
                ref.keep[li, g, j] = True
            ref.scores[li, g, :m] = torch.tensor(ind[g], dtype=torch.float64)
            ref.ambiguous[li, g] = a or amb
        keep_window(ref, li, w)
    ref.info.update(preferences=prefs, layer_budgets=[sum(row) + G * w for row in slots])
    return ref


# ---------------------------------------------------------------------------------------------------- FlowKV
def flowkv_layer_scores(pf, layer: int, w: int, kernel: int, sinks: int, form: str = "exact",
                        p: int = 2) -> list[list[float]]:
    s = (flowkv_direct(pf, layer, w) if (form, p) == ("exact", 2) else flowkv_ablation_direct(pf, layer, w, form, p))
    s = s.tolist()
    s = [pool(row, kernel, "max") for row in s]
    return [[math.inf if j < sinks else x for j, x in enumerate(row)] for row in s]


def _nan_inf(row: list[float]) -> torch.Tensor:
    t = torch.tensor(row, dtype=torch.float64)
    return t.masked_fill(t.isinf(), float("nan"))


def flowkv(pf, budget, window: int = 32, sinks: int = 0, kernel: int = 1, form: str = "exact", p: int = 2,
           **_) -> Ref:
    """Layer-wise: flatten s over (g, j < n − w), keep the top G·(B − w) (sinks counted), plus every window."""
    L, H, G, d, D, n = geometry(pf)
    w = window
    total = model_total(budget, n, L, G)
    ref = new_ref(L, G, n)
    if total >= n * L * G:
        ref.keep[:] = True
        return ref
    slots = slot_budgets(total, L, G)
    for li in range(L):
        s = flowkv_layer_scores(pf, li, w, kernel, sinks, form, p)
        chosen, amb = top([(s[g][j], (g, j)) for g in range(G) for j in range(n - w)], sum(slots[li]) - G * w)
        for g, j in chosen:
            ref.keep[li, g, j] = True
        for g in range(G):
            ref.scores[li, g, : n - w] = _nan_inf(s[g])
        ref.ambiguous[li] = amb
        keep_window(ref, li, w)
    return ref


def layer_norm(pf, layer: int, norm: str, w: int, raw: list[list[float]]) -> float:
    """N0 1; N1 ‖O_ℓ‖_F and N2 ‖h_ℓ‖_F over the window rows; N3 the sum of the layer's (finite) scores."""
    c = pf.layers[layer]
    if norm == "N0":
        return 1.0
    if norm == "N1":
        return math.sqrt(sum(x * x for row in c.attn_out[-w:].double().tolist() for x in row))
    if norm == "N2":
        return math.sqrt(sum(x * x for row in c.resid[-w:].double().tolist() for x in row))
    return sum(x for row in raw for x in row if math.isfinite(x))


def flowkv_global(pf, budget, window: int = 32, sinks: int = 0, kernel: int = 1, norm: str = "N2",
                  head_floor: int = 0, form: str = "exact", p: int = 2, **_) -> Ref:
    """Normalised scores; optional per-head floor; one top over every (ℓ, g, j) fills G·L·(B − w)."""
    L, H, G, d, D, n = geometry(pf)
    w, m = window, n - window
    total = model_total(budget, n, L, G)
    ref = new_ref(L, G, n)
    if total >= n * L * G:
        ref.keep[:] = True
        return ref
    S = total - w * L * G
    s = []
    for li in range(L):
        raw = flowkv_layer_scores(pf, li, w, kernel, sinks, form, p)
        z = layer_norm(pf, li, norm, w, raw)
        s.append([[x / z for x in row] for row in raw])
    floor = min(head_floor, S // (L * G))
    chosen, amb = set(), False
    for li in range(L):
        for g in range(G):
            c, a = top([(s[li][g][j], (li, g, j)) for j in range(m)], floor)
            chosen |= c
            amb |= a
    c, a = top([(s[li][g][j], (li, g, j)) for li in range(L) for g in range(G) for j in range(m)
                if (li, g, j) not in chosen], S - len(chosen))
    for li, g, j in chosen | c:
        ref.keep[li, g, j] = True
    for li in range(L):
        for g in range(G):
            ref.scores[li, g, :m] = _nan_inf(s[li][g])
        keep_window(ref, li, w)
    ref.ambiguous[:] = amb or a
    ref.info["layer_budgets"] = ref.keep.sum((1, 2)).tolist()
    return ref


def smoothevict(pf, budget, window: int = 32, sinks: int = 0, kernel: int = 1, **_) -> Ref:
    """FlowKV's keep-set; each evicted (g, j) is merged into the kept (g, k) of highest key cosine (first kept
    index on ties): v_k ← (a_k v_k + Σ_{j→k} a_j v_j) / (a_k + Σ_{j→k} a_j), a = group-mean window mass."""
    ref = flowkv(pf, budget, window=window, sinks=sinks, kernel=kernel)
    L, H, G, d, D, n = geometry(pf)
    r, w = H // G, window
    values = []
    ref.info["merge_ambiguous"] = torch.zeros(L, G, dtype=torch.bool)  # two kept keys near-tied in cosine
    for li in range(L):
        k, v = pf.layers[li].k.double(), pf.layers[li].v.double()
        mass = attention(pf, li, w).mean(1).tolist()  # a_h[j], [h][j]
        out = v.clone()
        for g in range(G):
            a = [sum(mass[h][j] for h in range(g * r, (g + 1) * r)) / r for j in range(n)]
            kept = [j for j in range(n) if ref.keep[li, g, j]]
            gone = [j for j in range(n) if not ref.keep[li, g, j]]
            if not gone:
                continue
            num = {t: a[t] * v[g, t] for t in kept}
            den = {t: a[t] for t in kept}
            norms = k[g].norm(dim=1)
            cos_all = ((k[g, gone] @ k[g, kept].T) / norms[gone, None] / norms[None, kept]).tolist()
            for j, cos in zip(gone, cos_all, strict=True):
                t = kept[max(range(len(kept)), key=lambda i: (cos[i], -i))]
                best = sorted(cos, reverse=True)[:2]
                if len(best) == 2 and best[0] != best[1] and best[0] - best[1] < TIE_RTOL:
                    ref.info["merge_ambiguous"][li, g] = True
                num[t] = num[t] + a[j] * v[g, j]
                den[t] += a[j]
            for t in kept:
                out[g, t] = num[t] / den[t] if den[t] > 0 else v[g, t]
        values.append(out)
    ref.info["values"] = values
    return ref


REFERENCES = {
    "fullkv": fullkv, "streamingllm": streamingllm, "snapkv": snapkv, "pyramidkv": pyramidkv, "adakv": adakv,
    "criticalkv": criticalkv, "criticaladakv": criticaladakv, "cake": cake, "flowkv": flowkv,
    "flowkv_global": flowkv_global, "smoothevict": smoothevict,
}


def with_defaults(reference, **changed):
    """An ablation's reference: `reference` with some of its defaults changed (explicit arguments still win)."""
    return lambda pf, budget, **params: reference(pf, budget, **{**changed, **params})


REFERENCES.update(  # FlowKV's ablations: one default changed each
    flowkv_pool7=with_defaults(flowkv, kernel=7), flowkv_no_cross=with_defaults(flowkv, form="no_cross"),
    flowkv_per_head=with_defaults(flowkv, form="per_head"), flowkv_l1=with_defaults(flowkv, p=1),
    flowkv_sinks4=with_defaults(flowkv, sinks=4), flowkv_global_n0=with_defaults(flowkv_global, norm="N0"),
    flowkv_global_n1=with_defaults(flowkv_global, norm="N1"), flowkv_global_n3=with_defaults(flowkv_global, norm="N3"),
    flowkv_global_floor4=with_defaults(flowkv_global, head_floor=4),
)


# ---------------------------------------------------------------------------------------------- H2O, TOVA, KeyDiff
def h2o(pf, budget, window: int = 32, normalise: bool = False, **_) -> Ref:
    """s_g[j] = mean_{h∈g} Σ_{i<n} A_h[i, j] (every prompt query; ÷ (n − j) with normalise), j < n − w; top
    B − w plus the window. A: the full causal attention of the captured queries (one n × n map, fine here)."""
    L, H, G, d, D, n = geometry(pf)
    r = H // G

    def scores_of(li):
        c = pf.layers[li]
        A = window_attention(c.queries, c.k, c.scaling).double()  # (H, n, n), row i = query at position i
        col = [A[h].sum(dim=0).tolist() for h in range(H)]  # Σ_i A_h[i, j]
        seen = [n - j if normalise else 1 for j in range(n)]  # queries i ≥ j see token j
        return [[sum(col[h][j] for h in range(g * r, (g + 1) * r)) / r / seen[j] for j in range(n - window)]
                for g in range(G)]

    return _per_head_topk(pf, budget, window, scores_of)


def tova(pf, budget, **_) -> Ref:
    """s[j] = (1/H) Σ_h A_h[n − 1, j] over all n tokens, the same for every KV head; top B, no window."""
    L, H, G, d, D, n = geometry(pf)

    def scores_of(li):
        last = attention(pf, li, 1)[:, 0].tolist()  # [h][j]: the last prompt query's attention
        s = [sum(last[h][j] for h in range(H)) / H for j in range(n)]
        return [list(s) for _ in range(G)]

    return _per_head_topk(pf, budget, 0, scores_of)


def keydiff(pf, budget, **_) -> Ref:
    """s_g[j] = 1 − cos(k_j, μ_g) (kvpress ranks by −cos: same order), μ_g = (1/n) Σ_i k_i/‖k_i‖ over the
    head's keys (after RoPE); top B, no window."""
    L, H, G, d, D, n = geometry(pf)

    def scores_of(li):
        out = []
        for g in range(G):
            keys = pf.layers[li].k[g].double().tolist()  # [j][x]
            norms = [math.sqrt(sum(x * x for x in kj)) for kj in keys]
            mu = [sum(keys[j][x] / norms[j] for j in range(n)) / n for x in range(d)]
            mu_norm = math.sqrt(sum(x * x for x in mu))
            out.append([1.0 - sum(a * b for a, b in zip(keys[j], mu, strict=True)) / (norms[j] * mu_norm)
                         for j in range(n)])
        return out

    return _per_head_topk(pf, budget, 0, scores_of)


REFERENCES.update(h2o=h2o, tova=tova, keydiff=keydiff)


# ---------------------------------------------------------------------------------------------------- DefensiveKV
# github.com/FFY0/DefensiveKV, kvpress/presses/efficient_defensivekv_press.py (+ the layer variant's global top-k)
def top_near(items: list[tuple[float, tuple]], k: int) -> tuple[set, bool]:
    """`top`, with a near-tie flag that also sees clusters: float32 may round two close values to one, so a chosen
    and an unchosen value that differ but lie within TIE_RTOL of the boundary values make the choice ambiguous
    even when the k-th and (k+1)-th are an exact tie (stage-1 tokens at the layer maximum, scores clamped at a mean)."""
    chosen, amb = top(items, k)
    order = sorted(items, key=lambda t: (-t[0], t[1]))
    k = max(0, min(k, len(order)))
    if 0 < k < len(order):
        a, b = order[k - 1][0], order[k][0]
        near = lambda x, y: math.isfinite(x) and math.isfinite(y) and abs(x - y) <= TIE_RTOL * max(abs(x), abs(y))
        amb |= any(near(x, a) and x != a for x, _ in order[k:]) or any(near(x, b) and x != b for x, _ in order[:k])
    return chosen, amb


def defensive_layer(pf, layer: int, w: int, kernel: int, threshold: float, cap: int):
    """S'_g[j] of one layer, (G, n − w) as lists, and a near-tie flag of its first stage.

    Per query head h and window row i over the prefix columns: avg-pool (÷ k), rescale to the row's prefix mass;
    M_g[j] = max over h ∈ g and i; D = max(M, mean_j M); q_g[j] = pn_g[j] / Σ_g' pn_g'[j]; S = D·q. Stage 1 per head:
    tokens by mean attention ā_g (mean over h ∈ g and i, normalised over j), most first, while the running share
    stays below threshold − β (β = mean over h, i of the mass on the last w prefix columns), at most cap; they get
    max S of the layer."""
    L, H, G, d, D, n = geometry(pf)
    r, m = H // G, n - w
    A = attention(pf, layer, w).tolist()  # [h][i][j]
    R = [[None] * w for _ in range(H)]
    for h in range(H):
        for i in range(w):
            row = A[h][i][:m]
            pooled = pool(row, kernel, "avg")
            tot = sum(pooled)
            R[h][i] = [x / tot * sum(row) if tot > 0 else 0.0 for x in pooled]
    pn = projected_l1(pf, layer, m)
    S = []
    for g in range(G):
        M = [max(R[h][i][j] for h in range(g * r, (g + 1) * r) for i in range(w)) for j in range(m)]
        mean = sum(M) / m
        S.append([max(M[j], mean) * (pn[g][j] / sum(pn[x][j] for x in range(G))
                                     if sum(pn[x][j] for x in range(G)) > 0 else 0.0) for j in range(m)])
    bias = sum(sum(A[h][i][max(0, m - w):m]) for h in range(H) for i in range(w)) / (H * w)
    tau = threshold - bias
    smax = max(x for row in S for x in row)
    amb = False
    for g in range(G):
        abar = [sum(A[h][i][j] for h in range(g * r, (g + 1) * r) for i in range(w)) / (r * w) for j in range(m)]
        tot = sum(abar)
        p = [x / tot if tot > 0 else 0.0 for x in abar]
        order = sorted(range(m), key=lambda j: (-p[j], j))
        count, run = 0, 0.0
        for t, j in enumerate(order):
            run += p[j]
            amb |= abs(run - tau) < 1e-5  # the crossing itself is a near-tie (float32 vs float64)
            if run >= tau:
                count = t
                break
        count = min(count, cap)
        chosen, a = top_near([(p[j], (j,)) for j in range(m)], count)
        amb |= a
        for (j,) in chosen:
            S[g][j] = smax
    return S, amb


def defensivekv(pf, budget, window: int = 32, kernel: int = 5, threshold: float = 0.9, **_) -> Ref:
    """Per layer: stage 1 capped at the layer's smallest per-head slot minus w, then the flattened top over
    (g, j < n − w) fills Σ slots − G·w; plus every window."""
    L, H, G, d, D, n = geometry(pf)
    w = window
    total = model_total(budget, n, L, G)
    ref = new_ref(L, G, n)
    if total >= n * L * G:
        ref.keep[:] = True
        return ref
    slots = slot_budgets(total, L, G)
    for li in range(L):
        s, amb = defensive_layer(pf, li, w, kernel, threshold, min(slots[li]) - w)
        chosen, a = top_near([(s[g][j], (g, j)) for g in range(G) for j in range(n - w)], sum(slots[li]) - G * w)
        for g, j in chosen:
            ref.keep[li, g, j] = True
        for g in range(G):
            ref.scores[li, g, : n - w] = torch.tensor(s[g], dtype=torch.float64)
        ref.ambiguous[li] = amb or a
        keep_window(ref, li, w)
    return ref


def layer_defensivekv(pf, budget, window: int = 32, kernel: int = 5, threshold: float = 0.9, **_) -> Ref:
    """DefensiveKV's per-layer scores (stage 1 capped per layer as above), one top over every (ℓ, g, j) of the model
    fills G·L·(B − w) (no per-layer normalisation); plus every window."""
    L, H, G, d, D, n = geometry(pf)
    w, m = window, n - window
    total = model_total(budget, n, L, G)
    ref = new_ref(L, G, n)
    if total >= n * L * G:
        ref.keep[:] = True
        return ref
    slots = slot_budgets(total, L, G)
    s, amb = [], False
    for li in range(L):
        x, a = defensive_layer(pf, li, w, kernel, threshold, min(slots[li]) - w)
        s.append(x)
        amb |= a
    chosen, a = top_near([(s[li][g][j], (li, g, j)) for li in range(L) for g in range(G) for j in range(m)],
                    total - w * L * G)
    for li, g, j in chosen:
        ref.keep[li, g, j] = True
    for li in range(L):
        for g in range(G):
            ref.scores[li, g, :m] = torch.tensor(s[li][g], dtype=torch.float64)
        keep_window(ref, li, w)
    ref.ambiguous[:] = amb or a
    ref.info["layer_budgets"] = ref.keep.sum((1, 2)).tolist()
    return ref


# ---------------------------------------------------------------------------------------------------- LAVa
# github.com/MGDDestiny/Lava, adaptive_snapkv/monkeypatch/snapkv_utils.py (LavaKVCluster) + the hijack's layer loop
def lava_scores(pf, layer: int, w: int, kernel: int) -> list[list[float]]:
    """s_g[j] = max_{h∈g} maxpool_k(a_h)[j] · ν_g, ν_g = max_{j < n − w} Σ_d |V_g[j, d]|."""
    L, H, G, d, D, n = geometry(pf)
    r, m = H // G, n - w
    A = attention(pf, layer, w).tolist()
    v = pf.layers[layer].v.double().tolist()
    out = []
    for g in range(G):
        nu = max(sum(abs(x) for x in v[g][j]) for j in range(m))
        pooled = [pool([sum(A[h][i][j] for i in range(w)) / w for j in range(m)], kernel, "max")
                  for h in range(g * r, (g + 1) * r)]
        out.append([max(p[j] * nu for p in pooled) for j in range(m)])
    return out


def lava_sparsity(s: list[list[float]]) -> float:
    """Normalised entropy of the flattened scores: −Σ p log(p + 1e-16) / log N, p = s / (Σ s + 1e-16)."""
    flat = [x for row in s for x in row]
    if len(flat) < 2:
        return 0.0
    tot = sum(flat) + 1e-16
    return -sum(x / tot * math.log(x / tot + 1e-16) for x in flat) / math.log(len(flat))


def lava(pf, budget, window: int = 32, kernel: int = 7, alpha: float = 0.2, **_) -> Ref:
    """Layer totals ∝ σ_ℓ (CAKE's capped, exactly rounded split); in a layer of total T, c_g = head g's entries in
    the flattened top-T, B_g = (1 − α)c_g + α·T/G rounded by largest remainder (ties to the earlier head); each
    head keeps its top B_g and its window."""
    L, H, G, d, D, n = geometry(pf)
    w, m = window, n - window
    total = model_total(budget, n, L, G)
    ref = new_ref(L, G, n)
    if total >= n * L * G:
        ref.keep[:] = True
        return ref
    scores = [lava_scores(pf, li, w, kernel) for li in range(L)]
    sig = [lava_sparsity(s) for s in scores]
    totals, amb = cake_layer_totals(sig, total - w * L * G, G * m)
    for li in range(L):
        s, T = scores[li], totals[li]
        chosen, a = top_near([(s[g][j], (g, j)) for g in range(G) for j in range(m)], T)
        x = [(1 - alpha) * sum(1 for gg, _ in chosen if gg == g) + alpha * T / G for g in range(G)]
        k = [math.floor(t) for t in x]
        extra = sorted(range(G), key=lambda g: (-(x[g] - k[g]), g))[: T - sum(k)]
        for g in extra:
            k[g] += 1
        for g in range(G):
            c, b = top_near([(s[g][j], (j,)) for j in range(m)], k[g])
            for (j,) in c:
                ref.keep[li, g, j] = True
            ref.scores[li, g, :m] = torch.tensor(s[g], dtype=torch.float64)
            a |= b
        ref.ambiguous[li] = a or amb
        keep_window(ref, li, w)
    ref.info.update(layer_budgets=[t + G * w for t in totals], sparsity=sig)
    return ref


REFERENCES.update(defensivekv=defensivekv, layer_defensivekv=layer_defensivekv, lava=lava)
