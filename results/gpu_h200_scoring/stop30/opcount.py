"""Count the PyTorch (aten) ops FlowKV global's prefill hook dispatches, per named range, in one CPU prefill of a
32-layer random model (n tokens, budget 5 %, slack 0.25). "[dev]" counts ops on tensors of ≥ 1000 elements (on a
GPU: kernel launches), "[host]" the small bookkeeping ops; on the H200 each op costs ≈ 15–25 µs of Python, dispatch
and launch, which is what bounds the hook at 32K (benchmarks/NOTES.md, stop 30). On the CPU the score is the
PyTorch path, so "select flowkv_global" counts more ops than the one Triton launch it is on CUDA.

    python results/gpu_h200_scoring/stop30/opcount.py [n]        # default 4096
"""

import collections
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import flowkv_utils.layerwise as lw
from flowkv_utils.capture import prefill
from flowkv_utils.models import random_model

counts: collections.Counter = collections.Counter()
stack = ["other"]


class Range:  # stands in for torch.profiler.record_function: the hook's named ranges
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        stack.append(self.name)

    def __exit__(self, *exc):
        stack.pop()


class Count(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        sizes = [a.numel() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        counts[stack[-1] + (" [dev]" if max(sizes, default=0) >= 1000 else " [host]")] += 1
        return func(*args, **(kwargs or {}))


lw.record_function = Range
n = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
model = random_model("llama", layers=32, heads=32, kv_heads=8, head_dim=16, hidden=512, vocab=256,
                     max_positions=n + 64)
ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(0))
comp = lw.LayerwiseCompressor(model, ids, "flowkv_global", 0.05, window=32)


def counted(li, cap):
    with Count():
        return comp(li, cap)


with torch.no_grad():
    prefill(model, ids, window=32, chunk=None, on_layer=counted, keep_kv=False, **comp.prefill_options)
print(f"n = {n}, re-packs of earlier layers: {comp.repacks}")
for key, c in sorted(counts.items(), key=lambda kv: -kv[1]):
    print(f"  {key:42s} {c:6d}  ({c / 32:.1f} a layer)")
print(f"  {'total':42s} {sum(counts.values()):6d}")
