"""Named settings: constructor parameters that make the project's policies follow another code base's choices, so
that a reader can compare numbers. Each preset is a {policy name: params} mapping — the shape `get_policy(name,
**KVPRESS[name])`, `run_sweep(..., policy_params=KVPRESS)` and the layer-wise compressor take. Defaults stay the
project's documented choices (docs/method.md §2); a preset never changes them.

KVPRESS — NVIDIA kvpress (v0.5.5, kvpress/presses/): SnapKVPress scores by *average* pooling with kernel 5
(each query head pooled, then the group mean), and AdaKVPress / CriticalKVPress / CriticalAdaKVPress take their
safeguard ⌊α·n_kept⌋ and first stage ⌊0.5·n_kept⌋ of the kept count with the window inside (`shares="kept"`).
StreamingLLMPress already equals the project's StreamingLLM (4 sinks). What a preset cannot express — kvpress's
PyramidKV schedule over B with the window inside (and its fall-back to SnapKV while B/β < w), kvpress evicting
window tokens where a head's stage 1 is shorter than its window — is listed in docs/method.md ("kvpress") and
measured by tools/kvpress_crosscheck.py (results/kvpress_crosscheck.csv). kvpress's default window is 64 tokens;
the presets keep the project's w = 32 (pass window=64 as well to follow kvpress's default)."""

from __future__ import annotations

_KVPRESS_POOL = {"pool": "avg", "kernel": 5}

KVPRESS: dict[str, dict] = {
    "streamingllm": {},
    "snapkv": dict(_KVPRESS_POOL),
    "pyramidkv": dict(_KVPRESS_POOL),
    "adakv": {**_KVPRESS_POOL, "shares": "kept"},
    "criticalkv": {**_KVPRESS_POOL, "shares": "kept"},
    "criticaladakv": {**_KVPRESS_POOL, "shares": "kept"},
}

PRESETS: dict[str, dict[str, dict]] = {"kvpress": KVPRESS}

__all__ = ["KVPRESS", "PRESETS"]
