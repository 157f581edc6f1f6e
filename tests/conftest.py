"""Shared fixtures: the embedded model (loaded once per session) and one real-prompt prefill on it.

`embedded` → (model, tok) from `load_model()` in float32; `small_prefill` → `prefill()` of PROMPT (a real
English paragraph of ~300 tokens with a question at the end, chat template applied) with window 32. `tiny` →
(random-weight model of 3 layers, 8 heads, 2 KV heads, d 16; its prefill of 90 random tokens, window 8; FlowKV's
ragged keep-set at 24 tokens per head) for decode-path tests.
"""

from __future__ import annotations

import pytest
import torch

from flowkv_utils.capture import prefill
from flowkv_utils.models import chat_ids, load_model

PROMPT = (
    "The lighthouse on Skerry Point was built in 1874 after a winter storm drove three fishing boats onto the "
    "rocks below the cliffs. Its first keeper, a former ship's carpenter named Thomas Reid, lived in the small "
    "stone cottage at the foot of the tower with his wife Margaret and their two daughters. Every evening at "
    "sunset he climbed the one hundred and twelve steps to light the paraffin lamp, and every morning he "
    "trimmed the wicks, polished the brass and cleaned the great glass lens, which had been made in Paris and "
    "shipped north in eleven wooden crates. Reid kept a daily log for thirty-one "
    "years: the weather, the ships that passed, and the supply boat that came from the harbour town of "
    "Kilbride every second Thursday. When he retired in 1905 his younger daughter, Agnes, who had helped him in the tower since she "
    "was twelve, applied to take his place. The lighthouse board refused at first, but after the captain of the "
    "supply boat and forty fishermen signed a letter in her support, she was appointed assistant keeper in 1906 "
    "and principal keeper in 1911. She served until the light was automated in 1948, and her logbooks are now "
    "kept in the county museum at Kilbride.\n\n"
    "Question: Who became principal keeper of the Skerry Point lighthouse in 1911, and what was her father's "
    "profession before he became a keeper?"
)
WINDOW = 32


@pytest.fixture(scope="session")
def embedded():
    """(model, tok): the embedded SmolLM2-135M-Instruct in float32, eval mode (cached after the first load)."""
    torch.manual_seed(0)
    return load_model("embedded", dtype=torch.float32)


@pytest.fixture(scope="session")
def small_prefill(embedded):
    """Prefill of PROMPT (~300 tokens, question at the end) on the embedded model, window 32; every prompt query is
    kept too (all_queries), so that every registered policy (H2O) runs on it."""
    model, tok = embedded
    return prefill(model, chat_ids(tok, PROMPT), window=WINDOW, all_queries=True)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for modules of tiny-tensor tests: intra-op threads only add contention there (≈30× slower
    on a busy 2-core machine). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    from flowkv_utils import capture, models, policies

    m = models.random_model("llama", layers=3, heads=8, kv_heads=2, head_dim=16, hidden=64, vocab=100)
    ids = torch.randint(0, 100, (1, 90), generator=torch.Generator().manual_seed(0))
    pf = capture.prefill(m, ids, window=8)
    return m, pf, policies.get_policy("flowkv", window=8)(pf, 24)
