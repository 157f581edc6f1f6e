# CUDA: where GlobalCascade.add's ≈1.4 ms per layer goes (32 layers × (8, 32768) scores, k = 411238)
# A record of the tree it ran on (2a754aa plus the kth_largest change, `parts.csv`'s git column): GlobalCascade.prefilter
# is gone since 42a0280, so at a later commit this script would time the same path twice.
import torch, time
from torch.profiler import profile, ProfilerActivity
from flowkv_utils import selection as S
dev = "cuda"; L, G, m, k = 32, 8, 32736, 411238
g = torch.Generator(device=dev).manual_seed(0)
layers = [torch.rand(G, m, device=dev, generator=g) * (1 + 0.2 * torch.randn(1, device=dev, generator=g)).abs() for _ in range(L)]
def run(prefilter=True, best=None):
    S.GlobalCascade.prefilter = prefilter
    c = S.GlobalCascade(k)
    if best is not None: c._best = best.__get__(c)
    for i, s in enumerate(layers): c.add(i, s)
    return c
def old_best(self, vals, ids):
    kk = min(self.k, vals.numel()); return torch.sort(vals, descending=True, stable=True).indices[:kk].sort().values
def timed(**kw):
    run(**kw); torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(5): c = run(**kw)
    torch.cuda.synchronize(); return (time.perf_counter() - t0) / 5 * 1000, c
ref = None
for name, kw in [("current (sort-threshold merge, prefilter)", {}), ("no prefilter", dict(prefilter=False)),
                 ("old stable double sort, prefilter", dict(best=old_best))]:
    ms, c = timed(**kw)
    m_ = torch.cat([c.keep_mask(i).view(-1) for i in range(L)])
    ref = m_ if ref is None else ref
    print(f"{name:45s} {ms:7.2f} ms for {L} adds  same={bool((m_ == ref).all())}  kept={int(m_.sum())}")
S.GlobalCascade.prefilter = True
# per-add wall time, synchronised
c = S.GlobalCascade(k); ts = []
for i, s in enumerate(layers):
    torch.cuda.synchronize(); t0 = time.perf_counter(); c.add(i, s); torch.cuda.synchronize(); ts.append((time.perf_counter() - t0) * 1000)
print("per add ms:", " ".join(f"{t:.2f}" for t in ts))
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
    run(); torch.cuda.synchronize()
print(p.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
print(p.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
