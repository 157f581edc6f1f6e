"""One list of policies with their default settings (plus the variants worth testing) that drives the property
tests — as kvpress's tests/default_presses.py. Each entry: (registry name, params). Tests override `window`."""

from __future__ import annotations

from flowkv_utils.policies import KVPRESS, REGISTRY

DEFAULT_POLICIES: list[tuple[str, dict]] = [(name, {}) for name in REGISTRY]

VARIANTS: list[tuple[str, dict]] = [
    ("streamingllm", {"sinks": 0}),
    ("snapkv", {"kernel": 1}),
    ("pyramidkv", {"beta": 3}),
    ("adakv", {"alpha": 0.0}),
    ("adakv", {"alpha": 1.0}),
    ("criticalkv", {"first_stage": 0.0}),
    ("criticaladakv", {"alpha": 0.5, "first_stage": 1.0}),
    ("cake", {"tau1": 1.6, "tau2": 0.4, "gamma": 0.0, "kernel": 1}),
    ("flowkv", {"sinks": 4, "kernel": 5}),
    ("flowkv_global", {"norm": "N0"}),
    ("flowkv_global", {"norm": "N1"}),
    ("flowkv_global", {"norm": "N3", "head_floor": 2}),
    ("flowkv_global", {"sinks": 2, "kernel": 3}),
    ("flowkv", {"form": "per_head", "p": 1}),  # the score ablations not registered on their own
    ("flowkv_global", {"form": "no_cross", "head_floor": 2}),
    ("smoothevict", {"sinks": 2}),
    ("h2o", {"normalise": True}),
    ("defensivekv", {"threshold": 0.0, "kernel": 1}),
    ("defensivekv", {"threshold": 1.0, "kernel": 3}),
    ("layer_defensivekv", {"threshold": 0.5}),
    ("lava", {"alpha": 0.0}),
    ("lava", {"alpha": 1.0, "kernel": 1}),
    # kvpress-compatible settings (policies.KVPRESS, below) and their pieces on their own
    ("snapkv", {"pool": "avg", "kernel": 3}),
    ("adakv", {"shares": "kept", "alpha": 0.7}),
    ("criticalkv", {"shares": "kept", "first_stage": 0.8}),
    ("criticaladakv", {"shares": "kept", "alpha": 0.8, "first_stage": 0.3}),
    ("cake", {"allocation": "official"}),
    ("cake", {"allocation": "official", "tau1": 0.3, "tau2": 0.3}),  # peaked preferences: layers get clipped
]
VARIANTS += [(name, params) for name, params in KVPRESS.items() if params]

ALL = DEFAULT_POLICIES + VARIANTS


def label(entry: tuple[str, dict]) -> str:
    name, params = entry
    return name + ("" if not params else "[" + ",".join(f"{k}={v}" for k, v in params.items()) + "]")
