"""An interactive explorer of one prefill (notebook 02, section h): pick a policy, a budget and a layer, and see
the policy's score map with that layer marked, the layer's scores token by token around the needle, the prompt text
with the tokens that layer keeps highlighted, how much of the needle survives, and the answer decoded from the
compressed cache.

    ex = Explorer(pf, tok, policies, budget_choices(128, pf.window, pf.n), needle=needle, value=value, reference="42")
    fig = ex.update("flowkv", 128, 14)   # one state: draws it (a matplotlib Figure), no display needed
    ex.show(interactive)                 # True: ipywidgets controls that redraw on change; False: that state, once

A policy's keep-set and answer depend on the prefill, the window (the prefill's), `max_new_tokens` — fixed for an
Explorer — and on (policy, budget), the key of its cache: changing the policy or the budget computes once, moving
the layer slider only redraws. `show(False)` is what headless runs use (the notebooks' `interactive` parameter; the
runner passes False): it displays the drawn state and returns, so nothing waits for a widget event under papermill.
ipywidgets (the `lab` extra) is imported by the interactive mode only.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt

from . import plots, viz
from .budgets import parse_budget
from .capture import Prefill
from .generate import generate
from .policies import REGISTRY, get_policy
from .selection import PolicyResult


def budget_choices(budget: int, window: int, n: int) -> list[int]:
    """The budgets the explorer offers (tokens per KV head): doubling from 2·window while ≤ n/2, and `budget`."""
    b = parse_budget(budget)
    if not isinstance(b, int):
        raise TypeError(f"budget={budget!r}: the explorer takes token budgets (an int ≥ window={window})")
    ladder = {window * 2 ** k for k in range(1, 32) if window * 2 ** k <= n // 2}
    return sorted(ladder | {b})


def kept_share(result: PolicyResult, span: range, layer: int | None = None) -> float:
    """Fraction of the (layer, KV head, token) entries of the tokens in `span` that `result` keeps, over every
    layer or in one layer."""
    keep = result.keep[:, :, span.start:span.stop] if layer is None else result.keep[layer, :, span.start:span.stop]
    return float(keep.float().mean())


@dataclass(frozen=True)
class View:
    """What one state of the explorer shows, as numbers."""

    policy: str
    budget: int
    layer: int
    value_kept_layer: float  # share of the value tokens' entries this layer keeps (over its KV heads)
    value_kept: float  # the same over every layer (notebook 02's "value kept")
    needle_kept_layer: float  # share of the whole needle sentence's entries this layer keeps
    answer: str  # decoded from the compressed cache (every layer's keep-set, not only this layer's)
    correct: bool | None  # the reference appears in the answer (None without a reference)


class Explorer:
    """Policies × budgets on one prefill, computed on demand and cached per (policy, budget); see the module doc."""

    def __init__(self, pf: Prefill, tok, policies: list[str], budgets: list[int], *, needle: range,
                 value: range | None = None, reference: str | None = None, max_new_tokens: int = 24,
                 tokens_around: int = 40, caption: str = ""):
        unknown = [p for p in policies if p not in REGISTRY]
        if not policies or unknown:
            raise ValueError(f"policies={policies}: a non-empty list of registered policies ({', '.join(REGISTRY)})")
        if not budgets:
            raise ValueError("budgets=[]: give at least one token budget (e.g. budget_choices(128, window, n))")
        if not 0 <= needle.start < needle.stop <= pf.n:
            raise ValueError(f"needle={needle}: must be a non-empty span of the {pf.n} prompt tokens")
        self.pf, self.tok, self.policies = pf, tok, list(policies)
        self.budgets = sorted({parse_budget(b) for b in budgets})
        self.needle, self.value = needle, value if value is not None else needle
        self.reference, self.max_new_tokens, self.caption = reference, max_new_tokens, caption
        self.lo, self.hi = max(0, needle.start - tokens_around), min(pf.n, needle.stop + tokens_around)
        ids = pf.input_ids[0, self.lo:self.hi].tolist()
        self.tokens = [tok.decode([i]) for i in ids]  # the text shown around the needle
        self.labels = [t.replace("\n", "⏎") for t in self.tokens]
        self._results: dict[tuple[str, int], PolicyResult] = {}
        self._answers: dict[tuple[str, int], str] = {}
        self.misses: list[tuple[str, int]] = []  # (policy, budget) keys computed, in order (the rest were cached)
        self.current: View | None = None
        self.figure = None

    # ---- what a state is ------------------------------------------------------------------------------------
    def default_policy(self) -> str:
        """The first of the project's derived policies in the list (FlowKV first in the registry order), else the
        first compressing one, else the first."""
        derived = [p for p in self.policies if REGISTRY[p].role == "derived"]
        compressing = [p for p in self.policies if REGISTRY[p].role != "reference"]
        return (derived or compressing or self.policies)[0]

    def _key(self, policy: str, budget) -> tuple[str, int]:
        if policy not in REGISTRY:
            raise ValueError(f"unknown policy {policy!r}: registered are {', '.join(REGISTRY)}")
        b = parse_budget(budget)
        if not isinstance(b, int):
            raise TypeError(f"budget={budget!r}: the explorer takes token budgets (ints)")
        return policy, b

    def result(self, policy: str, budget: int) -> PolicyResult:
        """The policy's keep-set at `budget` on this prefill (computed once)."""
        key = self._key(policy, budget)
        if key not in self._results:
            self.misses.append(key)
            self._results[key] = get_policy(policy, window=self.pf.window)(self.pf, key[1])
        return self._results[key]

    def answer(self, policy: str, budget: int) -> str:
        """The greedy answer from the policy's compressed cache (computed once)."""
        key = self._key(policy, budget)
        if key not in self._answers:
            out = generate(self.pf, self.result(*key), max_new_tokens=self.max_new_tokens, tok=self.tok)
            self._answers[key] = self.tok.decode(out, skip_special_tokens=True).strip()
        return self._answers[key]

    def cached(self, policy: str, budget: int) -> bool:
        key = self._key(policy, budget)
        return key in self._results and key in self._answers

    def correct(self, policy: str, budget: int) -> bool | None:
        """Whether the reference appears in the policy's answer at `budget` (None without a reference)."""
        return None if self.reference is None else self.reference in self.answer(policy, budget)

    def view(self, policy: str, budget: int, layer: int) -> View:
        L = self.pf.shape.layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not -L <= layer < L:
            raise ValueError(f"layer={layer!r}: must be an int in [0, {L}) (negative counts from the top)")
        layer %= L
        res = self.result(policy, budget)
        return View(policy, self._key(policy, budget)[1], layer, kept_share(res, self.value, layer),
                    kept_share(res, self.value), kept_share(res, self.needle, layer), self.answer(policy, budget),
                    self.correct(policy, budget))

    # ---- drawing --------------------------------------------------------------------------------------------
    def update(self, policy: str, budget: int, layer: int):
        """Compute (or reuse) the state and draw it: returns the Figure (also kept as `self.figure`, its numbers as
        `self.current`). Needs no display."""
        v = self.view(policy, budget, layer)
        res = self.result(policy, budget)
        label = plots.policy_label(policy)
        fig = plt.figure(figsize=(13, 8.4), layout="constrained")
        ax_map, ax_row, ax_text = fig.subplots(3, 1, height_ratios=[3.0, 0.8, 2.6])
        viz.score_heatmap(ax_map, res, title=f"{label}: score / layer maximum (log colour); evicted entries faded, "
                                             "red: kept by rule")
        n = self.pf.n
        ax_map.add_patch(plt.Rectangle((-0.5, v.layer - 0.5), n, 1, fill=False, ec="#ff2d2d", lw=1.6))
        ax_map.axvline(self.needle.start, color="white", ls="--", lw=0.8)
        viz.token_rows(ax_row, {f"layer {v.layer}": viz.layer_token_view(res)}, v.layer, self.lo, self.hi,
                       self.labels, frame=self.needle)
        ax_row.set_xlabel("prompt token (the needle framed)")
        weight = res.keep[v.layer, :, self.lo:self.hi].float().mean(0).numpy()  # share of the layer's KV heads
        viz.highlight_tokens(ax_text, self.tokens, weight, chars_per_line=110,
                             marked=range(self.needle.start - self.lo, self.needle.stop - self.lo),
                             title=f"layer {v.layer}: background = share of its KV heads that keep the token; "
                                   f"needle sentence {v.needle_kept_layer:.0%} kept")
        verdict = "" if v.correct is None else (" ✓" if v.correct else " ✗")
        short = v.answer if len(v.answer) <= 70 else v.answer[:67] + "..."
        fig.suptitle(f"{label} at B = {v.budget}, layer {v.layer}: the value keeps {v.value_kept_layer:.0%} of this "
                     f"layer's entries ({v.value_kept:.0%} over all layers)\nanswer from the compressed cache: "
                     f"{short!r}{verdict}", fontsize=10)
        plots.caption(fig, (self.caption + "\n" if self.caption else "") + "the answer uses every layer's "
                      "keep-set; the layer picks what the lower two panels show")
        self.current, self.figure = v, fig
        return fig

    def show(self, interactive: bool):
        """Display the explorer. interactive=False: the state drawn last (drawn now if none), once, and return None
        — nothing waits. interactive=True: policy, budget and layer controls (ipywidgets) over an output that
        redraws on every change; returns the widget box."""
        from IPython.display import display

        if self.figure is None:
            self.update(self.default_policy(), self.budgets[0], self.pf.shape.layers // 2)
        if not interactive:
            display(self.figure)
            plt.close(self.figure)
            return None
        try:
            import ipywidgets as widgets
        except ImportError:
            raise ImportError("the interactive explorer needs ipywidgets (the `lab` extra: pip install -e '.[lab]'); "
                              "show(interactive=False) draws one static state without it") from None
        v = self.current
        policy = widgets.Dropdown(options=[(plots.policy_label(p), p) for p in self.policies],
                                  value=v.policy if v.policy in self.policies else self.policies[0],
                                  description="policy")
        budget = widgets.SelectionSlider(options=sorted(set(self.budgets) | {v.budget}), value=v.budget,
                                         description="budget B", continuous_update=False)
        layer = widgets.IntSlider(value=v.layer, min=0, max=self.pf.shape.layers - 1, description="layer ℓ",
                                  continuous_update=False)
        status = widgets.HTML()
        out = widgets.Output()
        with out:
            display(self.figure)
        plt.close(self.figure)

        def redraw(_change=None):
            if not self.cached(policy.value, budget.value):
                status.value = f"computing {plots.policy_label(policy.value)} at B = {budget.value} ..."
            fig = self.update(policy.value, budget.value, layer.value)
            with out:
                out.clear_output(wait=True)
                display(fig)
            plt.close(fig)
            status.value = ""

        for control in (policy, budget, layer):
            control.observe(redraw, "value")
        box = widgets.VBox([widgets.HBox([policy, budget, layer]), status, out])
        box.controls = {"policy": policy, "budget": budget, "layer": layer}  # for tests and scripting
        display(box)
        return box
