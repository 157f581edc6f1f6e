"""Ablations of FlowKV's derived score and selection (method.md, FlowKV section): each one FlowKV or FlowKV global
with one default changed, registered under its own name so sweeps, tables and figures take it like any policy.
Role "ablation": never counted as a baseline or as the derived method, and not in the study's default list."""

from __future__ import annotations

from dataclasses import dataclass

from .flowkv import FlowKV, FlowKVGlobal


class Ablation:
    """What every ablation is, whatever it changes (class attributes only: no fields)."""

    role = "ablation"
    in_study = False
    recorded_when_set = ()  # new rows: every parameter is recorded in policy_params


@dataclass
class FlowKVPool7(Ablation, FlowKV):
    """FlowKV (layer-wise) with its scores max-pooled over 7 tokens, as SnapKV's."""

    kernel: int = 7
    name = "flowkv_pool7"


@dataclass
class FlowKVNoCross(Ablation, FlowKV):
    """FlowKV (layer-wise) without the cross terms between query heads: s² = Σ_h ‖A_h[:, j]‖² ‖P_h[j]‖²."""

    form: str = "no_cross"
    name = "flowkv_no_cross"


@dataclass
class FlowKVPerHead(Ablation, FlowKV):
    """FlowKV (layer-wise) with the per-head DKM products summed, s = Σ_h ‖A_h[:, j]‖ ‖P_h[j]‖ (no cancellation)."""

    form: str = "per_head"
    name = "flowkv_per_head"


@dataclass
class FlowKVL1(Ablation, FlowKV):
    """FlowKV (layer-wise) with the entrywise L1 norm of each entry's contribution instead of its Frobenius norm."""

    p: int = 1
    name = "flowkv_l1"


@dataclass
class FlowKVSinks4(Ablation, FlowKV):
    """FlowKV (layer-wise) keeping the first 4 tokens of every head (attention sinks, inside the budget)."""

    sinks: int = 4
    name = "flowkv_sinks4"


@dataclass
class FlowKVGlobalN0(Ablation, FlowKVGlobal):
    """FlowKV (global) on raw scores: no per-layer normalisation (N0)."""

    norm: str = "N0"
    name = "flowkv_global_n0"


@dataclass
class FlowKVGlobalN1(Ablation, FlowKVGlobal):
    """FlowKV (global) with scores divided by the layer's attention output norm ‖O_ℓ‖_F (N1)."""

    norm: str = "N1"
    name = "flowkv_global_n1"


@dataclass
class FlowKVGlobalN3(Ablation, FlowKVGlobal):
    """FlowKV (global) with each layer's scores summing to 1 (N3)."""

    norm: str = "N3"
    name = "flowkv_global_n3"


@dataclass
class FlowKVGlobalFloor4(Ablation, FlowKVGlobal):
    """FlowKV (global) with a floor of 4 tokens per head beyond the window, so no head is emptied."""

    head_floor: int = 4
    name = "flowkv_global_floor4"
