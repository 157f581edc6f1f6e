"""The policy registry: one name → one class. To add a policy, write one file in this folder with a `Policy`
subclass (see snapkv.py: a score function in a dozen lines) and add one line to `REGISTRY` below. Its class
attributes (role, head_adaptive, layer_adaptive, output_aware, scope, streams, in_study) put it into every sweep,
table and figure: nothing else lists policies by name. Roles: "reference" (FullKV), "baseline" (published methods),
"derived" (FlowKV, its global form, SmoothEvict) and "ablation" (FlowKV with one default changed, ablations.py:
never a baseline nor the derived method, and not in STUDY)."""

from __future__ import annotations

from .ablations import (
    FlowKVGlobalFloor4,
    FlowKVGlobalN0,
    FlowKVGlobalN1,
    FlowKVGlobalN3,
    FlowKVL1,
    FlowKVNoCross,
    FlowKVPerHead,
    FlowKVPool7,
    FlowKVSinks4,
)
from .adakv import AdaKV
from .base import ROLES, Policy, PolicyResult
from .cake import CAKE
from .criticalkv import CriticalAdaKV, CriticalKV
from .defensivekv import DefensiveKV, LayerDefensiveKV
from .flowkv import FlowKV, FlowKVGlobal
from .fullkv import FullKV
from .h2o import H2O
from .keydiff import KeyDiff
from .lava import LAVa
from .presets import KVPRESS, PRESETS
from .pyramidkv import PyramidKV
from .smoothevict import SmoothEvict
from .snapkv import SnapKV
from .streaming import StreamingLLM
from .tova import TOVA

REGISTRY: dict[str, type[Policy]] = {  # in the order figures and tables list them
    "fullkv": FullKV,
    "streamingllm": StreamingLLM,
    "h2o": H2O,
    "tova": TOVA,
    "keydiff": KeyDiff,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "adakv": AdaKV,
    "criticalkv": CriticalKV,
    "criticaladakv": CriticalAdaKV,
    "defensivekv": DefensiveKV,
    "layer_defensivekv": LayerDefensiveKV,
    "lava": LAVa,
    "cake": CAKE,
    "flowkv": FlowKV,
    "flowkv_global": FlowKVGlobal,
    "flowkv_pool7": FlowKVPool7,  # the ablations (role "ablation", not in STUDY)
    "flowkv_no_cross": FlowKVNoCross,
    "flowkv_per_head": FlowKVPerHead,
    "flowkv_l1": FlowKVL1,
    "flowkv_sinks4": FlowKVSinks4,
    "flowkv_global_n0": FlowKVGlobalN0,
    "flowkv_global_n1": FlowKVGlobalN1,
    "flowkv_global_n3": FlowKVGlobalN3,
    "flowkv_global_floor4": FlowKVGlobalFloor4,
    "smoothevict": SmoothEvict,
}

CATEGORIES = ("role", "head_adaptive", "layer_adaptive", "output_aware", "scope", "streams", "in_study")


def names(**attrs) -> list[str]:
    """Registered names (in registry order) whose class attributes equal `attrs`, e.g. names(role="baseline")."""
    unknown = sorted(set(attrs) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown policy attribute(s) {', '.join(unknown)}; known: {', '.join(CATEGORIES)}")
    return [n for n, cls in REGISTRY.items() if all(getattr(cls, k) == v for k, v in attrs.items())]


def categories() -> dict[str, dict[str, object]]:
    """{name: {attribute: value}} of every registered policy (a tidy table for notebooks: pd.DataFrame(...).T)."""
    return {n: {k: getattr(cls, k) for k in CATEGORIES} for n, cls in REGISTRY.items()}


# the policies of the study, in the order figures list them; the head-wise baselines FlowKV is compared with;
# FlowKV's ablations (each one default changed)
STUDY = names(in_study=True)
BASELINES = names(role="baseline")
ABLATIONS = names(role="ablation")


def prefill_options(policies) -> dict[str, bool]:
    """Keyword arguments `capture.prefill` needs so that every one of `policies` (names or instances) can run,
    e.g. prefill(model, ids, window=32, **prefill_options(["snapkv", "h2o"])) → all_queries=True for H2O."""
    classes = [type(get_policy(p)) if isinstance(p, str) else type(p) for p in policies]
    return {"all_queries": True} if any(c.needs_all_queries for c in classes) else {}


def get_policy(name: str, **params) -> Policy:
    """Instantiate a registered policy by name, e.g. get_policy("snapkv", window=32, kernel=7)."""
    key = name.lower().replace("-", "_") if isinstance(name, str) else name
    if key not in REGISTRY:
        raise ValueError(f"unknown policy {name!r}: registered are {', '.join(REGISTRY)}")
    cls = REGISTRY[key]
    try:
        return cls(**params)
    except TypeError as e:
        raise TypeError(f"policy {name!r}: {e}") from None


__all__ = ["ABLATIONS", "BASELINES", "CATEGORIES", "KVPRESS", "PRESETS", "REGISTRY", "ROLES", "STUDY", "Policy",
           "PolicyResult", "categories", "get_policy", "names", "prefill_options"]
