"""Policies on a tensor-parallel rank (`tensor_parallel`): each rank selects the keep-set of its own KV heads, and the
ranks' keep-sets, concatenated over heads, are exactly the unsharded one. `ShardedPolicy(policy, tp)(pf, budget)` runs
any registered policy so; `PLANS` says, per registered name, what the ranks exchange.

- "local" (no exchange): a head's keep-set depends only on that head — its scores (groups are whole on a rank) and
  its per-head budget, which depends only on the budget and n (the uniform split, PyramidKV's schedule). The rank runs
  the policy's own pieces on its heads with its share of the global (L, G) slots. StreamingLLM, H2O, KeyDiff, SnapKV,
  PyramidKV, CriticalKV (and FullKV).
- cross-head scores: all_gather the per-head rows the unsharded code reduces over heads (TOVA's last-query attention
  of every query head; DefensiveKV's projected-value norms, shared across KV heads, and its stage-1 bias rows) and
  reduce them in the unsharded order — rows of H·n or G·m numbers a layer, no head_dim axis, never the cache.
- layer statistics: all_gather each rank's partial sums, add them in rank order (CAKE's preference, LAVa's entropy,
  FlowKV-global's N3 sum); a layer's largest score (DefensiveKV's stage 1) is the max of the ranks' maxima.
- competitions across heads — one top-k over a layer's (g, j) (FlowKV and its layer-wise ablations, SmoothEvict,
  AdaKV, CriticalAdaKV, DefensiveKV, LAVa's head counts) or over the model's (ℓ, g, j) (FlowKV global and its
  ablations, Layer-DefensiveKV): the exact distributed top-k `sharded_topk`.

Exact distributed top-k. The unsharded selection ranks entries by score, ties to the earlier flat index in
(layer, head, token) order (stable sorts, `selection.rank_desc`). A rank holds a contiguous block of heads, so its
local flat order is the global order restricted to it. Each rank takes its k best entries (local ties to the earlier
index) as (value, global flat index) candidates; all_gather; every rank orders the N·k candidates by
(value desc, index asc) and keeps those of the first k that are its own. An entry of the global top-k has fewer than
k entries before it globally, so fewer locally: it is among its rank's candidates, and the result is exactly the
global top-k. Every decision is computed by every rank from the same gathered numbers, so the ranks always agree
(and the kept total is exactly the budget's, checked); they agree with the unsharded run as far as their scores do:
a shard's forward adds o_proj and MLP partials across ranks, so layers after the first differ from the unsharded
model by float rounding (the tests compare the keep-sets exactly on random-weight models). Cost: every rank receives
N·k (float32 value, int64 index) pairs per top-k — for one model-wide top-k that is 12·N bytes per kept entry
(k = 5% of 80 layers × 8 heads × 128K tokens: ≈4·10⁶ entries, ≈ 0.4 GB at N = 8); a threshold search over
all_reduced counts would send less, at the price of many rounds.

Layer by layer (`layerwise.LayerwiseCompressor(tp=...)`, while prefilling): a layer-scope plan selects one layer
alone (`ShardedPolicy.layer_keep`; those of CAKE, LAVa and SmoothEvict need every layer and refuse); a model-wide
plan gives each layer's scores (`ShardedPolicy.model_scores`) to a `ShardedCascade`, the running model-wide top-k of
`selection.GlobalCascade` merged by the exact distributed top-k at every layer — after each layer the ranks together
hold exactly the unsharded cascade's selection (one candidate exchange per layer instead of one per model).

Adding a policy: one line in `PLANS` — `LOCAL` if its keep-set of a head depends only on that head, else a plan
whose `select` mirrors `Policy.select` with the cross-head pieces replaced by the collectives above.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .budgets import Budget, resolve_budget
from .capture import Prefill
from .policies import REGISTRY, Policy
from .policies.cake import preference_of, preference_parts
from .policies.criticalkv import critical_scores, first_stage_counts, projected_value_l1, two_stage
from .policies.defensivekv import bias_rows, defensive_attention, first_stage_mask, mass_order
from .policies.lava import budgets_from_counts, lava_scores
from .selection import (
    GlobalCascade,
    PolicyResult,
    floor_first,
    masked,
    pad_scores,
    rank_desc,
    shown,
    with_window,
)

if TYPE_CHECKING:
    from .tensor_parallel import TensorParallel


# ------------------------------------------------------------------------------------ the exact distributed top-k
def local_candidates(scores: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kk best entries of each row of scores (R, M), ties to the earlier position: (values, positions) (R, kk)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True)
    return order.values[:, :kk], order.indices[:, :kk]


def choose_candidates(values: torch.Tensor, ids: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(N, R, c) bool: per row r the k[r] best of every rank's candidates (values, global ids (N, R, c)), ranked by
    value, ties to the smaller id — the unsharded `rank_desc` order."""
    N, R, c = values.shape
    v = values.permute(1, 0, 2).reshape(R, N * c)
    by_id = torch.argsort(ids.permute(1, 0, 2).reshape(R, N * c), dim=-1, stable=True)
    chosen = rank_desc(v.gather(-1, by_id)) < k.to(v.device).view(R, 1)  # in id order
    return torch.empty_like(chosen).scatter_(-1, by_id, chosen).view(R, N, c).permute(1, 0, 2)


