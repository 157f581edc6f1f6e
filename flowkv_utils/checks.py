"""Numeric checks printed next to each derivation (after Karpathy's `cmp()`): one row per quantity."""

from __future__ import annotations

import torch


def cmp(label: str, got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> float:
    """Print `label | max abs diff | relative error | tolerance | ✓/✗` and raise (naming the label) on failure.

    Relative error is ‖got − want‖_F / ‖want‖_F, in float64."""
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    if g.shape != w.shape:
        raise AssertionError(f"{label}: shape {tuple(g.shape)} != {tuple(w.shape)}")
    diff = (g - w).abs().max().item() if g.numel() else 0.0
    rel = ((g - w).norm() / w.norm().clamp_min(1e-300)).item()
    ok = rel <= rtol and bool(torch.isfinite(g).all())
    print(f"{label:<48s} | maxdiff {diff:9.2e} | rel {rel:9.2e} | tol {rtol:7.0e} | {'✓' if ok else '✗'}")
    if not ok:
        raise AssertionError(f"{label}: relative error {rel:.3e} > {rtol:.0e}")
    return rel


NUMBERS_ENV = "FLOWKV_NUMBERS"  # folder the runner sets: key numbers go to <folder>/<notebook>.numbers.json


def record(notebook: str, **numbers: float | int | bool | str) -> dict:
    """Record the key numbers a notebook states (identity errors, AUCs, speed-ups, verdicts) so that a claim that
    silently changes fails a test: under the runner they are merged into `<FLOWKV_NUMBERS>/<notebook>.numbers.json`
    beside the executed copy, and `tests/test_notebooks.py` compares the smoke run's with tolerances. Values must be
    plain numbers, booleans or short strings; returns them (so a cell can display them)."""
    import json
    import math
    import os
    from pathlib import Path

    clean = {}
    for k, v in numbers.items():
        if hasattr(v, "item"):
            v = v.item()
        if not isinstance(v, (bool, int, float, str)):
            raise TypeError(f"record({notebook!r}): {k}={v!r} is a {type(v).__name__}; record plain numbers, "
                            "booleans or strings")
        clean[k] = None if isinstance(v, float) and math.isnan(v) else v
    folder = os.environ.get(NUMBERS_ENV)
    if folder:
        path = Path(folder) / f"{notebook}.numbers.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**old, **clean}, indent=1, sort_keys=True))
    return clean
