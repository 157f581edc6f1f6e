"""Cross-check: the project's keep-sets against NVIDIA kvpress's presses, per layer, on the embedded model.

kvpress pins transformers < 5.3 and the project needs a newer one, so the check runs in two environments and
meets in files (the work folder, default runs/kvpress_check/):

    1. project venv:  python tools/kvpress_crosscheck.py project   prompts + the project's keep masks   project.npz
    2. kvpress venv:  python tools/kvpress_crosscheck.py kvpress   kvpress's keep masks (same prompts)  kvpress.npz
    3. project venv:  python tools/kvpress_crosscheck.py compare   per-layer Jaccard → results/kvpress_crosscheck.csv

`make kvpress-check` builds the kvpress venv (.venv-kvpress) and runs the three. Step 2 imports only torch,
transformers, numpy and kvpress (never flowkv_utils); steps 1 and 3 never import kvpress.

A keep-set is the set of (KV head, token) entries a layer keeps after prefill; Jaccard = |P ∩ K| / |P ∪ K| per
layer. kvpress's ScorerPress presses gather the kept keys (recovered here by matching each kept key row to the
uncompressed keys, exactly); AdaKV-style presses keep the keys and list the evicted entries in
`module.masked_key_indices`. Each project policy is run twice: with its defaults ("project") and with
`policies.KVPRESS` ("kvpress"). `CASES` maps a project policy to the kvpress press it is compared with; a policy
not registered in this checkout is skipped with a message. After each
kvpress prefill an 8-token continuation and one greedy step run on kvpress's compressed cache, as its pipeline
sends a question (column kvpress_decode_step: "ok" or the error; PyramidKV's ragged per-layer lengths fail there).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

WINDOW = 32  # observation window in both code bases (kvpress's default is 64)
PROMPTS = [(2048, 0.25), (4096, 0.75)]  # NIAH (length in tokens, needle depth), question at the end (in the window)
BUDGETS = [128, 640]  # kept tokens per KV head, window inside; 640 ≥ β·w lets kvpress's PyramidKV leave SnapKV
ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "kvpress_check"
TABLE = ROOT / "results" / "kvpress_crosscheck.csv"

_SNAP = ("SnapKVPress", {"window_size": WINDOW, "kernel_size": 5})
# project policy → (kvpress press class, kwargs; a nested (class, kwargs) is a press argument) and the project's
# parameters used in both settings
CASES: dict[str, dict] = {
    "streamingllm": {"press": ("StreamingLLMPress", {"n_sink": 4}), "project": {}},
    "snapkv": {"press": _SNAP, "project": {"window": WINDOW}},
    "pyramidkv": {"press": ("PyramidKVPress", {"window_size": WINDOW, "kernel_size": 5, "beta": 20}),
                  "project": {"window": WINDOW}},
    "adakv": {"press": ("AdaKVPress", {"press": _SNAP, "alpha_safeguard": 0.2}), "project": {"window": WINDOW}},
    "criticalkv": {"press": ("CriticalKVPress", {"press": _SNAP, "first_stage_ratio": 0.5}),
                   "project": {"window": WINDOW}},
    "criticaladakv": {"press": ("CriticalAdaKVPress", {"press": _SNAP, "alpha_safeguard": 0.2,
                                                       "first_stage_ratio": 0.5}), "project": {"window": WINDOW}},
    "tova": {"press": ("TOVAPress", {}), "project": {}},
    "keydiff": {"press": ("KeyDiffPress", {}), "project": {}},
}
SETTINGS = ("project", "kvpress")

# where a per-layer Jaccard below 1 comes from (docs/method.md, "kvpress"), by (policy, setting)
EXPLAIN = {
    ("snapkv", "project"): "pooling: max k=7 (project) vs avg k=5 (kvpress)",
    ("pyramidkv", "project"): "pooling (max 7 vs avg 5) and schedule (below)",
    ("pyramidkv", "kvpress"): ("schedule: kvpress spreads B with the window inside (round, unfloored step) and "
                               "falls back to SnapKV while B/beta < w; the project spreads B - w (floored step, "
                               "exact total)"),
    ("adakv", "project"): "pooling, and safeguard: floor(0.2*(B-w)) prefix tokens (project) vs floor(0.2*B) - w",
    ("criticalkv", "project"): "pooling, and stage 1: floor(0.5*(B-w)) prefix tokens (project) vs floor(0.5*B) - w",
    ("criticaladakv", "project"): "pooling, safeguard and stage 1 counted without (project) / with the window",
    ("criticaladakv", "kvpress"): ("kvpress evicts window tokens of heads whose stage 1 is shorter than the "
                                   "window; the project keeps every window"),
}


# ---------------------------------------------------------------------------------------------------- helpers
def ratio_for(budget: int, n: int) -> float:
    """kvpress's compression_ratio whose int(n·(1 − ratio)) is exactly `budget` (half a token of slack)."""
    return 1.0 - (budget + 0.5) / n


