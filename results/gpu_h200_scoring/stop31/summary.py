"""Summary of ab.py's rows: per (label, policy, policies timed alongside, overlap), the medians over repetitions of
the wall time, what the prefill adds over the FullKV prefill of the same label (as % of the FullKV prefill), and the
compressor's own seconds per policy (% of the FullKV prefill).  usage: summary.py AB.csv"""
import sys

import pandas as pd

df = pd.read_csv(sys.argv[1])
df["also"] = df["also"].fillna("")
base = df[df.policy == "fullkv"].groupby("label").wall_s.median()
df["added_pct"] = 100 * (df.wall_s - df.label.map(base)) / df.label.map(base)
for k in ("main", "flowkv_global", "snapkv", "flowkv"):
    df[f"{k}_pct"] = 100 * df[f"{k}_s"] / df.label.map(base)
keys = ["label", "policy", "also", "overlap"]
agg = df.groupby(keys, dropna=False).agg(
    reps=("rep", "size"), wall_s=("wall_s", "median"), added_pct=("added_pct", "median"),
    added_min=("added_pct", "min"), added_max=("added_pct", "max"), main_pct=("main_pct", "median"),
    main_min=("main_pct", "min"), main_max=("main_pct", "max"), flowkv_pct=("flowkv_pct", "median"),
    snapkv_pct=("snapkv_pct", "median"), waits=("waits", "max"), repacks=("repacks", "max"))
pd.set_option("display.width", 200)
print(agg.round(2).to_string())
