"""TOVA [lit] (Oren et al., 2024, "Transformers are Multi-State RNNs"), one-shot at the end of the prefill.

Score of token j = the attention of the last prompt query, averaged over all H query heads of the layer:
s[j] = (1/H) Σ_h A_h[n−1, j] for every j < n; the same score, hence the same kept tokens, in every KV head of a
layer (official code: schwartz-lab-NLP/TOVA src/tova_cache.py, `reduce`: mean over heads of the last attention row,
one top-k expanded to all KV heads). Keep the top B of all n tokens: no window is kept by rule, as in the official
code (kvpress's TOVAPress instead always keeps the last token; its own self-attention is usually among the
largest, so the two rarely differ).

Where the model total B·G·L is not a multiple of G·L, the uniform split gives some KV heads one slot more: those
heads keep the same tokens plus the next best one, so a layer's token sets are nested rather than identical."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture import Prefill
from .base import Policy


@dataclass
class TOVA(Policy):
    name = "tova"
    uses_window = False

    def layer_scores(self, pf: Prefill, layer: int) -> torch.Tensor:
        """(G, n): the head-mean attention of the last prompt query, the same row for every KV head."""
        last = pf.attn(layer)[:, -1]  # (H, n): the last captured window row is the last prompt query
        return last.mean(dim=0).expand(pf.shape.kv_heads, -1).contiguous()
