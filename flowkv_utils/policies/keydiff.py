"""KeyDiff [lit] (Park et al., 2025, arXiv 2504.15364): keep the keys least like the others; no attention is read.

Per KV head g, with its keys after RoPE (those the cache holds): the anchor is the mean of the unit-normalised
keys, μ_g = (1/n) Σ_i k_i/‖k_i‖ over all n prompt tokens, and token j is ranked by −cos(k_j, μ_g); keep the top B
of all n tokens, no window kept by rule (NVIDIA kvpress, kvpress/presses/keydiff_press.py, `KeyDiffPress.score`:
the one-shot form. The paper's own method evicts block by block while prefilling, which kvpress reproduces by
wrapping the press in its BlockPress; not done here). Cosine in float32.

The score stored is the cosine distance s_g[j] = 1 − cos(k_j, μ_g) ∈ [0, 2]: kvpress's −cos shifted by one, the same
order and keep-set, but positive, as the project's log-scale score figures need."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..capture import Prefill
from .base import Policy


@dataclass
class KeyDiff(Policy):
    name = "keydiff"
    uses_window = False

    def layer_scores(self, pf: Prefill, layer: int) -> torch.Tensor:
        """(G, n) cosine distance 1 − cos(k_j, μ_g) of each key to its head's anchor (the mean unit key)."""
        k = pf.layers[layer].k.float()  # (G, n, d)
        anchor = F.normalize(k, dim=-1).mean(dim=1, keepdim=True)  # (G, 1, d)
        return 1.0 - F.cosine_similarity(k, anchor, dim=-1)
