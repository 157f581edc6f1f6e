"""The split-KV kernel rows of `bench gpu` (one layer at 200K: full, uniform 5 %, ragged 5 %) for every variant of
`bench.gpu.TUNE`, twice (the two passes show the run-to-run spread), without the rest of the sweep.
usage: kernel_variants.py OUT.csv [VARIANTS_JSON]   (a JSON list of SplitKVConfig changes; default: TUNE)"""
import json
import sys

import pandas as pd
import torch

from flowkv_utils.bench.gpu import TUNE, kernel_speed
from flowkv_utils.bench.tables import recorder
from flowkv_utils.bench.timing import copy_bandwidth

variants = json.loads(sys.argv[2]) if len(sys.argv) > 2 else TUNE
bw = copy_bandwidth(torch.device("cuda"))
print(f"copy bandwidth {bw['GBps']:.0f} GB/s (read + write)", flush=True)
frames = []
for rep in range(2):
    rec = recorder(None, "kernel_variants", echo=False)
    best = kernel_speed(rec, bw, variants=variants)
    df = pd.DataFrame(rec.rows["kernel"])
    df["variant"] = [json.dumps(variants[i % len(variants)]) for i in range(len(df))]  # rows: per lengths, every variant
    df["pass"] = rep
    frames.append(df)
    print(f"pass {rep}: best {best}", flush=True)
out = pd.concat(frames)
out.to_csv(sys.argv[1], index=False)
piv = out.pivot_table(index="variant", columns=["lengths", "pass"], values="us")
print(piv.round(1).to_string())
