"""Write this folder's `scoring.csv` from the `bench scoring` run of the same session and commit.

`bench gpu --out ...` wrote a `scoring.csv` on the device that did not come back (a call returns at most eight
files); `python -m flowkv_utils.bench scoring --contexts 8192 32768 131072 204800` ran right after on the same H200
at the same commit (`../gpu_h200_scoring/119a733/`). It prefills each context twice, with FlowKV global's
re-packing slack 0 and 0.25; `bench gpu` prefills once, with the default slack. This keeps the rows of the prefill
at that default (FlowKV global's row with that slack and the SnapKV / FlowKV rows timed in the same prefill, which
share its `prefill_s`). Run from the repository root: `python results/gpu_h200/take_scoring.py`.
"""
from pathlib import Path

import pandas as pd

from flowkv_utils.layerwise import DEFAULT_SLACK  # what `bench gpu` prefills with

HERE = Path(__file__).parent
src = pd.read_csv(HERE.parent / "gpu_h200_scoring" / "119a733" / "scoring.csv")
glob = src[(src.policy == "flowkv_global") & (src.slack == DEFAULT_SLACK)]
keep = src[src.prefill_s.isin(glob.prefill_s)]
assert len(keep) == 3 * len(glob), "every kept prefill has FlowKV global, SnapKV and FlowKV rows"
keep.to_csv(HERE / "scoring.csv", index=False)
print(keep[["policy", "context", "slack", "scoring_s", "prefill_s", "fraction"]].to_string(index=False))
