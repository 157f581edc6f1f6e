"""Triton plumbing shared by the kernels: is Triton usable here, and build a kernel set once, on first use.

Importing anything in `kernels/` never needs triton (CPU machines have none); the kernels are compiled lazily."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

_BUILT: dict[str, dict] = {}


def triton_available() -> bool:
    """True when triton imports and a CUDA device is present (or TRITON_INTERPRET=1 for CPU checks)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(impl: str, tensor: torch.Tensor) -> bool:
    """Resolve an `impl` argument ('auto' | 'triton' | 'torch'): auto means Triton for CUDA tensors when it imports."""
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl={impl!r}: allowed are 'auto', 'triton', 'torch'")
    return impl == "triton" or (impl == "auto" and tensor.is_cuda and triton_available())


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a CUDA device, asked of the driver once per device (calls sit on decode paths)."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def built(name: str, build: Callable[[], dict]) -> dict:
    """The kernels `build()` returns (a dict of jitted functions), built once per process under `name`."""
    if name not in _BUILT:
        _BUILT[name] = build()
    return _BUILT[name]


def replace_fields(config, **changes):
    """A copy of a frozen launch-settings dataclass with some fields changed; unknown names raise, naming the known
    ones (`SplitKVConfig.replace`, `ScoreConfig.replace`)."""
    import dataclasses

    known = [f.name for f in dataclasses.fields(config)]
    unknown = sorted(set(changes) - set(known))
    if unknown:
        raise ValueError(f"{type(config).__name__}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return dataclasses.replace(config, **changes)


def pow2_pad(x: int, least: int = 16) -> int:
    """Smallest power of two ≥ x and ≥ least (Triton block shapes must be powers of two, tl.dot needs ≥ 16)."""
    return max(least, 1 << (x - 1).bit_length())
