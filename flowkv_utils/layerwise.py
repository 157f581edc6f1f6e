"""Compress while prefilling: evict layer by layer through `capture.prefill`'s `on_layer` hook, so the full KV
cache of a long prompt never exists at once (200K+ tokens on one GPU).

As soon as layer ℓ has run, the hook calls the policy's own pieces on it — `layer_scores` then `keep_layer` with the
slots of its `allocate` (window attention is (H, w, n): never an n × n matrix) — and packs the kept K/V into the
ragged layout (`cache.pack_layer`); the layer's dense K/V are then dropped. So any policy that says `streams = True`
compresses here, with exactly the keep-set it selects one-shot. A model-wide policy (scope "model", e.g. FlowKV
global) ranks every (ℓ, g, j) together: `selection.GlobalCascade` keeps the running global top-k of its
`model_scores` and evicts from earlier layers as later ones arrive, which gives exactly the one-shot selection
while holding ≈ budget + one layer. A policy that needs every prompt query (H2O) reads them from the layer's capture:
pass `**comp.prefill_options` to the prefill; they are dropped with the layer's K/V after the hook. Under tensor
parallelism (`tp=`, the model a rank's shard) each rank compresses its own KV heads with the cross-rank agreement of
`sharded_policies` (model-wide policies: `ShardedCascade`): the ranks' keep-sets together are the unsharded ones.

Host reads: each one makes Python wait until the device has run everything queued, and the GPU then idles while
Python launches what follows. The hook reads the device once per layer, for the applied policy's kept counts per
head (packing a variable number of rows needs them; for FlowKV global together with every earlier layer's, which
decide the re-packing), and with `overlap` (the default) that read does not wait: the counts go to pinned host
memory behind the layer's selection, and the layer is packed (and the layers its counts say are due re-packed) at
the start of the next layer's hook, by when the device has long passed that point while the next layer's forward
is still queued. So Python keeps ahead of the GPU and the hook costs the GPU work it launches, not its Python; the
price is one layer's dense K/V held one layer longer. Every size the packing needs follows from these counts, and
the other policies' counts stay on the device until `counts` is read (one read for the whole prefill). `seconds`
times each policy's scoring + selection without synchronising: on CUDA as spans of the GPU's timeline (events),
i.e. what each adds to the prefill; on the CPU as wall time.

    comp = LayerwiseCompressor(model, ids, "flowkv_global", 0.05, also=("snapkv", "flowkv"))
    pf = prefill(model, ids, window=32, chunk=8192, on_layer=comp, keep_kv=False, **comp.prefill_options)
    cache = comp.cache(capacity=64)          # RaggedCache of the kept entries
    comp.seconds                             # scoring + selection time per policy (GPU timeline on CUDA)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch.profiler import record_function

from .cache import RaggedCache, RaggedLayer, pack_layer, pack_positions
from .capture import LayerCapture, Prefill
from .models import shape_of
from .policies import REGISTRY, Policy, get_policy, prefill_options
from .selection import GlobalCascade, floor_first, topk_flat, true_positions, with_window

if TYPE_CHECKING:
    from .tensor_parallel import TensorParallel


def streaming_policies() -> list[str]:
    """Registered policies that can compress layer by layer (their `streams` attribute)."""
    return [name for name, cls in REGISTRY.items() if cls.streams]


class Spans:
    """Time per name, summed over spans, without synchronising: on CUDA each span is a pair of events on the current
    stream, so its time is the stretch of the GPU's timeline between them (the work launched inside, plus any wait
    for Python to launch it); on the CPU, where every op runs as it is called, wall time. `seconds()` waits for the
    recorded events (call it after the work is done)."""

    def __init__(self, names: tuple[str, ...]):
        self._cpu = {name: 0.0 for name in names}
        self._events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {name: [] for name in names}

    @contextmanager
    def __call__(self, name: str, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events[name].append((start, end))
            return
        t0 = time.perf_counter()
        yield
        self._cpu[name] += time.perf_counter() - t0

    def seconds(self) -> dict[str, float]:
        out = dict(self._cpu)
        for name, pairs in self._events.items():
            if pairs:
                pairs[-1][1].synchronize()  # events of one stream complete in order
                out[name] += sum(a.elapsed_time(b) for a, b in pairs) / 1e3
        return out


class _Held(NamedTuple):
    """A layer whose packing waits for its kept counts (`LayerwiseCompressor`, overlap): its dense K/V, the applied
    policy's (G, n) keep, and the counts on their way to the host (pinned memory, `ready` recorded behind them)."""
    li: int
    k: torch.Tensor
    v: torch.Tensor
    keep: torch.Tensor
    counts: torch.Tensor
    ready: torch.cuda.Event | None


