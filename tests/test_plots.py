"""plots: every registered policy has its own style and label, and the curves draw with all of them."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from flowkv_utils import plots  # noqa: E402
from flowkv_utils.policies import ABLATIONS, REGISTRY  # noqa: E402


def test_every_policy_has_its_own_style_and_label():
    styles = {p: (plots.policy_color(p), plots.policy_marker(p), plots.policy_linestyle(p)) for p in REGISTRY}
    assert set(plots.POLICY_STYLE) == set(REGISTRY) == set(plots.POLICY_LABEL)
    assert len(set(styles.values())) == len(styles), "two policies share a (colour, marker, line style)"
    assert len({c for c, _, _ in styles.values()}) == len(styles), "two policies share a colour"
    assert len(set(plots.POLICY_LABEL.values())) == len(REGISTRY)
    assert {p for p, (_, _, ls) in styles.items() if ls != "-"} == set(ABLATIONS)  # ablations drawn dotted
    assert plots.policy_linestyle("not_a_policy") == "-"


def test_curves_draw_every_policy():
    rows = [dict(task="average", budget=b, policy=p, value=0.5 + 0.01 * i)
            for i, p in enumerate(REGISTRY) if p != "fullkv" for b in (16, 32, 64)]
    rows.append(dict(task="average", budget=float("inf"), policy="fullkv", value=0.9))
    fig, ax = plt.subplots()
    plots.plot_curves(ax, pd.DataFrame(rows), full_x=128)
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert all(plots.policy_label(p) in lines for p in REGISTRY if p != "fullkv")
    assert lines[plots.policy_label("flowkv_l1")].get_linestyle() == ":"
    assert lines[plots.policy_label("flowkv")].get_linestyle() == "-"
    plt.close(fig)
