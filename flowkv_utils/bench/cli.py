"""`python -m flowkv_utils.bench <subcommand>` (or `flowkv-bench`): the subcommands of the package docstring."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from ..budgets import BUDGET_HELP, FULL, budget_argument, parse_budget
from ..kernels import triton_available
from ..layerwise import DEFAULT_SLACK, streaming_policies
from ..policies import REGISTRY, STUDY
from ..results import REPO, Recorder
from .checks import score_checks
from .cpu import context_sweep, load_times, notebook_times, policies_overhead
from .evaluation import BUDGETS, eval_rate
from .gemv import GEMV_TUNE, gemv_speed
from .gpu import TUNE, decode_profile, gpu_sweep
from .peers import PEERS, peers_sweep
from .scale import PARTS as SCALE_PARTS
from .scale import scale_sweep
from .scoring import profile_prefill, scoring_parts, scoring_prefills
from .shapes import SHAPES, WEIGHT_FORMATS
from .tables import recorder
from .timing import copy_bandwidth, start_run

COMMANDS = ("load", "notebooks", "policies", "decode", "gpu", "profile", "gemv", "scoring", "eval", "scale", "peers",
            "all")
CPU_COMMANDS = ["load", "policies", "decode", "notebooks"]  # what `all` runs


def _embedded(device: str = "cpu"):
    from ..models import load_model

    return load_model("embedded", device=device)


def parser() -> argparse.ArgumentParser:
    doc = sys.modules[__package__].__doc__ or ""
    ap = argparse.ArgumentParser(prog="python -m flowkv_utils.bench", description=doc.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in COMMANDS:
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, default=None,
                       help="folder for CSV + meta.json (default runs/bench/<cmd>)")
        if name == "notebooks":
            p.add_argument("--set", dest="param_set", default="default")
            p.add_argument("names", nargs="*")
        if name == "policies":
            p.add_argument("--n", type=int, default=4096, help="prompt tokens")
            p.add_argument("--budget", type=parse_budget, default=0.05, help=BUDGET_HELP)
        if name == "decode":
            p.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096])
            p.add_argument("--budget", type=parse_budget, default=0.1, help=BUDGET_HELP)
            p.add_argument("--steps", type=int, default=8)
        if name == "scoring":
            p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
            p.add_argument("--contexts", type=int, nargs="+", default=[131072])
            p.add_argument("--budget", type=float, default=0.05)
            p.add_argument("--slacks", type=float, nargs="*", default=[0.0, DEFAULT_SLACK],
                           help="also prefill the whole model once per slack (FlowKV global re-packing)")
            p.add_argument("--device", default="cuda")
            p.add_argument("--tune", action="store_true", help="time launch-setting variants of the score kernel")
            p.add_argument("--profile", type=int, default=None, metavar="N",
                           help="also profile one compressing prefill of N tokens (torch.profiler): profile_N.txt")
        if name == "profile":
            p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
            p.add_argument("--context", type=int, default=204800, help="prompt tokens of the cache")
            p.add_argument("--budgets", nargs="+", default=[None, 0.05], type=_profile_budget,
                           help='"full" (FullKV) or a kept fraction of the prompt per KV head, e.g. 0.05')
            p.add_argument("--steps", type=int, default=10)
            p.add_argument("--device", default="cuda", help="cuda, or cpu (a dry run: --shape tiny --context 512)")
        if name == "eval":
            p.add_argument("--model-path", default="embedded", help='"embedded", a HF model folder or a .gguf file')
            p.add_argument("--device", default="cuda")
            p.add_argument("--dtype", default="bfloat16")
            p.add_argument("--context", type=int, default=8000, help="prompt tokens (NIAH)")
            p.add_argument("--instances", type=int, default=4)
            p.add_argument("--budgets", type=parse_budget, nargs="+", default=list(BUDGETS), help=BUDGET_HELP)
            p.add_argument("--no-reference", action="store_true", help="skip the reference path's check sample")
            p.add_argument("--table", type=Path, default=None, help="also keep the fast path's sweep table here")
            p.add_argument("--policies", nargs="+", default=list(STUDY), choices=list(REGISTRY), metavar="POLICY",
                           help="policies to time (default: every study policy)")
            p.add_argument("--question", choices=("aware", "agnostic"), default="aware",
                           help="compress the question with the context (aware) or the context before it")
        if name == "peers":
            p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
            p.add_argument("--contexts", type=int, nargs="+", default=[131072, 204800])
            p.add_argument("--budget", type=float, default=0.05, help="kept fraction of the sparse/gathered rows")
            p.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
            p.add_argument("--steps", type=int, default=10)
            p.add_argument("--device", default="cuda")
        if name == "scale":
            p.add_argument("--shape", default="llama3-70b", choices=sorted(SHAPES))
            p.add_argument("--weights", nargs="+", default=["fp8", "bf16"], choices=list(WEIGHT_FORMATS),
                           help="one model per format in turn: fp8 = the layers' projections in FP8 e4m3")
            p.add_argument("--contexts", type=int, nargs="+", default=[131072, 262144, 524288])
            p.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.05, 0.1])
            p.add_argument("--policy", default="flowkv", choices=list(REGISTRY))
            p.add_argument("--batch-budget", type=float, default=0.05,
                           help="budget of the largest-batch search and of the prefill rows")
            p.add_argument("--prefill-contexts", type=int, nargs="*", default=[131072, 524288])
            p.add_argument("--prefill-layers", type=int, default=2,
                           help="layers the prefill runs (all weights resident), extrapolated to the model")
            p.add_argument("--chunk", type=int, default=8192, help="prefill rows per chunk")
            p.add_argument("--steps", type=int, default=10)
            p.add_argument("--frontier-start", type=int, default=8192)
            p.add_argument("--frontier-resolution", type=int, default=4096)
            p.add_argument("--max-batch", type=int, default=1024)
            p.add_argument("--parts", nargs="+", default=list(SCALE_PARTS), choices=list(SCALE_PARTS))
            p.add_argument("--device", default="cuda", help="cuda, or cpu (a dry run on --shape tiny)")
        if name == "gemv":
            p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
            p.add_argument("--tune", action="store_true", help="time the launch-setting variants of bench.gemv.GEMV_TUNE")
            p.add_argument("--device", default="cuda")
        if name == "gpu":
            p.add_argument("--slack", type=float, default=DEFAULT_SLACK, help="FlowKV global re-packing slack (layerwise)")
            p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
            p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 65536, 131072, 204800])
            p.add_argument("--steps", type=int, default=30)
            p.add_argument("--quick", action="store_true", help="no FullKV prefills, no batch search")
            p.add_argument("--no-checks", action="store_true")
            p.add_argument("--device", default="cuda", help="cuda (the sweep) or cpu (a dry run on a tiny shape: "
                           "--shape tiny --contexts 1024 2048 --budgets 0.05 0.1 --steps 3 --max-batch 4)")
            p.add_argument("--max-batch", type=int, default=4096)
            p.add_argument("--tune", action="store_true", help="time several kernel block/warps/stages variants")
            p.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2])
            p.add_argument("--policies", nargs="+", default=["fullkv", "snapkv", "flowkv", "flowkv_global"],
                           choices=["fullkv", *(n for n in streaming_policies() if n != "fullkv")], metavar="POLICY",
                           help="decoded at every context (synthetic caches of their real per-head lengths); the "
                                "prefill applies FlowKV global and scores the others on the same layers")
            p.add_argument("--pages", type=int, nargs="*", default=[16],
                           help="page sizes of the block-sparse (Quest-style) rows over the whole cache (none: skip)")
    return ap


def _profile_budget(text: str) -> float | None:
    """`bench profile --budgets`: "full" (None: FullKV) or a fraction of the prompt in (0, 1] (`budget_argument`'s
    checks; token budgets are refused)."""
    b = budget_argument(text)
    if b == FULL:
        return None
    if isinstance(b, int):
        raise argparse.ArgumentTypeError(f"budget {text!r}: allowed are 'full' or a fraction in (0, 1], e.g. 0.05")
    return b


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parser().parse_args(argv)
    command = "python -m flowkv_utils.bench " + shlex.join(argv)
    for cmd in CPU_COMMANDS if a.cmd == "all" else [a.cmd]:
        out = a.out if (a.out and a.cmd != "all") else (a.out or REPO / "runs" / "bench") / cmd
        print(f"== bench {cmd} → {out}", flush=True)
        rec = recorder(out, command)
        try:
            _run(cmd, a, rec)
            rec.save_meta()
        finally:
            rec.close()
        print(summary(rec))
    return 0


def _run(cmd: str, a: argparse.Namespace, rec: Recorder) -> None:
    """One subcommand (its arguments in `a`), recorded by `rec`."""
    if cmd == "gpu":
        gpu_sweep(rec.out, shape=a.shape, contexts=tuple(a.contexts), steps=a.steps, budgets=tuple(a.budgets),
                  fullkv_prefill=not a.quick, batch_search=not a.quick, checks=not a.no_checks, device=a.device,
                  max_batch=a.max_batch, kernel_variants=TUNE if a.tune else None, slack=a.slack,
                  policies=tuple(a.policies), pages=tuple(a.pages), rec=rec)
    elif cmd == "profile":
        _, text = decode_profile(rec.out, shape=a.shape, context=a.context, budgets=tuple(a.budgets), steps=a.steps,
                                 device=a.device, rec=rec)
        print(text)
    elif cmd == "gemv":
        if not (torch.device(a.device).type == "cuda" and triton_available()):
            raise SystemExit(f"bench gemv times Triton kernels: it needs CUDA and triton (device {a.device!r})")
        _, _, _, bw, _ = start_run("gemv", rec.out, None, a.device, rec)  # + the bandwidth and compute rows
        config = gemv_speed(rec, bw, a.shape, a.device, GEMV_TUNE if a.tune else None)
        rec.save_meta(gemv_config=asdict(config))
        for r in rec.rows["gemv"]:
            if r["best"] or r["impl"].startswith("cublas"):
                print(f"  {r['projection']:<8} {r['impl']:<30} {r['us']:8.1f} us  {r['frac_of_copy']:6.1%} of copy"
                      + (f"  rows {r['rows']} block_k {r['block_k']} warps {r['num_warps']} stages {r['num_stages']}"
                         if r["rows"] else ""))
    elif cmd == "peers":
        peers_sweep(rec.out, shape=a.shape, contexts=tuple(a.contexts), budget=a.budget, peers=tuple(a.peers),
                    steps=a.steps, device=a.device, rec=rec)
    elif cmd == "scale":
        scale_sweep(rec.out, shape=a.shape, weights=tuple(a.weights), contexts=tuple(a.contexts),
                    budgets=tuple(a.budgets), policy=a.policy, batch_budget=a.batch_budget,
                    prefill_contexts=tuple(a.prefill_contexts), prefill_layers=a.prefill_layers, chunk=a.chunk,
                    steps=a.steps, frontier_start=a.frontier_start, frontier_resolution=a.frontier_resolution,
                    max_batch=a.max_batch, parts=tuple(a.parts), device=a.device, rec=rec)
    elif cmd == "eval":
        eval_rate(rec, a.model_path, a.device, a.dtype, a.context, a.instances, a.budgets, not a.no_reference,
                  a.table, a.policies, a.question)
    elif cmd == "load":
        load_times(rec)
    elif cmd == "notebooks":
        notebook_times(rec, getattr(a, "param_set", "default"), getattr(a, "names", None) or None)
    elif cmd == "policies":
        model, tok = _embedded()
        policies_overhead(model, tok, getattr(a, "n", 4096), getattr(a, "budget", 0.05), rec=rec)
    elif cmd == "decode":
        model, tok = _embedded()
        bw = copy_bandwidth("cpu")
        rec.add("bandwidth", **bw)
        context_sweep(model, getattr(a, "contexts", [512, 1024, 2048, 4096]), budget=getattr(a, "budget", 0.1),
                      tok=tok, rec=rec, bw=bw, steps=getattr(a, "steps", 8))
    elif cmd == "scoring":
        if torch.device(a.device).type == "cuda" and triton_available() and not score_checks(rec, a.device):
            raise SystemExit("the FlowKV score kernel disagrees with the PyTorch path (see check.csv)")
        score_config = scoring_parts(rec, a.shape, tuple(a.contexts), a.budget, device=a.device, tune=a.tune)
        if a.slacks:
            scoring_prefills(rec, a.shape, tuple(a.contexts), a.budget, tuple(a.slacks), device=a.device,
                             score_config=score_config)
        if a.profile:
            text = profile_prefill(rec.out / f"profile_{a.profile}.txt", a.shape, a.profile, a.budget, a.device,
                                   score_config=score_config)
            print("\n".join(text.splitlines()[:12]))
        rec.save_meta(score_config=asdict(score_config))


def summary(rec: Recorder) -> str:
    """A short printed table of what was measured (the last lines of a run)."""
    lines = [f"-- {table}: {len(rows)} rows" for table, rows in rec.rows.items()]
    for r in rec.rows.get("decode", [])[-12:]:
        if r["status"] == "ok":
            b = f"{r['budget']:.4g}" if isinstance(r["budget"], float) else str(r["budget"])
            lines.append(f"  {r['sweep']:<8} {r['policy']:<13} b={b:<5} n={r['context']:<7} B={r['batch']:<4} "
                         f"{r['impl']:<22} {r['decode_ms']:8.2f} ms  {r['tokens_per_s']:9.1f} tok/s"
                         f"  floor×{r['floor_ratio']:.2f}")
    for r in rec.rows.get("eval", []):
        lines.append(f"  eval {r['path']:<9} {r['points']} points in {r['seconds']:.1f} s = {r['points_per_s']:.1f} "
                     f"points/s; same predictions as the reference: {r['check_same_predictions']}/{r['check_points']}"
                     + (f" (differ: {r['check_differs']})" if r.get("check_differs") else ""))
        lines.append("       seconds: " + ", ".join(f"{k[:-2]} {r[k]:.2f}" for k in
                                                    ("prefill_s", "select_s", "decode_s", "fidelity_s", "write_s")))
    for r in rec.rows.get("check", []):
        if not r["ok"]:
            lines.append(f"  CHECK FAILED: {r['what']} {r['config']} rel {r['rel_err']:.2e}")
    return "\n".join(lines)
