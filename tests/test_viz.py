"""viz helpers: locating a needle, reducing results over heads, the score image and highlighted text."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from flowkv_utils import viz  # noqa: E402
from flowkv_utils.budgets import resolve_budget  # noqa: E402
from flowkv_utils.selection import PolicyResult  # noqa: E402


def test_find_span():
    assert viz.find_span([5, 1, 2, 3, 1, 2], [1, 2]) == range(1, 3)
    assert viz.find_span(torch.tensor([[7, 8, 9]]), [9]) == range(2, 3)
    with pytest.raises(ValueError, match=r"token sequence \[4\] \(1 tokens\) not found in the 3 prompt tokens"):
        viz.find_span([1, 2, 3], [4])


def result(scores: torch.Tensor, keep: torch.Tensor) -> PolicyResult:
    L, G, n = keep.shape
    return PolicyResult("x", resolve_budget(int(keep.sum()) // (L * G) or 1, n, L, G), keep, scores)


def test_layer_token_view_and_image():
    nan = float("nan")
    scores = torch.tensor([[[1.0, 4.0, nan], [2.0, 0.5, nan]]])  # (L=1, G=2, n=3), last token kept by rule
    keep = torch.tensor([[[False, True, True], [True, False, True]]])
    s, k = viz.layer_token_view(result(scores, keep))
    assert np.allclose(s[0, :2], [2.0, 4.0]) and np.isnan(s[0, 2])
    assert np.allclose(k, [[0.5, 0.5, 1.0]])
    img = viz.score_image(s, k, floor=1e-2, rule_rgb=(1.0, 0.0, 0.0))
    assert img.shape == (1, 3, 4) and np.allclose(img[0, 2], (1, 0, 0, 1))
    full = viz.score_image(s, np.ones_like(k), floor=1e-2)  # nothing faded: the row maximum gets the top colour
    assert np.allclose(full[0, 1, :3], plt.get_cmap("viridis")(1.0)[:3])


def test_highlight_and_heatmap_draw():
    fig, (a, b) = plt.subplots(2, 1, figsize=(6, 3))
    lines = viz.highlight_tokens(a, [" The", " magic", "\n", " number"] * 10, np.linspace(0, 1, 40),
                                 marked=range(4, 8), chars_per_line=30)
    assert lines >= 2 and len(a.texts) == 40
    keep = torch.zeros(2, 1, 10, dtype=torch.bool)
    keep[..., -3:] = True
    viz.score_heatmap(b, result(torch.rand(2, 1, 10), keep))
    plt.close(fig)


def test_neighbour_ratio_and_jaccard():
    assert viz.neighbour_ratio(np.array([[2.0, 2.0, 2.0, 4.0, 4.0]])) == pytest.approx(1.0)
    assert viz.neighbour_ratio(np.array([[1.0, 2.0, 4.0, 8.0]])) == pytest.approx(2.0)
    a = torch.tensor([True, True, False, False])
    b = torch.tensor([False, True, True, False])
    J = viz.jaccard_matrix([a, b, a])
    assert np.allclose(J, [[1, 1 / 3, 1], [1 / 3, 1, 1 / 3], [1, 1 / 3, 1]])


def test_token_rows_draws():
    fig, ax = plt.subplots()
    views = {"p": (np.random.rand(2, 12), np.ones((2, 12))), "q": (np.random.rand(2, 12), np.zeros((2, 12)))}
    viz.token_rows(ax, views, layer=1, lo=2, hi=8, labels=list("abcdef"), frame=range(4, 6))
    assert len(ax.images) == 1 and len(ax.patches) == 1
    plt.close(fig)
