"""`bench peers` (what users would run instead): rows that say what they computed, bytes read exactly, and
recorded reasons where a peer cannot run — on the CPU with the tiny shape (timings are never asserted)."""

from __future__ import annotations

import pytest

from flowkv_utils.bench import load_results, peers
from flowkv_utils.bench.shapes import SHAPES


def test_peers_dry_run_on_cpu(tmp_path):
    rec = peers.peers_sweep(tmp_path, shape="tiny", contexts=(300,), peers=("hf_eager", "sdpa", "flashinfer"),
                            steps=2, device="cpu")
    rec.close()
    t = load_results(tmp_path)["peers"]
    s = SHAPES["tiny"]
    sd = t[t.what == "sdpa"].reset_index()
    assert list(sd.kv_read_bytes) == [2 * s["kv_heads"] * m * s["head_dim"] * 4 for m in (300, 15)]
    hf = t[t.what == "hf_eager"].iloc[0]
    assert hf.status == "ok" and hf.kv_read_bytes == 300 * s["layers"] * s["kv_heads"] * s["head_dim"] * 2 * 4
    assert hf.weight_bytes > 0 and hf.floor_ratio > 0
    fi = t[t.what == "flashinfer"].iloc[0]
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        assert fi.status == "unavailable" and "does not import" in fi.note
    assert t.note.str.len().gt(0).all()  # every row says what it computed


def test_peers_reject_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="vllm"):
        peers.peers_sweep(tmp_path, peers=("vllm",), device="cpu")