def _read_later(x: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying x to the host without waiting: (host tensor, event to wait on before reading it; None on the
    CPU, where the copy is done)."""
    if not x.is_cuda:
        return x.clone(), None
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


DEFAULT_SLACK = 0.25  # FlowKV global's re-packing slack (`LayerwiseCompressor`): at most 1/(1 − 0.25) ≈ 1.33× held
WINDOW_ROW = -(1 << 62)  # cascade id of a packed window row: negative whatever layer offset is added (`kept_at`: kept)


class LayerwiseCompressor:
    """`on_layer` hook that compresses each layer as prefill produces it (see the module docstring).

    policy: the policy whose selection is applied (any registered name with `streams`, or a Policy instance);
    budget: tokens per KV head or a fraction of the prompt (as everywhere); also: policies whose scoring and
    selection are computed and timed on the same layers but not applied (overhead measurements); policy_params:
    {name: constructor kwargs} (window is always this compressor's); keep_scores: keep every layer's scores on the
    device, so `kept_counts` can give the per-head lengths of other budgets without another prefill; slack
    (model-wide policy applied): an earlier layer is re-packed only once the cascade has evicted more than this
    fraction of the prefix entries it holds (so it holds at most 1/(1 − slack) of what it keeps: default 0.25,
    ≤ 1.33×, for far fewer copies than re-packing at every eviction, slack 0). The last layer re-packs
    everything, so the final cache is the same for every slack; `repacks` counts the re-packs. overlap (default
    True): pack each layer at the start of the next layer's hook, from counts read without waiting (module
    docstring); False packs it in its own hook after a read that waits (one dense layer less held; the same cache).

    tp (`tensor_parallel.TensorParallel`): model is that rank's shard (`shard_model`, `random_shard`; its G/N KV
    heads) and every rank runs the prefill with its own compressor together: each layer's selection is the
    `sharded_policies.ShardedPolicy` plan of one layer (layer-scope policies), or the layer's sharded `model_scores`
    merged by a `sharded_policies.ShardedCascade` (model-wide ones), so the ranks' keep-sets, concatenated over heads,
    are the unsharded compressor's; budget is the model's (over all G KV heads); keep_mask, counts and the cache are
    the rank's heads. Not with keep_scores (kept_counts would re-select across ranks)."""

    def __init__(self, model, input_ids: torch.Tensor, policy: str, budget: int | float | str, window: int = 32,
                 also: tuple[str, ...] = (), keep_scores: bool = False, slack: float = DEFAULT_SLACK,
                 policy_params: dict[str, dict] | None = None, tp: TensorParallel | None = None,
                 overlap: bool = True):
        allowed = streaming_policies()
        for name in (policy, *also):
            if name not in allowed:
                raise ValueError(f"policy {name!r} cannot compress layer by layer: allowed are {', '.join(allowed)}")
        if not 0.0 <= slack < 1.0:
            raise ValueError(f"slack={slack!r}: allowed is 0 ≤ slack < 1 (fraction of a layer's entries evicted "
                             f"before it is re-packed)")
        ids = input_ids.view(1, -1)
        self.shape = shape_of(model)
        self.tp = tp
        L, G = self.shape.layers, self.shape.kv_heads  # G: this rank's KV heads under tensor parallelism
        if tp is not None:
            if G != tp.local_kv_heads:
                raise ValueError(f"the model has {G} KV heads, rank {tp.rank} of {tp.world_size} holds "
                                 f"{tp.local_kv_heads}: pass the rank's shard (tensor_parallel.shard_model)")
            if keep_scores:
                raise ValueError("keep_scores=True under tensor parallelism: kept_counts at other budgets would "
                                 "re-select across ranks (not implemented); run one compressor per budget")
        self.n = ids.shape[-1]
        self.window = window
        self.pf = Prefill(model=model, input_ids=ids, window=window, layers=[None] * L, logits=None)
        self.names = (policy, *[a for a in also if a != policy])
        self.main = policy
        params = policy_params or {}
        self.policies: dict[str, Policy] = {
            name: get_policy(name, **({} if REGISTRY[name].role == "reference" else {"window": window}),
                             **{k: v for k, v in params.get(name, {}).items() if k != "window"})
            for name in self.names}
        self.prefill_options = prefill_options(self.policies.values())  # what `capture.prefill` must capture
        G_all = G if tp is None else tp.kv_heads  # the budget is the model's, over every KV head
        self.budgets = {name: p.budget_for(self.n, L, G_all, budget) for name, p in self.policies.items()}
        self.budget = self.budgets[self.main]
        self.sharded = {}  # name → ShardedPolicy (tensor parallelism only)
        if tp is not None:
            from .sharded_policies import ShardedPolicy

            self.sharded = {name: ShardedPolicy(p, tp) for name, p in self.policies.items()
                            if not self._keeps_all(name)}
        self.slots = {name: p.allocate(self.pf, self.budgets[name])[0] for name, p in self.policies.items()
                      if not self._keeps_all(name) and tp is None}
        self.cascades = {name: (GlobalCascade(p.selectable(self.budgets[name])) if tp is None
                                else self.sharded[name].cascade(self.budgets[name]))
                         for name, p in self.policies.items() if p.scope == "model" and not self._keeps_all(name)}
        self._spans = Spans(self.names)  # scoring + selection per policy, summed over layers (`seconds`)
        self.overlap = overlap
        self._held: _Held | None = None  # the layer waiting for its counts (overlap)
        # CUDA: packings at which Python waited for the counts. With overlap that is every layer while Python runs a
        # layer ahead, and costs nothing: the GPU still has the next layer's forward queued behind the event
        self.waits = 0
        self.layers: list[RaggedLayer | None] = [None] * L
        self.prefix_keep: dict[int, torch.Tensor] = {}  # layer-scope main policy: the (G, n) keep of each packed layer
        # model-wide main policy, until the last layer: (N,) cascade id of each packed row (WINDOW_ROW: a window row),
        # which `_evict` re-packs by; and the (G·n,) ids of a layer's flat positions less its offset (`_flat_ids`)
        self.rows: dict[int, torch.Tensor] = {}
        self._ids: torch.Tensor | None = None
        self._lengths: dict[int, list[int]] = {}  # main policy: (G,) lengths (window included) each packed layer holds
        self.slack = slack
        self.repacks = 0  # re-packs of already packed layers: what the slack trades memory for
        self._counts: dict[str, torch.Tensor] = {name: torch.zeros(L, G, dtype=torch.long) for name in self.names}
        self._unread: dict[str, dict[int, torch.Tensor]] = {name: {} for name in self.names}  # (G,) on the device
        self.keep_scores = keep_scores
        self.scores: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}

    def _keeps_all(self, name: str) -> bool:
        return self.policies[name].role == "reference" or self.budgets[name].full

    # -- the hook ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, li: int, cap: LayerCapture) -> LayerCapture:
        self.pf.layers[li] = cap
        dev = cap.k.device
        self._settle()  # the previous layer, whose counts have reached the host by now (overlap)
        keep_main = None
        for name in self.names:
            with self._spans(name, dev), record_function(f"flowkv select {name}"):  # ranges: `bench scoring --profile`
                keep = self._select(name, li)  # (G, n) bool, or None: everything
            self.pf.forget(li)  # each policy pays its own window attention
            if keep is None:
                self._counts[name][li] = self.n
            elif name != self.main:
                self._unread[name][li] = keep.sum(-1)  # read with every other layer's when `counts` is asked for
            if name == self.main:
                keep_main = keep
        if keep_main is None:
            self.layers[li] = pack_layer(cap.k, cap.v)  # everything: nothing to count
        else:  # a model-wide policy's counts: every layer's (they decide the re-packing), else the layer's (G,)
            casc = self.cascades.get(self.main)
            counts, ready = _read_later(keep_main.sum(-1) if casc is None else casc.kept_table())
            self._held = _Held(li, cap.k, cap.v, keep_main, counts, ready)
            if not self.overlap or li == self.shape.layers - 1:
                self._settle()
        if self.tp is not None and li == self.shape.layers - 1 and not self._keeps_all(self.main):
            self._check_total()
        self.pf.layers[li] = None
        G, _, d = cap.k.shape
        empty = cap.k.new_empty(G, 0, d)  # fresh: a [:, :0] view would keep the layer's whole K alive
        return LayerCapture(q=cap.q, k=empty, v=cap.v.new_empty(G, 0, d), attn_out=cap.attn_out, resid=cap.resid,
                            scaling=cap.scaling)

    def _settle(self) -> None:
        """Pack the held layer with its counts (waiting for them if they are not on the host yet: with overlap they
        are, one hook later) and, for a model-wide policy, re-pack the earlier layers they say are due. The
        cascade's `alive` is still the held layer's: the next layer's merge has not been launched."""
        held, self._held = self._held, None
        if held is None:
            return
        if held.ready is not None:
            self.waits += not held.ready.query()
            held.ready.synchronize()
        table = held.counts.tolist()
        casc = self.cascades.get(self.main)
        if casc is None:
            self._lengths[held.li] = table
        else:
            with self._spans(self.main, held.k.device), record_function("flowkv re-pack earlier layers"):
                self._compact(casc, held.li, table)
        with record_function("flowkv pack layer"):
            self._pack(held.li, held.k, held.v, held.keep)

    def _select(self, name: str, li: int) -> torch.Tensor | None:
        """This layer's (G, n) keep of one policy, through the policy's own pieces (None: keeps everything)."""
        if self._keeps_all(name):
            return None
        p, pf = self.policies[name], self.pf
        w = p.kept_window
        if self.tp is not None and p.scope != "model":  # the rank's heads, agreed with the other ranks
            return with_window(self.sharded[name].layer_keep(pf, li, self.budgets[name]), w)
        if p.scope == "model":
            s = (p.model_scores if self.tp is None else self.sharded[name].model_scores)(pf, li, self.budgets[name])
            if self.keep_scores:
                self.scores[name].append(s)
            casc = self.cascades[name]
            with record_function("flowkv cascade add"):
                casc.add(li, floor_first(s, p.model_floor(self.budgets[name])))
            return with_window(casc.keep_mask(li), w)  # the main policy's re-packs follow its counts (`_settle`)
        s = p.layer_scores(pf, li)
        if self.keep_scores:
            self.scores[name].append(s)
        return with_window(p.keep_layer(pf, li, s, self.slots[name][li])[0], w)

    def _check_total(self) -> None:
        """Under tensor parallelism, after the last layer: the ranks together kept exactly the budget (as
        `ShardedPolicy` checks one-shot; a bug if not). Collective."""
        from .sharded_policies import gathered_sum

        got = int(gathered_sum(torch.tensor([sum(map(sum, self._lengths.values()))]), self.tp))
        if got != self.budget.total:
            raise RuntimeError(f"{self.main} layer by layer on {self.tp.world_size} ranks kept {got} entries, budget "
                               f"total is {self.budget.total}")

    @property
    def packed_prefix(self) -> dict[int, int]:
        """{layer: prefix entries (window excluded) it holds} of the applied policy's packed layers."""
        w = self.policies[self.main].kept_window
        return {li: sum(c) - w * len(c) for li, c in self._lengths.items()}

    def _compact(self, casc: GlobalCascade, li: int, table: list[list[int]]) -> None:
        """After layer li's merge, with the kept counts per head of every layer (`table`, the (layers, G) host copy of
        `kept_table`: the layer's one read; layer li's are what `_pack` packs it with): re-pack the packed layers that
        lost entries to the cascade: every one on the last layer, else only those whose dead entries exceed `slack`
        × their packed prefix. What is due, and every size, follows in Python ints from this one table: the re-packs
        need no further read."""
        w = self.policies[self.main].kept_window
        lengths = {lj: [c + w for c in row] for lj, row in zip(casc.offset, table, strict=True)}  # window included
        self._lengths[li] = lengths[li]
        final = li == self.shape.layers - 1
        held = self.packed_prefix
        due = []
        for lj in self.rows:
            dead = sum(self._lengths[lj]) - sum(lengths[lj])
            if dead > 0 and (final or dead > self.slack * held[lj]):
                due.append(lj)
        if due:
            self._evict(casc, due, lengths, final)
        if final:
            self.rows.clear()  # nothing re-packs after the last layer

    def _pack(self, li: int, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> None:
        """Pack layer li's dense K/V (G, n, d) to its keep (G, n) with its counts per head, already on the host
        (`_settle`, `_compact`). A model-wide policy's packed rows get their cascade ids (`rows`, from the same
        positions), by which `_evict` re-packs the layer; a layer-scope policy's keep is kept for `keep_mask`."""
        keep, lengths = keep.to(k.device), self._lengths[li]
        pos = true_positions(keep.reshape(-1), sum(lengths))  # flat g·n + j of the kept entries, head-major
        self.layers[li] = pack_positions(k, v, pos, lengths)
        if self.main not in self.cascades:
            self.prefix_keep[li] = keep
        elif li < self.shape.layers - 1:
            self.rows[li] = self._flat_ids(keep.device).index_select(0, pos).add_(self.cascades[self.main].offset[li])

    def _flat_ids(self, dev: torch.device) -> torch.Tensor:
        """(G·n,) for each flat position g·n + j of a layer: its entry's id in the main cascade less the layer's
        offset, g·m + j (the layer's scores are (G, m), m = n − window), or WINDOW_ROW for a window entry (j ≥ m).
        The same for every layer: made once."""
        if self._ids is None:
            m = self.n - self.policies[self.main].kept_window
            j = torch.arange(self.n, device=dev)
            ids = torch.arange(self.shape.kv_heads, device=dev).view(-1, 1) * m + j
            self._ids = torch.where(j < m, ids, WINDOW_ROW).view(-1)
        return self._ids

    def _evict(self, casc: GlobalCascade, due: list[int], lengths: dict[int, list[int]], final: bool) -> None:
        """Re-pack the packed layers `due` to the entries the cascade still keeps, with their new lengths per head
        (`lengths`: layer → (G,) ints, window included, from the layer's one read; due layers at least), in one batch: their rows' cascade ids together, one `kept_at` and one
        `true_positions` over them all (the count is the new lengths' sum), then per layer its slice of those
        positions, its K/V gathers and (unless final: nothing re-packs again) its rows' ids. Nothing waits for the
        device."""
        ids = torch.cat([self.rows[lj] for lj in due])
        new = [sum(lengths[lj]) for lj in due]
        pos = true_positions(casc.kept_at(ids), sum(new))  # the rows that stay, as positions in ids
        start = end = 0  # where the layer's rows start in ids, and its rows that stay in pos
        for lj, c in zip(due, new, strict=True):
            mine = pos[end: end + c]
            self.layers[lj].keep_positions(mine - start, lengths[lj])
            if not final:
                self.rows[lj] = ids.index_select(0, mine)  # a fresh tensor: no view keeps the batch's ids alive
            start, end = start + sum(self._lengths[lj]), end + c
            self._lengths[lj] = lengths[lj]
        self.repacks += len(due)

    # -- results -------------------------------------------------------------------------------------------
    @property
    def seconds(self) -> dict[str, float]:
        """{policy: scoring + selection summed over layers} (the applied model-wide policy's includes its re-packs):
        spans of the GPU's timeline on CUDA (`Spans`; waits for the events), wall time on the CPU."""
        return self._spans.seconds()

    @property
    def counts(self) -> dict[str, torch.Tensor]:
        """{policy: (L, G) kept tokens per head, window included, on the CPU}. The applied policy's are read while
        packing (it needs them); the other policies' stay on the device until asked for here, then every layer's
        are read at once. Model-wide policies not applied: final after `finish_counts`."""
        if self._lengths:  # the applied policy's, Python ints that sized its packing: written in one op
            self._counts[self.main][list(self._lengths)] = torch.tensor(list(self._lengths.values()))
        unread = [(name, li, c) for name, rows in self._unread.items() for li, c in rows.items()]
        if unread:
            values = torch.stack([c for _, _, c in unread]).cpu()  # one host read for every layer and policy
            for (name, li, _), c in zip(unread, values, strict=True):
                self._counts[name][li] = c
            for rows in self._unread.values():
                rows.clear()
        return self._counts

    def finish_counts(self) -> None:
        """Final per-head counts of model-wide policies not applied (their cascades evict after the layer passed);
        one host read per cascade."""
        counts = self.counts  # the per-layer counts not read yet first: the final ones replace them
        for name, casc in self.cascades.items():
            if name == self.main:
                continue
            counts[name][list(casc.offset)] = casc.kept_table().cpu() + self.policies[name].kept_window

    def keep_mask(self) -> torch.Tensor:
        """(L, G, n) bool: what the applied policy kept (FullKV: everything). A model-wide policy's is its cascade's
        selection, window appended: what the packed layers hold once the last layer has run (before, with slack,
        they may still hold entries the cascade has dropped)."""
        L, G = self.shape.layers, self.shape.kv_heads
        out = torch.ones(L, G, self.n, dtype=torch.bool)
        casc = self.cascades.get(self.main)
        if casc is not None and casc.offset:
            m = self.n - self.policies[self.main].kept_window
            out[list(casc.offset), :, :m] = torch.stack(list(casc.keep_masks().values())).cpu()
        for li, k in self.prefix_keep.items():
            out[li] = k.cpu()
        return out

    def cache(self, capacity: int = 64) -> RaggedCache:
        """The RaggedCache of the kept entries (tails of `capacity` tokens allocated now)."""
        if any(lay is None for lay in self.layers):
            raise RuntimeError("prefill has not run through every layer yet")
        return RaggedCache([lay.with_tail(capacity) for lay in self.layers], next_pos=self.n)

    def kept_counts(self, name: str, budget: int | float | str) -> torch.Tensor:
        """(L, G) kept tokens per head (window included) of policy `name` at another budget: from the budget alone
        for policies with uniform head budgets, else from the kept scores (needs keep_scores=True). A policy whose
        keep-set needs more than its kept scores (`budget_free_scores = False`: DefensiveKV's stage 1 reads the
        layer's attention again) has counts at this compressor's budget only; another budget is an error."""
        L, G = self.shape.layers, self.shape.kv_heads
        if name not in self.policies:
            raise ValueError(f"kept_counts({name!r}): not one of this compressor's policies {', '.join(self.names)}")
        if self.tp is not None:
            raise ValueError(f"kept_counts({name!r}): not under tensor parallelism (use counts[{name!r}], this "
                             "compressor's budget)")
        p = self.policies[name]
        if p.role == "reference":
            return torch.full((L, G), self.n, dtype=torch.long)
        b = p.budget_for(self.n, L, G, budget)
        if b.full:
            return torch.full((L, G), self.n, dtype=torch.long)
        w = p.kept_window
        if not p.budget_free_scores:  # its keep-set needs the layer's capture again: only its own budget is known
            if b != self.budgets[name]:
                raise ValueError(f"kept_counts({name!r}, {budget!r}): {name} cannot re-select from kept scores "
                                 f"(budget_free_scores = False); only this compressor's budget is known")
            if p.scope != "model":
                return self.counts[name].clone()
        slots = p.allocate(self.pf, b)[0]
        if not p.head_adaptive:
            return slots + w
        sc = self.scores[name]
        if len(sc) != L:
            raise ValueError(f"kept_counts({name!r}): scores were not kept (LayerwiseCompressor(keep_scores=True, "
                             f"also=({name!r},)))")
        if p.scope == "model":
            return topk_flat(floor_first(torch.stack(sc), p.model_floor(b)), p.selectable(b)).sum(-1).cpu() + w
        return torch.stack([p.head_counts(s, slots[li]).cpu() for li, s in enumerate(sc)]) + w
