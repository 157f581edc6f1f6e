"""Time PageDecode's split kernel against the paged kernel (unmerged branch 'paged') at 200K, batch 1, budget 5 %,
Llama-3-8B shape with random weights (bf16); whole cache resident. Prints median / p10 / p90 ms per decode step."""
import statistics, sys, torch
from flowkv_utils.bench.shapes import shape_model, synthetic_cache
from flowkv_utils.bench.timing import time_fast_decode
from flowkv_utils.blocksparse import PageDecode
from flowkv_utils.models import shape_of
n = int(sys.argv[1]) if len(sys.argv) > 1 else 204800
dev = torch.device("cuda")
model = shape_model("llama3-8b", dev, n, torch.bfloat16)
s = shape_of(model)
sc = synthetic_cache(torch.full((s.layers, s.kv_heads), n), 1, s, n, 48, torch.bfloat16, dev)
print(f"llama3-8b random weights, n={n}, batch 1, budget 0.05, torch {torch.__version__}")
ms, dec = time_fast_decode(model, sc, steps=20, warmup=3)
print(f"dense (no sparse) median {statistics.median(ms):.3f} ms"); del dec
for P in (16, 64):
    for k in ("split", "paged"):
        ms, dec = time_fast_decode(model, sc, steps=30, warmup=5, sparse=lambda c: PageDecode(c, 0.05, P, kernel=k))
        q = statistics.quantiles(ms, n=10)
        print(f"page {P:3d} kernel {k:6s}: median {statistics.median(ms):.3f} ms  p10 {q[0]:.3f}  p90 {q[-1]:.3f}", flush=True)
        del dec
        torch.cuda.empty_cache()