def sharded_topk(scores: torch.Tensor, ids: torch.Tensor, k, tp: TensorParallel, ragged: bool = False) -> torch.Tensor:
    """(R, M) bool: this rank's part of each row's global top-k[r]. scores (R, M): the rank's entries of R rows;
    ids (M,) or (R, M): their global flat indices in the unsharded row (increasing along M); k: ints (R,) or one.
    ragged: M may differ across ranks (a cascade's held entries): the ranks first agree on the candidate count, and
    a rank with fewer entries pads its candidates with (−inf, largest index), which rank after every real entry."""
    R, M = scores.shape
    dev = scores.device
    k = torch.as_tensor(k, dtype=torch.long).reshape(-1).expand(R).cpu()
    mask = torch.zeros(R, M, dtype=torch.bool, device=dev)
    width = int(tp.all_gather(torch.tensor([M], device=dev)).max()) if ragged else M
    kk = min(int(k.max()), width) if R else 0
    if kk == 0:
        return mask
    vals, pos = local_candidates(scores.float(), min(kk, M))
    gid = ids.to(dev).expand(R, M).gather(-1, pos)
    if pos.shape[-1] < kk:
        short = kk - pos.shape[-1]
        vals = torch.cat([vals, vals.new_full((R, short), -math.inf)], -1)
        gid = torch.cat([gid, gid.new_full((R, short), torch.iinfo(torch.long).max)], -1)
    mine = choose_candidates(tp.all_gather(vals), tp.all_gather(gid), k)[tp.rank]  # (R, kk)
    return mask.scatter_(-1, pos, mine[:, : pos.shape[-1]])


def layer_topk(S: torch.Tensor, k, tp: TensorParallel) -> torch.Tensor:
    """(L, G/N, m) bool: the rank's part of each layer's one top-k[ℓ] over its flattened (G, m) scores (S: the rank's
    heads); global index in a layer (kv_start + g)·m + j."""
    L, g, m = S.shape
    ids = tp.kv_start * m + torch.arange(g * m, device=S.device)
    return sharded_topk(S.reshape(L, g * m), ids, k, tp).view_as(S)


def model_topk(S: torch.Tensor, k: int, tp: TensorParallel) -> torch.Tensor:
    """(L, G/N, m) bool: the rank's part of one top-k over every (ℓ, g, j) of the model; global index
    ℓ·G·m + (kv_start + g)·m + j."""
    L, g, m = S.shape
    dev = S.device
    ids = (torch.arange(L, device=dev).view(L, 1, 1) * (tp.kv_heads * m)
           + (tp.kv_start + torch.arange(g, device=dev)).view(1, g, 1) * m + torch.arange(m, device=dev))
    return sharded_topk(S.reshape(1, -1), ids.reshape(1, -1), [k], tp).view_as(S)


