"""The explorer of notebook 02 on the embedded model: states draw without a display, results are cached per
(policy, budget) so the layer only redraws, the static mode returns at once, and the widget mode redraws on change."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from flowkv_utils import explorer, viz  # noqa: E402

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("one_thread")]  # tiny decodes: 1 thread


@pytest.fixture(scope="module")
def ex(embedded, small_prefill):
    _, tok = embedded
    needle = viz.text_span(tok, small_prefill.input_ids, "Agnes")  # the answer to the prompt's question
    return explorer.Explorer(small_prefill, tok, ["fullkv", "snapkv", "flowkv"], [64, 128], needle=needle,
                             reference="Agnes", max_new_tokens=6, tokens_around=12, caption="test")


def test_budget_choices():
    assert explorer.budget_choices(128, 32, 2000) == [64, 128, 256, 512]
    assert explorer.budget_choices(100, 32, 600) == [64, 100, 128, 256]
    with pytest.raises(TypeError, match="token budgets"):
        explorer.budget_choices(0.1, 32, 600)


def test_update_draws_policies_without_a_display(ex):
    for policy in ("snapkv", "flowkv"):
        fig = ex.update(policy, 64, 3)
        v = ex.current
        assert (v.policy, v.budget, v.layer) == (policy, 64, 3) and ex.figure is fig
        assert len(fig.axes) == 3 and fig.get_suptitle().startswith(f"{explorer.plots.policy_label(policy)} at B = 64")
        keep = ex.result(policy, 64).keep  # (L, G, n)
        span = slice(ex.value.start, ex.value.stop)
        assert v.value_kept == pytest.approx(float(keep[:, :, span].float().mean()))  # direct transcription
        assert v.value_kept_layer == pytest.approx(float(keep[3, :, span].float().mean()))
        assert v.correct == ("Agnes" in v.answer)
        plt.close(fig)
    assert ex.default_policy() == "flowkv"  # the first derived policy of the list


def test_layer_moves_reuse_the_policy_result(ex):
    ex.update("snapkv", 128, 0)
    before, result = list(ex.misses), ex.result("snapkv", 128)
    for layer in (1, 5, -1):
        plt.close(ex.update("snapkv", 128, layer))
    assert ex.misses == before and ex.result("snapkv", 128) is result  # nothing recomputed
    assert ex.current.layer == ex.pf.shape.layers - 1
    plt.close(ex.update("fullkv", 128, 0))  # another policy: computed once
    assert ex.misses == before + [("fullkv", 128)] and ex.current.value_kept == 1.0


def test_bad_state_names_what_is_allowed(ex):
    with pytest.raises(ValueError, match=r"layer=99: must be an int in \[0, 30\)"):
        ex.update("snapkv", 64, 99)
    with pytest.raises(ValueError, match="unknown policy 'snapkvv': registered are fullkv"):
        ex.update("snapkvv", 64, 0)


def test_static_show_displays_once_and_returns(ex, capsys):
    ex.update("flowkv", 64, 2)
    assert ex.show(False) is None
    assert "Figure" in capsys.readouterr().out  # IPython's display outside a kernel prints the repr
    assert not plt.fignum_exists(ex.figure.number)  # closed: a notebook shows it once


def test_interactive_show_redraws_on_change(ex):
    ex.update("snapkv", 64, 0)
    box = ex.show(True)  # no kernel here: the widgets work, nothing waits
    c = box.controls
    assert (c["policy"].value, c["budget"].value, c["layer"].value) == ("snapkv", 64, 0)
    misses = list(ex.misses)
    c["layer"].value = 4
    assert ex.current.layer == 4 and ex.misses == misses
    c["budget"].value = 128
    c["policy"].value = "flowkv"
    assert (ex.current.policy, ex.current.budget, ex.current.layer) == ("flowkv", 128, 4)
    assert set(ex.misses) <= set(misses) | {("snapkv", 128), ("flowkv", 128)}
