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
