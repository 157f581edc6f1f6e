"""Views of policy results for figures: (layer × token) score maps with kept entries marked, token-highlighted
prompt text, and locating a sub-sequence (a needle) in the prompt. Plot styling and saving live in `plots`."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import LogNorm

from .selection import PolicyResult


def find_span(ids: list[int] | torch.Tensor, sub: list[int] | torch.Tensor) -> range:
    """Positions of the first occurrence of the token sequence `sub` in `ids` (both 1-D); ValueError if absent."""
    ids = torch.as_tensor(ids).flatten().tolist()
    sub = torch.as_tensor(sub).flatten().tolist()
    for i in range(len(ids) - len(sub) + 1):
        if ids[i:i + len(sub)] == sub:
            return range(i, i + len(sub))
    raise ValueError(f"token sequence {sub[:8]}{'...' if len(sub) > 8 else ''} ({len(sub)} tokens) not found "
                     f"in the {len(ids)} prompt tokens")


def text_span(tok, ids: torch.Tensor, text: str) -> range:
    """Token positions of `text` inside the prompt ids (tried as is, then with a leading space, which tokenizers
    merge into the first word)."""
    for variant in (text, " " + text):
        try:
            return find_span(ids, tok(variant, add_special_tokens=False)["input_ids"])
        except ValueError:
            continue
    raise ValueError(f"{text[:40]!r}... does not appear token-for-token in the prompt")


def layer_token_view(result: PolicyResult) -> tuple[np.ndarray, np.ndarray]:
    """Reduce a result over KV heads: (L, n) largest score over the heads of a layer (NaN where every head keeps
    the token by rule: window, sinks) and (L, n) fraction of the layer's KV heads that keep the token."""
    kept = result.keep.float().mean(1).numpy()  # (L, n)
    if result.scores is None:
        return np.full(kept.shape, np.nan), kept
    s = result.scores.float()  # (L, G, n)
    best = s.nan_to_num(float("-inf")).max(1).values  # (L, n)
    best[s.isnan().all(1)] = float("nan")
    return best.numpy(), kept


def score_image(scores: np.ndarray, kept: np.ndarray, floor: float = 1e-4, cmap: str = "viridis",
                dim: float = 0.8, rule_rgb=(0.85, 0.1, 0.1)) -> np.ndarray:
    """RGBA (L, n, 4) image: each row's scores divided by the row maximum, log colour scale on [floor, 1];
    evicted entries blended towards white by `dim` (partially for partly kept), kept-by-rule entries in rule_rgb."""
    finite = np.where(np.isfinite(scores), scores, np.nan)
    row_max = np.fmax.reduce(finite, axis=1, keepdims=True)  # NaN-ignoring max; NaN for an all-NaN row
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.clip(finite / np.where(row_max > 0, row_max, 1.0), floor, 1.0)
    t = (np.log(rel) - np.log(floor)) / -np.log(floor)  # 0 at floor, 1 at the row maximum
    rgba = plt.get_cmap(cmap)(np.nan_to_num(t, nan=0.0))
    fade = dim * (1.0 - kept)[..., None]  # 0 for entries every head keeps
    rgba[..., :3] = rgba[..., :3] * (1 - fade) + fade
    rgba[np.isnan(scores)] = (*rule_rgb, 1.0)
    return rgba


def score_heatmap(ax, result: PolicyResult, floor: float = 1e-4, cmap: str = "viridis", title: str | None = None):
    """Draw `score_image` of a result on ax (x: token position, y: layer, bottom layer at the top); returns a
    ScalarMappable for a shared colour bar (relative score, log scale)."""
    scores, kept = layer_token_view(result)
    L, n = scores.shape
    ax.imshow(score_image(scores, kept, floor, cmap), aspect="auto", interpolation="nearest",
              extent=(-0.5, n - 0.5, L - 0.5, -0.5))
    ax.set(xlabel="prompt token position", ylabel="layer ℓ", title=title or result.policy)
    ax.grid(False)
    return plt.cm.ScalarMappable(norm=LogNorm(floor, 1.0), cmap=cmap)


