"""A/B of compressing prefills at 32K: FlowKV global (applied) + SnapKV + FlowKV layer-wise timed on the same layers.
usage: ab.py OUT.csv LABEL [CONFIG_JSON ...]   (each CONFIG_JSON: ScoreConfig changes; none: the default)
Warm process: one 8K prefill, then per rep one 32K prefill per config, interleaved."""
import json, sys, time, csv, torch
from flowkv_utils.bench.shapes import shape_model
from flowkv_utils.bench.prefill import prefill_context
from flowkv_utils.bench import recorder
from flowkv_utils.kernels import DEFAULT_SCORE_CONFIG
out, label = sys.argv[1], sys.argv[2]
cfgs = [json.loads(c) for c in sys.argv[3:]] or [{}]
model = shape_model("llama3-8b", torch.device("cuda"), 32768, torch.bfloat16)
rec = recorder(None, "ab", echo=False)
W = "random weights, real shape"
prefill_context(rec, model, 8192, weights=W, keep_scores=False)
for c in cfgs:
    prefill_context(rec, model, 32768, weights=W, keep_scores=False, score_config=DEFAULT_SCORE_CONFIG.replace(**c))
rows = []
for rep in range(3):
    for c in cfgs:
        sc = DEFAULT_SCORE_CONFIG.replace(**c)
        comp = prefill_context(rec, model, 32768, weights=W, keep_scores=False, score_config=sc)
        pre = rec.rows["prefill"][-1]["prefill_s"]
        row = dict(label=label, config=json.dumps(c), rep=rep, prefill_s=pre, repacks=comp.repacks,
                   **{f"{k}_s": v for k, v in comp.seconds.items()}, **{f"{k}_pct": 100 * v / pre for k, v in comp.seconds.items()})
        rows.append(row); print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
new = not __import__("os").path.exists(out)
with open(out, "a", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0])); 
    if new: w.writeheader()
    w.writerows(rows)
