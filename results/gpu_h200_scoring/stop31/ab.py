"""End-to-end A/B of compressing prefills at one context (default 32K, Llama-3-8B shape, random weights, bf16):
what each policy's hook adds to the prefill's wall time, against a FullKV prefill (whose hook only packs a view),
and what the compressor's own `seconds` say, with and without overlap (tree that has it) or on an older tree.
usage: ab.py OUT.csv LABEL [CONTEXT]
Per process: one 8K prefill, one untimed prefill per config, then 3 repetitions with the configs interleaved."""
import csv
import inspect
import os
import sys
import time

import torch

from flowkv_utils.bench.shapes import prompt_ids, shape_model
from flowkv_utils.capture import prefill
from flowkv_utils.layerwise import LayerwiseCompressor

out, label = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 32768
has_overlap = "overlap" in inspect.signature(LayerwiseCompressor).parameters
ALSO = ("snapkv", "flowkv")
configs = [("fullkv", (), None), ("flowkv_global", ALSO, True), ("flowkv_global", (), True),
           ("flowkv", (), True), ("snapkv", (), True)]
if has_overlap:
    configs += [("flowkv_global", ALSO, False), ("flowkv_global", (), False)]
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a dry run of the script, shape "tiny"
model = shape_model("llama3-8b" if DEV.type == "cuda" else "tiny", DEV, max(n, 8192), torch.bfloat16 if DEV.type == "cuda" else torch.float32)
sync = torch.cuda.synchronize if DEV.type == "cuda" else (lambda: None)


def one(policy, also, overlap, m):
    ids = prompt_ids(m, model.config.vocab_size, None)
    kw = {"overlap": overlap} if has_overlap and overlap is not None else {}
    comp = LayerwiseCompressor(model, ids, policy, 1.0 if policy == "fullkv" else 0.05, window=32, also=also, **kw)
    sync()
    t0 = time.perf_counter()
    prefill(model, ids, window=32, chunk=8192, on_layer=comp, keep_kv=False, **comp.prefill_options)
    sync()
    wall = time.perf_counter() - t0
    return wall, comp


one("fullkv", (), None, min(n, 8192))
for c in configs:
    one(*c, n)
rows = []
for rep in range(3):
    for policy, also, overlap in configs:
        wall, comp = one(policy, also, overlap, n)
        sec = comp.seconds
        row = dict(label=label, context=n, policy=policy, also="+".join(also), overlap=overlap, rep=rep, wall_s=wall,
                   hooks_s=sum(sec.values()), main_s=sec.get(policy, 0.0), waits=getattr(comp, "waits", None),
                   repacks=comp.repacks, **{f"{k}_s": sec.get(k) for k in ("flowkv_global", "snapkv", "flowkv")})
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
new = not os.path.exists(out)
with open(out, "a", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    if new:
        w.writeheader()
    w.writerows(rows)
