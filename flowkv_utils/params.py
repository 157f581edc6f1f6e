"""Notebook parameters, checked before anything runs: name, declared type and allowed values.

The runner (`runner.py`) reads each notebook's `parameters` cell with papermill (`name: type = value  # help`),
merges the named parameter set and the -p overrides, and calls `check_parameters` for every selected notebook
before the first one starts; a failure names the notebook, the parameter, the value and what is allowed. Value
checks are keyed by parameter name, so the same knob (dtype, device, budgets, policies, ...) means the same thing
in every notebook.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16", "float64")


class ParameterError(ValueError):
    """A notebook parameter that is unknown, of the wrong type or outside its allowed values."""

    def __init__(self, notebook: str, name: str, value, allowed: str):
        self.notebook, self.name, self.value, self.allowed = notebook, name, value, allowed
        super().__init__(f"notebook {notebook}, parameter {name}={value!r}: allowed: {allowed}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _type_ok(declared: str, v) -> bool:
    """Whether v fits the type a parameters cell declares (an int where a float is declared is fine)."""
    if declared in ("", "None", "Any"):
        return True
    if declared == "bool":
        return isinstance(v, bool)
    if declared == "int":
        return _is_int(v)
    if declared == "float":
        return isinstance(v, numbers.Real) and not isinstance(v, bool)
    if declared == "str":
        return isinstance(v, str)
    if declared == "list":
        return isinstance(v, list)
    if declared == "dict":
        return isinstance(v, dict)
    return True


def _device(v) -> str | None:
    if isinstance(v, str) and (v in ("cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit())):
        return None
    return "cpu, cuda or cuda:N"


def _dtype(v) -> str | None:
    return None if v in DTYPES else ", ".join(DTYPES)


def _model_path(v) -> str | None:
    if v == "embedded":
        return None
    p = Path(str(v)).expanduser()
    if p.is_dir() and ((p / "config.json").is_file() or len(list(p.glob("*.gguf"))) == 1):
        return None
    if p.is_file() and p.suffix.lower() == ".gguf":
        return None
    return '"embedded", a local Hugging Face model directory (with config.json) or a .gguf file that exists'


def _positive_ints(v) -> str | None:
    return None if isinstance(v, list) and v and all(_is_int(x) and x > 0 for x in v) else \
        "a non-empty list of positive ints (tokens)"


def _fractions(v) -> str | None:
    ok = isinstance(v, list) and v and all(isinstance(x, numbers.Real) and not isinstance(x, bool)
                                           and 0 <= x <= 1 for x in v)
    return None if ok else "a non-empty list of numbers in [0, 1]"


def _kept_fractions(v) -> str | None:
    ok = isinstance(v, list) and v and all(isinstance(x, numbers.Real) and not isinstance(x, bool)
                                           and 0 < x <= 1 for x in v)
    return None if ok else "a non-empty list of numbers in (0, 1]"


def _policies(v) -> str | None:
    from .policies import REGISTRY

    ok = isinstance(v, list) and v and all(isinstance(x, str) and x in REGISTRY for x in v)
    return None if ok else f"a non-empty list of registered policies: {', '.join(REGISTRY)}"


def _budgets(v) -> str | None:
    from .budgets import BUDGET_HELP
    from .sweep import check_budgets

    try:
        check_budgets(v)
    except (TypeError, ValueError) as e:
        return f"a list of budgets, each {BUDGET_HELP} ({e})"
    return None if v else "a non-empty list of budgets"


def _budget(v) -> str | None:
    from .budgets import BUDGET_HELP, parse_budget

    try:
        parse_budget(v)
    except (TypeError, ValueError):
        return BUDGET_HELP
    return None


def _ruler_tasks(v) -> str | None:
    from .tasks.ruler import TASKS

    ok = isinstance(v, list) and all(isinstance(x, str) and x in TASKS for x in v)
    return None if ok else f"a list of RULER-style tasks: {', '.join(TASKS)}"


def _nonneg_int(v) -> str | None:
    return None if _is_int(v) and v >= 0 else "an int ≥ 0"


def _pos_int(v) -> str | None:
    return None if _is_int(v) and v >= 1 else "an int ≥ 1"


def _unit(v) -> str | None:
    return None if isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 <= v <= 1 else "a number in [0, 1]"


def _writable_file(v) -> str | None:
    p = Path(str(v))
    parent = p.parent if str(p.parent) else Path(".")
    existing = next((q for q in [parent, *parent.parents] if q.exists()), Path("."))
    if p.is_dir():
        return "a file path (it names a folder)"
    if not os.access(existing, os.W_OK):
        return f"a path in a writable folder ({existing} is not writable)"
    return None


def _existing_files(v) -> str | None:
    ok = isinstance(v, list) and all(isinstance(x, str) and Path(x).is_file() for x in v)
    return None if ok else "a list of paths of existing files"


def _optional_dir(v) -> str | None:
    return None if v == "" or Path(str(v)).is_dir() else '"" (skip) or an existing folder'


# value checks by parameter name (None: fine; else the text of what is allowed)
CHECKS: dict[str, Callable[[object], str | None]] = {
    "device": _device, "dtype": _dtype, "model_path": _model_path,
    "niah_lengths": _positive_ints, "ruler_lengths": _positive_ints, "contexts": _positive_ints,
    "niah_depths": _fractions, "topk_fracs": _kept_fractions,
    "policies": _policies, "budgets": _budgets, "budget": _budget, "gpu_budget": _budget,
    "ruler_tasks": _ruler_tasks, "window": _pos_int, "steps": _pos_int, "max_new_tokens": _pos_int,
    "context_tokens": _pos_int, "ruler_per_length": _pos_int, "longbench_samples": _pos_int,
    "longbench_max_length": _pos_int, "tokens_around": _pos_int,
    "seed": _nonneg_int, "threads": _nonneg_int, "cpu_threads": _nonneg_int, "n_layers": _nonneg_int,
    "needle_depth": _unit, "score_frac": _unit, "min_fullkv_accuracy": _unit,
    "results_path": _writable_file, "compare_results": _existing_files, "study_tables": _existing_files,
    "longbench_dir": _optional_dir,
}


def check_parameters(notebook: str, declared: dict, params: dict, cwd: Path | None = None) -> None:
    """Check `params` of one notebook against its declared parameters (papermill's inspect_notebook): unknown
    names, declared types and the value checks of `CHECKS`. Relative paths are read from `cwd` (the notebook's
    folder, where papermill runs it)."""
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ParameterError(notebook, unknown[0], params[unknown[0]], f"a known parameter name: "
                             f"{', '.join(declared)}")
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        for name, value in params.items():
            t = declared[name].get("inferred_type_name", "")
            if not _type_ok(t, value):
                raise ParameterError(notebook, name, value, f"a value of type {t} ({declared[name].get('help', '')})")
            check = CHECKS.get(name)
            why = check(value) if check else None
            if why:
                raise ParameterError(notebook, name, value, why)
    finally:
        os.chdir(old)
