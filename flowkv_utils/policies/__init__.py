"""The policy registry: one name → one class. To add a policy, write one file in this folder with a `Policy`
subclass (see snapkv.py for a 30-line example) and add one line to `REGISTRY` below."""

from __future__ import annotations

from .adakv import AdaKV
from .base import Policy, PolicyResult
from .cake import CAKE
from .criticalkv import CriticalAdaKV, CriticalKV
from .flowkv import FlowKV, FlowKVGlobal
from .fullkv import FullKV
from .pyramidkv import PyramidKV
from .smoothevict import SmoothEvict
from .snapkv import SnapKV
from .streaming import StreamingLLM

REGISTRY: dict[str, type[Policy]] = {
    "fullkv": FullKV,
    "streamingllm": StreamingLLM,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "adakv": AdaKV,
    "criticalkv": CriticalKV,
    "criticaladakv": CriticalAdaKV,
    "cake": CAKE,
    "flowkv": FlowKV,
    "flowkv_global": FlowKVGlobal,
    "smoothevict": SmoothEvict,
}

# the policies of the study, in the order figures list them
STUDY = ["fullkv", "streamingllm", "snapkv", "pyramidkv", "adakv", "criticalkv", "cake", "flowkv",
         "flowkv_global", "smoothevict"]


def get_policy(name: str, **params) -> Policy:
    """Instantiate a registered policy by name, e.g. get_policy("snapkv", window=32, kernel=7)."""
    key = name.lower().replace("-", "_")
    if key not in REGISTRY:
        raise ValueError(f"unknown policy {name!r}: registered are {', '.join(REGISTRY)}")
    cls = REGISTRY[key]
    try:
        return cls(**params)
    except TypeError as e:
        raise TypeError(f"policy {name!r}: {e}") from None


__all__ = ["REGISTRY", "STUDY", "Policy", "PolicyResult", "get_policy"]