def key_of(prompt: int, budget: int, policy: str, setting: str | None = None) -> str:
    return f"p{prompt}_b{budget}_{policy}" + ("" if setting is None else f"_{setting}")


def jaccard_per_layer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(L,) |a ∩ b| / |a ∪ b| of two keep masks (L, G, n) over each layer's (head, token) entries."""
    inter = (a & b).sum(axis=(1, 2))
    union = (a | b).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def nested_per_layer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(L,) True where, in every head, one keep-set contains the other (same ranking, other counts)."""
    a_in_b = ~(a & ~b).any(-1)
    b_in_a = ~(b & ~a).any(-1)
    return (a_in_b | b_in_a).all(-1)


# ---------------------------------------------------------------------------------------------------- 1. project
def run_project(work: Path) -> None:
    import torch
    import transformers

    from flowkv_utils.capture import prefill
    from flowkv_utils.models import load_model, resolve_model_path
    from flowkv_utils.policies import KVPRESS, REGISTRY, get_policy
    from flowkv_utils.tasks.niah import needle_instance

    model, tok = load_model("embedded")
    out: dict[str, np.ndarray] = {}
    meta = {"model_dir": str(resolve_model_path("embedded")), "window": WINDOW, "prompts": [], "budgets": BUDGETS,
            "skipped": {}, "torch": torch.__version__, "transformers": transformers.__version__}
    for i, (length, depth) in enumerate(PROMPTS):
        inst = needle_instance(tok, length, depth)
        out[f"ids{i}"] = inst.prompt_ids[0].numpy()
        meta["prompts"].append({"name": f"niah/{inst.instance}", "n": inst.context_tokens})
        pf = prefill(model, inst.prompt_ids, window=WINDOW)
        for policy, case in CASES.items():
            if policy not in REGISTRY:
                meta["skipped"][policy] = f"policy {policy!r} is not registered in this checkout"
                continue
            for setting in SETTINGS:
                params = {**case["project"], **(KVPRESS.get(policy, {}) if setting == "kvpress" else {})}
                for budget in BUDGETS:
                    res = get_policy(policy, **params)(pf, budget)
                    out[key_of(i, budget, policy, setting)] = res.keep.numpy()
                    meta.setdefault("params", {})[f"{policy}/{setting}"] = params
        print(f"project: prompt {i} ({inst.context_tokens} tokens) done", flush=True)
    for policy, why in meta["skipped"].items():
        print(f"project: skipped {policy}: {why}")
    work.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(work / "project.npz", **out)
    (work / "project.json").write_text(json.dumps(meta, indent=1))


# ---------------------------------------------------------------------------------------------------- 2. kvpress
def _press(spec):
    import kvpress

    name, kwargs = spec
    return getattr(kvpress, name)(**{k: _press(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})


def _set_ratio(press, ratio: float) -> None:
    press.compression_ratio = ratio  # wrappers (AdaKV, CriticalKV) forward it to the scorer they wrap


def run_kvpress(work: Path) -> None:
    """Prefill every prompt once per press (kvpress's own hooks), read the keep-set of every layer back."""
    import kvpress
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache

    meta = json.loads((work / "project.json").read_text())
    ids_all = np.load(work / "project.npz")
    model = AutoModelForCausalLM.from_pretrained(meta["model_dir"], dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    layers = model.model.layers
    out: dict[str, np.ndarray] = {}
    info = {"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else _dist_version("kvpress"),
            "torch": torch.__version__, "transformers": transformers.__version__, "decode": {}, "errors": {}}
    for i in range(len(meta["prompts"])):
        ids = torch.as_tensor(ids_all[f"ids{i}"]).long().unsqueeze(0)
        n = ids.shape[-1]
        for policy, case in CASES.items():
            if policy in meta["skipped"]:
                continue
            for budget in BUDGETS:
                press = _press(case["press"])
                _set_ratio(press, ratio_for(budget, n))
                before, after = {}, {}

                def grab(store):
                    def hook(module, args, kwargs, output):
                        keys = kwargs["past_key_values"].layers[module.layer_idx].keys[0]
                        store[module.layer_idx] = (keys.clone(), getattr(module, "masked_key_indices", None))
                    return hook

                hooks = [lay.self_attn.register_forward_hook(grab(before), with_kwargs=True) for lay in layers]
                cache = DynamicCache()
                k = key_of(i, budget, policy)
                try:
                    with torch.no_grad(), press(model):
                        hooks += [lay.self_attn.register_forward_hook(grab(after), with_kwargs=True)
                                  for lay in layers]
                        model.model(input_ids=ids, past_key_values=cache)
                except Exception as e:  # noqa: BLE001 — recorded in the table, not hidden
                    info["errors"][k] = f"prefill: {type(e).__name__}: {e}"
                    continue
                finally:
                    for h in hooks:
                        h.remove()
                out[k] = np.stack([_keep_mask(before[li][0], *after[li]) for li in range(len(layers))])
                info["decode"][k] = _decode_probe(model, cache, ids, n)
        print(f"kvpress: prompt {i} ({n} tokens) done", flush=True)
    np.savez_compressed(work / "kvpress.npz", **out)
    (work / "kvpress.json").write_text(json.dumps(info, indent=1))


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _keep_mask(orig, comp, masked) -> np.ndarray:
    """(G, n) kept entries: rows of `comp` (G, n', d) matched exactly (bytes) to rows of `orig` (G, n, d), minus
    kvpress's masked (batch, head, token) indices."""
    o, c = orig.float().numpy(), comp.float().numpy()
    G, n, _ = o.shape
    keep = np.zeros((G, n), dtype=bool)
    for g in range(G):
        where = {row.tobytes(): j for j, row in enumerate(o[g])}
        if len(where) != n:
            raise RuntimeError(f"head {g}: two prompt keys are identical, kept rows cannot be told apart")
        idx = [where.get(row.tobytes(), -1) for row in c[g]]
        if min(idx) < 0 or len(set(idx)) != len(idx):
            raise RuntimeError(f"head {g}: a kept key matches no prompt key, or two kept keys the same one")
        keep[g, idx] = True
    if masked is not None:
        _, heads, tokens = masked
        keep[heads.cpu().numpy(), tokens.cpu().numpy()] = False
    return keep


QUESTION_TOKENS = 8  # the decode probe feeds this many tokens at once, as kvpress's pipeline feeds a question


def _decode_probe(model, cache, ids, n: int) -> str:
    """What kvpress's pipeline does after prefill: a multi-token question (here the prompt's last tokens again)
    at positions n.., then one greedy step, on the compressed cache: 'ok' or the error."""
    import torch

    q = ids[:, -QUESTION_TOKENS:]
    pos = torch.arange(n, n + QUESTION_TOKENS).unsqueeze(0)
    try:
        with torch.no_grad():
            out = model(input_ids=q, past_key_values=cache, position_ids=pos)
            model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, position_ids=pos[:, -1:] + 1)
        return "ok"
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


# ---------------------------------------------------------------------------------------------------- 3. compare
def compare(work: Path, table: Path = TABLE) -> pd.DataFrame:
    """The tidy table: one row per (prompt, budget, policy, setting, layer)."""
    import pandas as pd

    meta = json.loads((work / "project.json").read_text())
    info = json.loads((work / "kvpress.json").read_text())
    proj, kvp = np.load(work / "project.npz"), np.load(work / "kvpress.npz")
    versions = (f"kvpress {info['kvpress']} (torch {info['torch']}, transformers {info['transformers']}); "
                f"project torch {meta['torch']}, transformers {meta['transformers']}")
    rows = []
    for i, p in enumerate(meta["prompts"]):
        for policy in CASES:
            if policy in meta["skipped"]:
                rows.append({"prompt": p["name"], "n": p["n"], "policy": policy, "notes": meta["skipped"][policy]})
                continue
            for budget in BUDGETS:
                k = key_of(i, budget, policy)
                common = {"prompt": p["name"], "n": p["n"], "budget": budget, "policy": policy,
                          "kvpress_press": _press_name(CASES[policy]["press"])}
                if k not in kvp:
                    rows.append({**common, "notes": "kvpress " + info["errors"].get(k, "gave no keep-set")})
                    continue
                theirs = kvp[k]
                w = meta["window"] if policy not in ("streamingllm", "tova", "keydiff") else 0
                snap = kvp.get(key_of(i, budget, "snapkv"))
                fell_back = policy == "pyramidkv" and snap is not None and np.array_equal(theirs, snap)
                for setting in SETTINGS:
                    ours = proj[key_of(i, budget, policy, setting)]
                    jac, nested = jaccard_per_layer(ours, theirs), nested_per_layer(ours, theirs)
                    for li, j in enumerate(jac):
                        notes = []
                        if j < 1:
                            notes.append(EXPLAIN.get((policy, setting), "unexplained"))
                            if nested[li]:
                                notes.append("nested keep-sets: same ranking, only the count differs")
                        if fell_back:
                            notes.append("kvpress's keep-set equals its SnapKVPress one (fallback, B/beta < w)")
                        if w and not theirs[li, :, -w:].all():
                            notes.append(f"kvpress evicted {int((~theirs[li, :, -w:]).sum())} window entries")
                        rows.append({**common, "setting": setting, "layer": li, "jaccard": float(j),
                                     "kept_project": int(ours[li].sum()), "kept_kvpress": int(theirs[li].sum()),
                                     "kvpress_decode_step": info["decode"].get(k, ""), "notes": "; ".join(notes)})
    df = pd.DataFrame(rows)
    df["versions"] = versions
    cols = ["policy", "setting", "layer", "jaccard", "notes", "prompt", "n", "budget", "kept_project",
            "kept_kvpress", "kvpress_press", "kvpress_decode_step", "versions"]
    df = df[cols]
    table.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(table, index=False)
    return df


def _press_name(spec) -> str:
    name, kwargs = spec
    inner = ", ".join(f"{k}={_press_name(v) if isinstance(v, tuple) else v}" for k, v in kwargs.items())
    return f"{name}({inner})"


def summary(df) -> pd.DataFrame:
    """min / mean per-layer Jaccard per (policy, setting, budget)."""
    ok = df.dropna(subset=["jaccard"])
    return ok.groupby(["policy", "setting", "budget"], sort=False)["jaccard"].agg(["min", "mean"]).round(4)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["project", "kvpress", "compare"])
    ap.add_argument("--work", type=Path, default=WORK, help="folder for the .npz/.json exchanged by the steps")
    ap.add_argument("--table", type=Path, default=TABLE, help="CSV written by the compare step")
    a = ap.parse_args(argv)
    if a.step == "project":
        run_project(a.work)
    elif a.step == "kvpress":
        run_kvpress(a.work)
    else:
        df = compare(a.work, a.table)
        print(summary(df).to_string())
        print(f"wrote {a.table} ({len(df)} rows)")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