def highlight_tokens(ax, tokens: list[str], weights, marked=(), chars_per_line: int = 100, cmap: str = "Greens",
                     title: str | None = None) -> int:
    """Render tokens as wrapped monospace text, each on a background coloured by its weight in [0, 1] (e.g. the
    fraction of cache entries that keep it); tokens whose index is in `marked` are bold and underlined by a frame.
    The font size fits both the axes width and height. Returns the number of text lines."""
    ax.axis("off")
    lines, col, places = 0, 0, []
    for tokn in tokens:
        s = tokn.replace("\n", "⏎")
        if col + len(s) > chars_per_line and col > 0:
            lines, col = lines + 1, 0
        places.append((col, lines, s))
        col += len(s)
    ax.set_xlim(0, chars_per_line)
    ax.set_ylim(lines + 0.7, -0.7)
    fig, box = ax.figure, ax.get_position()
    width_pt, height_pt = box.width * fig.get_figwidth() * 72, box.height * fig.get_figheight() * 72
    fontsize = min(9.0, width_pt / (chars_per_line * 0.62), height_pt / ((lines + 1.4) * 1.5))
    colours = plt.get_cmap(cmap)(np.clip(np.asarray(weights, dtype=float), 0, 1) * 0.7)
    marked = set(marked)
    for i, (x, y, s) in enumerate(places):
        ax.text(x, y, s, family="monospace", fontsize=fontsize, va="center", ha="left",
                fontweight="bold" if i in marked else "normal",
                bbox=dict(boxstyle="square,pad=0.12", fc=colours[i], ec="#b22222" if i in marked else "none", lw=0.8))
    if title:
        ax.set_title(title, loc="left", fontsize=9)
    return lines + 1


def token_rows(ax, views: dict[str, tuple[np.ndarray, np.ndarray]], layer: int, lo: int, hi: int,
               labels: list[str] | None = None, frame: range | None = None) -> None:
    """One row per entry of `views` (label → `layer_token_view` output) showing layer `layer` on tokens lo..hi−1,
    coloured like `score_image` (normalised by the layer's maximum over the whole prompt); `frame` boxes a span."""
    names = list(views)
    img = score_image(np.stack([views[k][0][layer] for k in names]), np.stack([views[k][1][layer] for k in names]))
    ax.imshow(img[:, lo:hi], aspect="auto", interpolation="nearest", extent=(lo - 0.5, hi - 0.5, len(names) - 0.5, -0.5))
    if frame is not None:
        ax.add_patch(plt.Rectangle((frame.start - 0.5, -0.5), len(frame), len(names), fill=False, ec="black", lw=1.2))
    ax.set_yticks(range(len(names)), names, fontsize=7)
    if labels is not None:
        ax.set_xticks(range(lo, hi), labels, rotation=90, fontsize=6)
    ax.grid(False)


def neighbour_ratio(scores: np.ndarray) -> float:
    """Median factor between the scores of neighbouring tokens (rows of `scores`): 1 for piecewise-constant
    (pooled) scores, larger for scores that change token by token. NaN and non-positive entries are ignored."""
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.abs(np.diff(np.log(np.where(scores > 0, scores, np.nan)), axis=-1))
    return float(np.exp(np.nanmedian(d))) if np.isfinite(d).any() else float("nan")


def jaccard_matrix(keeps: list[torch.Tensor]) -> np.ndarray:
    """(P, P) Jaccard overlap |S_a ∩ S_b| / |S_a ∪ S_b| of boolean keep masks of equal shape."""
    K = torch.stack([k.flatten() for k in keeps]).double()  # (P, entries)
    inter = K @ K.T
    return (inter / (K.sum(1, keepdim=True) + K.sum(1) - inter)).numpy()
