"""Decode steps (FastDecoder, CUDA graph, Llama-3-8B shape, random weights, bf16, 200K context) under several
split-KV launch settings, on one cache per case, the settings interleaved over 2 repetitions: which of PDL and the
combine tile moved the full decode step between the stop-30 and stop-31 stored runs.
usage: decode_ab.py OUT.csv"""
import csv
import statistics
import sys

import torch

from flowkv_utils.bench.shapes import shape_model, synthetic_cache
from flowkv_utils.bench.timing import free_memory, time_fast_decode
from flowkv_utils.kernels import DEFAULT_CONFIG
from flowkv_utils.models import shape_of

n = 204800
CONFIGS = {"stop30: no pdl, 64x128": dict(pdl=False, combine_items=64, combine_cols=128),
           "pdl, 64x128": dict(combine_items=64, combine_cols=128),
           "no pdl, 256x32": dict(pdl=False),
           "default: pdl, 256x32": {},
           "pdl, 128x64": dict(combine_items=128, combine_cols=64)}
dev = torch.device("cuda")
model = shape_model("llama3-8b", dev, n, torch.bfloat16)
s = shape_of(model)
g = torch.Generator().manual_seed(0)
share = torch.exp(torch.randn(s.layers, s.kv_heads, generator=g))  # log-normal per-head shares, per layer
ragged = (share / share.sum(-1, keepdim=True) * 0.05 * n * s.kv_heads).round().long().clamp(min=1)
cases = [("fullkv", torch.full((s.layers, s.kv_heads), n), 1), ("ragged 5 %", ragged, 1),
         ("ragged 5 %", ragged, 64)]
rows = []
for name, counts, batch in cases:
    sc = synthetic_cache(counts, batch, s, n, 64, torch.bfloat16, dev)
    for rep in range(2):
        for label, ch in CONFIGS.items():
            ms, dec = time_fast_decode(model, sc, steps=15, warmup=3, config=DEFAULT_CONFIG.replace(**ch))
            del dec
            row = dict(case=name, batch=batch, config=label, rep=rep, ms=statistics.median(ms))
            rows.append(row)
            print(row, flush=True)
    del sc
    free_memory()
with open(sys.argv[1], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
for name, _, batch in cases:
    for label in CONFIGS:
        v = [r["ms"] for r in rows if r["case"] == name and r["batch"] == batch and r["config"] == label]
        print(f"{name:>11} B={batch:<3} {label:<24} " + " ".join(f"{x:7.3f}" for x in v))
