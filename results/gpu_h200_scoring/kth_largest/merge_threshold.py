# CUDA micro-benchmark: the k-th largest threshold for the cascade merge (673K entries, k = 411K), ways to find it
import torch, time
from flowkv_utils import selection as S
dev = "cuda"
n, k = 673126, 411238
g = torch.Generator(device=dev).manual_seed(0)
v = torch.rand(n, device=dev, generator=g).round(decimals=3)  # heavy ties
def t(f, r=50):
    f(); torch.cuda.synchronize(); e0 = torch.cuda.Event(enable_timing=True); e1 = torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(r): f()
    e1.record(); torch.cuda.synchronize(); return e0.elapsed_time(e1) / r
ways = {
  "kthvalue": lambda: torch.kthvalue(v, n - k + 1).values,
  "topk unsorted .min": lambda: torch.topk(v, k, sorted=False).values.min(),
  "topk of -v (n-k+1) .max": lambda: torch.topk(v, n - k + 1, largest=False, sorted=False).values.max(),
  "sort values [n-k]": lambda: torch.sort(v).values[n - k],
  "best_in_order (current)": lambda: S.best_in_order(v, k),
  "topk_per_row stable": lambda: S.topk_per_row(v.view(1, -1), k),
}
ref = torch.sort(v).values[n - k]
for name, f in ways.items():
    ms = t(f)
    out = f()
    same = "" if out.numel() != 1 else f" equal={bool(out == ref)}"
    print(f"{name:28s} {ms*1000:9.1f} us{same}")
for nn in (100_000, 261_888, 673_126, 2_000_000):
    w = torch.rand(nn, device=dev, generator=g); kk = nn * 6 // 10
    print(nn, "kthvalue %.1f us" % (1000 * t(lambda: torch.kthvalue(w, nn - kk + 1).values)),
          "topk.min %.1f us" % (1000 * t(lambda: torch.topk(w, kk, sorted=False).values.min())),
          "sort %.1f us" % (1000 * t(lambda: torch.sort(w).values[nn - kk])))