def gathered_sum(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Σ over ranks of x (partial sums), added in rank order from the gathered parts: the same on every rank."""
    return tp.all_gather(x).sum(0)


class ShardedCascade(GlobalCascade):
    """`selection.GlobalCascade` on a tensor-parallel rank: it holds the rank's part of the running model-wide top-k,
    and each `add` (collective: every rank adds the same layer together) merges by the exact distributed top-k over
    the ranks' held entries plus the new layer's, so after layer ℓ the ranks together hold exactly the unsharded
    cascade's selection (global index ℓ·G·m + (kv_start + g)·m + j, as `model_topk`). Every layer must have the same
    (G/N, m). Cost: per layer, every rank receives N·k' (value, index) pairs, k' ≤ k the most entries a rank holds
    (its part of the selection plus the new layer), and the ranks' counts first (they differ: `sharded_topk` ragged)."""

    def __init__(self, k: int, tp: TensorParallel):
        super().__init__(k)
        self.tp = tp
        self.layer_shape: tuple[int, int] | None = None

    def add(self, layer: int, scores: torch.Tensor) -> None:
        if self.layer_shape is None:
            self.layer_shape = tuple(scores.shape)
        elif tuple(scores.shape) != self.layer_shape:
            raise ValueError(f"ShardedCascade: layer {layer} has scores {tuple(scores.shape)}, earlier layers "
                             f"{self.layer_shape}: every layer needs the same (G/N, m)")
        super().add(layer, scores)

    def _best(self, vals: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        g, m = self.layer_shape
        layer_start = ids // (g * m) * (g * m)  # local id of the layer's first entry (layers are added in order)
        gid = ids + (self.tp.world_size - 1) * layer_start + self.tp.kv_start * m  # N·start + kv_start·m + offset
        top = sharded_topk(vals.view(1, -1), gid.view(1, -1), [self.k], self.tp, ragged=True)[0]
        return top.nonzero().view(-1)


# ------------------------------------------------------------------------------------------------------ the plans
@dataclass(frozen=True)
class Plan:
    """How a policy runs on a rank. select(policy, pf, b, tp, layers) → (kept prefix (L', G/N, m) of `layers`,
    scores to show (L', G/N, m) or None, per-layer replacement values or None); the window is appended by
    `ShardedPolicy`. A layer-scope plan selects any subset of layers alone (one layer at a time while prefilling,
    `layerwise.LayerwiseCompressor`), except those of policies that do not stream (they need every layer: an error
    otherwise). A model-wide plan selects every layer at once; its `model_scores(policy, pf, b, tp, ℓ)` gives one
    layer's (G/N, m) scores for `ShardedCascade` (the layer-wise path)."""

    select: Callable
    exchanges: str  # what the ranks exchange, in words (printed by the command line)
    model_scores: Callable | None = None

    @property
    def local(self) -> bool:
        return self.exchanges == "nothing"


def _slots(policy: Policy, pf: Prefill, b: Budget, layers) -> torch.Tensor:
    """(L', G) global slots of `layers` of an allocation that reads only the budget and n (uniform, PyramidKV)."""
    return torch.as_tensor(policy.allocate(pf, b)[0])[list(layers)]


def _whole(select: Callable) -> Callable:
    """A plan that needs every layer at once (its policy does not stream): selecting fewer is an error."""
    def whole(policy, pf, b, tp, layers):
        if list(layers) != list(range(b.layers)):
            raise ValueError(f"{policy.name} selects every layer at once (streams = False), not layers "
                             f"{list(layers)}: allowed layer by layer are the streaming policies")
        return select(policy, pf, b, tp, layers)

    return whole


def _local(policy, pf, b, tp, layers):
    mask, s = policy.keep_layers(pf, layers, policy.stacked_scores(pf, layers), tp.own(_slots(policy, pf, b, layers)))
    return mask, s, None


def _tova(policy, pf, b, tp, layers):
    g = tp.local_kv_heads

    def scores(li):  # the unsharded formula on every query head's last row, gathered in head order
        return tp.gather_heads(pf.attn(li)[:, -1]).mean(dim=0).expand(g, -1).contiguous()

    S = pf.memo_layers(layers, ("sharded_tova", tp.world_size), scores)
    mask, s = policy.keep_layers(None, layers, S, tp.own(_slots(policy, pf, b, layers)))
    return mask, s, None


def _layer(policy, pf, b, tp, layers):
    S = policy.stacked_scores(pf, layers)
    return layer_topk(S, _slots(policy, pf, b, layers).sum(-1), tp), S, None


def _smoothevict(policy, pf, b, tp, layers):
    mask, S, _ = _layer(policy, pf, b, tp, layers)
    return mask, S, policy.merged_values(pf, with_window(mask, policy.kept_window))


def _adakv_mask(policy, S: torch.Tensor, slots: torch.Tensor, tp) -> torch.Tensor:
    """`adakv.adaptive_head_mask` on a rank: each head's own top floor, then the layer's distributed top-k."""
    m = S.shape[-1]
    totals = slots.sum(-1)
    floors = policy.floors(totals, tp.kv_heads).clamp(max=m)  # (L,)
    keep = rank_desc(S) < floors.to(S.device).view(-1, 1, 1)
    return keep | layer_topk(masked(S, keep), totals - tp.kv_heads * floors, tp)


def _adakv(policy, pf, b, tp, layers):
    S = policy.stacked_scores(pf, layers)
    return _adakv_mask(policy, S, _slots(policy, pf, b, layers), tp), S, None


def _critical_adakv(policy, pf, b, tp, layers):
    S, slots = policy.stacked_scores(pf, layers), _slots(policy, pf, b, layers)
    heads = _adakv_mask(policy, S, slots, tp).sum(-1)  # (L, G/N): AdaKV's budgets of the rank's heads
    k1 = first_stage_counts(heads, policy.first_stage, policy.window, policy.shares)
    if policy.shares == "kept":
        k1 = torch.maximum(k1, policy.floors(slots.sum(-1), tp.kv_heads).to(k1.device).unsqueeze(-1))
    c = critical_scores(pf, layers, S)
    return two_stage(S, c, heads, k1), c, None


def _defensive_scores(policy, pf, tp, li: int) -> torch.Tensor:
    """(G/N, m) DefensiveKV scores of the rank's heads, the value share over every KV head from the gathered norms."""
    def compute():
        m = pf.n - policy.window
        pn = tp.gather_heads(projected_value_l1(pf, li, m))  # (G, m)
        total = pn.sum(0, keepdim=True)
        share = torch.where(total > 0, pn / total, torch.zeros_like(pn))[tp.kv_start: tp.kv_start + tp.local_kv_heads]
        return defensive_attention(policy.attn(pf, li), pf.shape.kv_heads, policy.window, policy.kernel) * share

    return pf.memo(li, ("sharded_defensive_scores", repr(policy), tp.world_size), compute)


def _defensive_first_stage(policy, pf, tp, layers, S: torch.Tensor, caps) -> torch.Tensor:
    """`DefensiveKV.with_first_stage` on a rank: β from every head's bias rows, the layer max over every rank."""
    def order(li):
        A = policy.attn(pf, li)
        bias = tp.gather_heads(bias_rows(A, policy.window)).mean()
        return mass_order(A, pf.shape.kv_heads, policy.window, policy.threshold, bias)

    ranks, counts = pf.memo_layers(layers, ("sharded_defensive_stage1", policy.window, policy.threshold,
                                            tp.world_size), order)
    first = first_stage_mask(ranks, counts, caps)
    top = tp.all_gather(S.amax((-2, -1), keepdim=True)).amax(0)  # (L', 1, 1) the layer's largest score
    return torch.where(first, top, S)


def _defensive(policy, pf, b, tp, layers):
    S = torch.stack([_defensive_scores(policy, pf, tp, li) for li in layers])
    slots = _slots(policy, pf, b, layers)
    s = _defensive_first_stage(policy, pf, tp, layers, S, slots.amin(-1))
    return layer_topk(s, slots.sum(-1), tp), s, None


def _model(scores: Callable, exchanges: str) -> Plan:
    """A model-wide plan: the rank's (L, G/N, m) scores from scores(policy, pf, b, tp, ℓ), each head's floor, one
    distributed top-k over every layer (layer by layer: the same scores into a `ShardedCascade`)."""
    def select(policy, pf, b, tp, layers):
        if list(layers) != list(range(b.layers)):
            raise ValueError(f"{policy.name} (model-wide) selects every layer at once; layer by layer it runs "
                             "through ShardedCascade (LayerwiseCompressor(tp=...))")
        s = torch.stack([scores(policy, pf, b, tp, li) for li in layers])
        return model_topk(floor_first(s, policy.model_floor(b)), policy.selectable(b), tp), s, None

    return Plan(select, exchanges, scores)


def _flowkv_global_scores(policy, pf, b, tp, li):
    """FlowKV-global's normalised scores: N0–N2 divide by replicated numbers (O and h are the whole layer's on every
    rank); N3's per-layer sum adds the ranks' partial sums."""
    if policy.norm != "N3":
        return policy.model_scores(pf, li, b)

    def compute():
        raw = policy.scores(pf, li)
        total = float(gathered_sum(raw[torch.isfinite(raw)].sum().view(1), tp))
        return raw / max(total, 1e-30)

    return pf.memo(li, ("sharded_normalised_scores", repr(policy), tp.world_size), compute)


def _layer_defensive_scores(policy, pf, b, tp, li):
    cap = int(b.per_slot()[li].min()) - policy.kept_window
    S = _defensive_scores(policy, pf, tp, li).unsqueeze(0)
    return _defensive_first_stage(policy, pf, tp, [li], S, [cap])[0]


def _cake(policy, pf, b, tp, layers):
    m = pf.n - policy.window

    def prefs(li):
        parts = gathered_sum(preference_parts(policy.attn(pf, li)[..., :m]), tp)
        return preference_of(parts, policy.tau1, policy.tau2)

    p = [pf.memo(li, ("sharded_cake_preference", policy.window, policy.tau1, policy.tau2, tp.world_size),
                 lambda li=li: prefs(li)) for li in range(b.layers)]
    layers = range(b.layers)
    mask, s = policy.keep_layers(pf, layers, policy.stacked_scores(pf, layers), tp.own(policy.layer_slots(p, b, m)))
    return mask, s, None


def _lava_sparsity(policy, pf, tp, li: int) -> float:
    """`lava.normalised_entropy` of the layer's scores over every rank's heads: the sum, then the entropy terms."""
    s = lava_scores(policy.attn(pf, li), pf.layers[li].v, pf.shape.kv_heads, policy.window, policy.kernel,
                    dtype=torch.float64).reshape(-1)
    count = s.numel() * tp.world_size
    if count < 2:
        return 0.0
    p = s / (gathered_sum(s.sum().view(1), tp) + 1e-16)
    ent = gathered_sum((p * torch.log(p + 1e-16)).sum().view(1), tp)
    return float(-ent / math.log(count))


def _lava(policy, pf, b, tp, layers):
    layers = range(b.layers)
    m = pf.n - policy.window
    sig = [pf.memo(li, ("sharded_lava_sparsity", repr(policy), tp.world_size),
                   lambda li=li: _lava_sparsity(policy, pf, tp, li)) for li in layers]
    totals = policy.layer_slots(sig, b, m).sum(-1)  # (L,)
    S = policy.stacked_scores(pf, layers)
    counts = layer_topk(S, totals, tp).sum(-1)  # (L, G/N): each head's entries in its layer's top-total
    heads = budgets_from_counts(tp.all_gather(counts).permute(1, 0, 2).reshape(b.layers, -1).cpu(), totals,
                                policy.alpha, m)
    return rank_desc(S) < tp.own(heads).to(S.device).unsqueeze(-1), S, None


FULL = Plan(None, "nothing")  # keeps everything: no selection at all
LOCAL = Plan(_local, "nothing")
LAYER = Plan(_layer, "the layer's top-k candidates (value, index)")
MODEL = _model(_flowkv_global_scores, "the model's top-k candidates; N3: the layers' score sums")

PLANS: dict[str, Plan] = {  # every registered policy, in registry order
    "fullkv": FULL,
    "streamingllm": LOCAL,
    "h2o": LOCAL,
    "tova": Plan(_tova, "the last query's attention rows of every query head"),
    "keydiff": LOCAL,
    "snapkv": LOCAL,
    "pyramidkv": LOCAL,
    "adakv": Plan(_adakv, "the layer's top-k candidates after the per-head safeguard"),
    "criticalkv": LOCAL,
    "criticaladakv": Plan(_critical_adakv, "the layer's top-k candidates after the per-head safeguard"),
    "defensivekv": Plan(_defensive, "projected-value norm rows, stage-1 bias rows, layer maxima, the layer's "
                                    "top-k candidates"),
    "layer_defensivekv": _model(_layer_defensive_scores, "projected-value norm rows, stage-1 bias rows, layer "
                                                         "maxima, the model's top-k candidates"),
    "lava": Plan(_whole(_lava), "the layers' score and entropy sums, the layer's top-k candidates, head counts"),
    "cake": Plan(_whole(_cake), "the layers' preference sums (dispersion, shift)"),
    "flowkv": LAYER,
    "flowkv_global": MODEL,
    "flowkv_pool7": LAYER,
    "flowkv_no_cross": LAYER,
    "flowkv_per_head": LAYER,
    "flowkv_l1": LAYER,
    "flowkv_sinks4": LAYER,
    "flowkv_global_n0": MODEL,
    "flowkv_global_n1": MODEL,
    "flowkv_global_n3": MODEL,
    "flowkv_global_floor4": MODEL,
    "smoothevict": Plan(_whole(_smoothevict), "the layer's top-k candidates"),
}


def plan_of(policy: Policy) -> Plan:
    """The policy's plan, by its registered name; an unregistered or unplanned policy is an error naming them."""
    name = policy.name
    if name not in PLANS or REGISTRY.get(name) is not type(policy):
        raise ValueError(f"policy {name!r} ({type(policy).__name__}) has no tensor-parallel plan: planned are "
                         f"{', '.join(PLANS)}; add it to sharded_policies.PLANS (LOCAL if a head's keep-set depends "
                         "only on that head)")
    return PLANS[name]


# ---------------------------------------------------------------------------------------------------- the wrapper
@dataclass
class ShardedPolicy:
    """A policy on tensor-parallel rank tp.rank: `__call__(pf, budget)` with pf the prefill of the rank's shard
    (`tensor_parallel.shard_model`) → its `PolicyResult` for the rank's G/N KV heads (keep (L, G/N, n)); the budget
    is the model's (resolved over all G heads), `result.budget` says so. Every rank must call it together."""

    policy: Policy
    tp: TensorParallel

    def __post_init__(self) -> None:
        self.plan = plan_of(self.policy)

    @torch.no_grad()
    def __call__(self, pf: Prefill, budget) -> PolicyResult:
        p, tp = self.policy, self.tp
        s = pf.shape
        if s.kv_heads != tp.local_kv_heads:
            raise ValueError(f"the prefill has {s.kv_heads} KV heads, rank {tp.rank} of {tp.world_size} holds "
                             f"{tp.local_kv_heads}: prefill the rank's shard (tensor_parallel.shard_model)")
        dev = pf.layers[0].k.device
        if self.plan is FULL:
            if budget is not None:
                resolve_budget(budget, pf.n, s.layers, tp.kv_heads)  # the same errors as every policy
            b = resolve_budget(pf.n, pf.n, s.layers, tp.kv_heads)
        else:
            b = p.budget_for(pf.n, s.layers, tp.kv_heads, budget)
            if p.uses_window and pf.window < p.window:
                raise ValueError(f"{p.name}: window={p.window} but the prefill captured only {pf.window} window "
                                 f"queries; prefill with window ≥ {p.window}")
        if self.plan is FULL or b.full:
            keep = torch.ones(s.layers, s.kv_heads, pf.n, dtype=torch.bool, device=dev)
            return PolicyResult(p.name, b, keep, info={"full": True, "rank": tp.rank, "world_size": tp.world_size})
        mask, scores, values = self.plan.select(p, pf, b, tp, range(b.layers))
        w = p.kept_window
        keep = with_window(mask, w)
        got = int(gathered_sum(keep.sum().view(1), tp))
        if got != b.total:  # every policy spends exactly the budget, over all ranks: a bug if not
            raise RuntimeError(f"{p.name} on {tp.world_size} ranks kept {got} entries, budget total is {b.total}")
        sc = None if scores is None else pad_scores(shown(scores), w)
        return PolicyResult(p.name, b, keep, sc, values, {"rank": tp.rank, "world_size": tp.world_size})

    # -- layer by layer, while prefilling (`layerwise.LayerwiseCompressor(tp=...)`); collective, like __call__ ------
    def layer_keep(self, pf: Prefill, li: int, b: Budget) -> torch.Tensor:
        """(G/N, m) kept prefix of layer li of a layer-scope policy (window not appended), b the model's budget
        (`Policy.budget_for` over all G KV heads); pf needs only layer li captured."""
        if self.policy.scope == "model":
            raise ValueError(f"{self.policy.name} is model-wide: layer by layer, add its model_scores to a cascade")
        return self.plan.select(self.policy, pf, b, self.tp, [li])[0][0]

    def model_scores(self, pf: Prefill, li: int, b: Budget) -> torch.Tensor:
        """A model-wide policy's (G/N, m) scores of layer li on this rank (what the unsharded `model_scores` gives
        for the rank's heads)."""
        if self.plan.model_scores is None:
            raise ValueError(f"{self.policy.name} is not model-wide (scope {self.policy.scope!r}): use layer_keep")
        return self.plan.model_scores(self.policy, pf, b, self.tp, li)

    def cascade(self, b: Budget) -> ShardedCascade:
        """The rank's `ShardedCascade` of a model-wide policy at budget b."""
        return ShardedCascade(self.policy.selectable(b), self.tp)
