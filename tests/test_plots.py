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
    # comparators drawn beside the policies (block-sparse) have colours and labels of their own
    comparators = {plots.policy_color(c) for c in plots.COMPARATOR_STYLE}
    assert not comparators & {c for c, _, _ in styles.values()} and set(plots.COMPARATOR_LABEL) == set(plots.COMPARATOR_STYLE)


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


def test_metric_panels_one_row_per_run_one_panel_per_metric():
    rows = []
    for p in ("fullkv", "snapkv", "flowkv"):
        for b in (["full"] if p == "fullkv" else ["0.1", "0.5"]):
            for i in range(3):
                for m, v in (("contains", 1.0 if p == "fullkv" else i / 2), ("kl_next_token", 0.1 * (i + 1))):
                    rows.append(dict(task="t", instance=f"d{i}", policy=p, budget=b, metric=m, value=v,
                                     budget_bytes=1024.0))
    df = pd.DataFrame(rows)
    fig, axes = plots.metric_panels([("a", df, ["snapkv", "flowkv"]), ("b", df, ["flowkv"])],
                                    ["accuracy", "kl_next_token"])
    assert axes.shape == (2, 2) and axes[0, 0].get_title(loc="left") == "a"
    assert [len(ax.get_lines()) for ax in axes[:, 0]] == [3, 2]  # the curves and FullKV's line
    assert axes[0, 1].get_yscale() == "log" and axes[0, 1].get_ylabel() == "kl_next_token"
    plt.close(fig)
