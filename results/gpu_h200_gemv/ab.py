"""A/B of the batch-1 decode step at 200K tokens on the Llama-3-8B shape (random weights, real shape): the fused
step (cuBLAS products + compiled elementwise kernels) against the batch-1 projection kernels (`kernels.gemv`), with
their default tiles, with the split-KV combine pass folded into the split kernel (`SplitKVConfig.fused_combine`)
and, given a `bench gemv --tune` meta.json, with the tuned tiles; two interleaved repetitions.

    python results/gpu_h200_gemv/ab.py [meta.json] [out.csv]
"""

import csv
import json
import sys

import torch

from flowkv_utils.bench.shapes import shape_model, synthetic_cache
from flowkv_utils.bench.timing import (
    copy_bandwidth,
    free_memory,
    quantiles,
    read_ms,
    time_fast_decode,
    weight_bytes,
)
from flowkv_utils.kernels import DEFAULT_CONFIG
from flowkv_utils.kernels.gemv import GemvConfig, GemvTile
from flowkv_utils.models import shape_of
from flowkv_utils.results import META, environment

n = 204800
tuned = None
if len(sys.argv) > 1 and sys.argv[1] != "-":
    g = json.load(open(sys.argv[1])).get("gemv_config")
    tuned = GemvConfig(**{k: GemvTile(**v) for k, v in g.items()}) if g else None
out = open(sys.argv[2], "w", newline="") if len(sys.argv) > 2 else sys.stdout
dev = torch.device("cuda")
bw = copy_bandwidth(dev)
m = shape_model("llama3-8b", dev, n)
s = shape_of(m)
W = weight_bytes(m)
w = csv.writer(out)
w.writerow(list(META) + ["budget", "context", "arm", "impl", "rep", "decode_ms", "floor_ms", "floor_ratio",
                         "bandwidth_GBps", "gemv_config"])
info = environment("python results/gpu_h200_gemv/ab.py " + " ".join(sys.argv[1:]))
arms = [("fused (cuBLAS + compiled)", dict(gemv=False)), ("gemv default tiles", dict(gemv=True)),
        ("gemv + fused combine", dict(gemv=True, config=DEFAULT_CONFIG.replace(fused_combine=True)))]
if tuned is not None:
    arms.append(("gemv tuned tiles", dict(gemv=True, gemv_config=tuned)))
for label, kept in (("0.05", round(0.05 * n)), ("full", n)):
    sc = synthetic_cache(torch.full((s.layers, s.kv_heads), kept), 1, s, n, 80, torch.bfloat16, dev)
    floor = read_ms(W + sc.kept_bytes(), bw)
    for rep in range(2):
        for name, kw in arms:
            ms, dec = time_fast_decode(m, sc, 20, 3, **kw)
            med = quantiles(ms)[0]
            w.writerow([info[k] for k in META] + [label, n, name, dec.label, rep, med, floor, med / floor, bw["GBps"],
                                                  repr(kw.get("gemv_config", "default" if dec.gemv else ""))
                                                  + (" fused_combine" if dec.config.fused_combine else "")])
            out.flush()
            del dec
            free_memory()
    del sc
    free_memory()
