"""hf.press: the project's policies inside plain Hugging Face `generate`.

On the embedded model (short prompts, 8 new tokens): FullKV (or a policy at budget "full") equals plain
`model.generate`; compressing policies equal the project's own `generate.generate` token for token, and their logits
equal the project's per-token `generate.decode` exactly; a batch equals each row alone (equal lengths, and left
padding); the cache holds only the kept entries plus the decoded tokens. Tiny random models of the other families,
both decode kernels; bad input.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPT
from transformers import DynamicCache

from flowkv_utils import hf
from flowkv_utils.cache import RaggedCache
from flowkv_utils.capture import prefill
from flowkv_utils.generate import decode, generate
from flowkv_utils.models import chat_ids, random_model
from flowkv_utils.policies import get_policy, prefill_options

N = 8  # new tokens per prompt
WINDOW = 16
BUDGET = 40  # tokens per KV head, of ~160
STORY, _ = PROMPT.split("Question:")


def greedy(model, ids, mask=None, **kw) -> torch.Tensor:
    """The N new tokens (B, N) of greedy HF generate (eos disabled, so every row runs N steps as the project's
    generate without a tokenizer does)."""
    mask = torch.ones_like(ids) if mask is None else mask
    out = model.generate(ids, attention_mask=mask, max_new_tokens=N, do_sample=False, eos_token_id=None,
                         pad_token_id=0, **kw)
    seq = out.sequences if hasattr(out, "sequences") else out
    return seq[:, ids.shape[1]:]


@pytest.fixture(scope="module")
def prompts(embedded):
    """Two different chat prompts (1, 160) of equal length: the story's end with two different questions."""
    _, tok = embedded
    questions = ("Who became principal keeper of the Skerry Point lighthouse in 1911?",
                 "In which year was the light automated, and where are the logbooks kept?")
    return [chat_ids(tok, STORY + "Question: " + q)[:, -160:] for q in questions]


@pytest.fixture(scope="module")
def flowkv_alone(embedded, prompts):
    """FlowKV's answers of each prompt alone (and of the first without its first 40 tokens), inside the press."""
    model, _ = embedded
    with hf.press(model, "flowkv", budget=BUDGET, window=WINDOW):
        return [greedy(model, x)[0].tolist() for x in (*prompts, prompts[0][:, 40:])]


@pytest.mark.parametrize("name, budget", [("fullkv", 0.1), ("snapkv", "full")])
def test_full_cache_equals_plain_generate(embedded, prompts, name, budget):
    model, _ = embedded
    ids = prompts[0]
    plain = greedy(model, ids)
    with hf.press(model, name, budget=budget, window=WINDOW) as p:
        pressed = greedy(model, ids)
    assert pressed.tolist() == plain.tolist()
    L, G = model.config.num_hidden_layers, model.config.num_key_value_heads
    assert p.cache.kept_entries() == L * G * ids.shape[1]


@pytest.mark.parametrize("name", ["snapkv", "flowkv", "adakv", "smoothevict", "h2o"])
def test_policy_equals_project_generate(embedded, prompts, name):
    """Tokens = generate.generate; the cache holds exactly the kept entries (+ the decoded tokens), packed."""
    model, _ = embedded
    ids = prompts[0]
    policy = get_policy(name, window=WINDOW)
    pf = prefill(model, ids, window=WINDOW, **prefill_options([policy]))
    result = policy(pf, BUDGET)
    expect = generate(pf, result, max_new_tokens=N)
    with hf.press(model, name, budget=BUDGET, window=WINDOW) as p:
        got = greedy(model, ids)[0].tolist()
    assert got == expect
    c, (L, G) = p.cache, tuple(result.kept_per_head.shape)
    assert result.total_kept < L * G * pf.n
    assert c.kept_entries() == sum(lay.k.shape[0] for lay in c.ragged.layers) == result.total_kept
    assert torch.equal(c.kept[0], result.kept_per_head.cpu())
    assert c.ragged.used == N - 1 and c.entries() == result.total_kept + L * G * (N - 1)
    assert c.allocated_bytes() == c.kept_bytes() + L * (G + 1) * 8  # kept K/V + offsets: nothing padded
    assert torch.equal(c.positions(1).cpu(), torch.tensor([[pf.n + N - 1]]))  # RoPE continues from n, not the kept count


def test_logits_equal_project_decode(embedded, prompts):
    """Every step's logits are exactly the project's: the prefill's, then `generate.decode` one token at a time."""
    model, _ = embedded
    ids = prompts[1]
    policy = get_policy("snapkv", window=WINDOW)
    pf = prefill(model, ids, window=WINDOW)
    result = policy(pf, BUDGET)
    with hf.press(model, policy, budget=BUDGET):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    cache = RaggedCache.from_prefill(pf, result, capacity=N)
    ref = [pf.logits] + [decode(model, cache, t.view(1, 1))[-1] for t in out.sequences[0, ids.shape[1]:-1]]
    assert torch.equal(torch.stack(out.logits)[:, 0], torch.stack(ref))


def test_batch_rows_equal_each_alone(embedded, prompts, flowkv_alone):
    model, _ = embedded
    with hf.press(model, "flowkv", budget=BUDGET, window=WINDOW) as p:
        both = greedy(model, torch.cat(prompts)).tolist()
    assert both == flowkv_alone[:2] and both[0] != both[1]
    B, L, G = p.cache.kept.shape
    assert (B, p.cache.kept_entries()) == (2, int(p.cache.kept.sum())) and p.cache.kept_entries() < 2 * L * G * 160


def test_left_padded_batch_equals_each_alone(embedded, prompts, flowkv_alone):
    model, _ = embedded
    short = prompts[0][:, 40:]
    ids = torch.cat([prompts[1], torch.cat([torch.zeros(1, 40, dtype=torch.long), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    with hf.press(model, "flowkv", budget=BUDGET, window=WINDOW) as p:
        got = greedy(model, ids, mask).tolist()
    assert got == [flowkv_alone[1], flowkv_alone[2]]
    assert p.cache.lengths.tolist() == [160, 120]  # each row's own RoPE positions
    with hf.press(model, "flowkv", budget=BUDGET, window=WINDOW), pytest.raises(ValueError, match="row 1 is padded on the right"):
        greedy(model, ids, mask.flip(-1))


@pytest.mark.parametrize("family, kv_heads, kernel", [("qwen3", 2, "reference"), ("qwen2", 2, "split_kv"),
                                                      ("mistral", 1, "split_kv"), ("llama", 4, "reference")])
def test_tiny_models(family, kv_heads, kernel):
    """Other families (q/k norms, biases, MQA, MHA), a batch of 2, both decode kernels (split-KV: its PyTorch
    transcription on the CPU) and a tail that grows, against generate.generate of each row."""
    model = random_model(family, layers=2, heads=4, kv_heads=kv_heads, head_dim=16, vocab=128, seed=3)
    ids = torch.randint(128, (2, 48), generator=torch.Generator().manual_seed(1))
    policy = get_policy("adakv", window=8)
    expect = [generate(pf, policy(pf, 16), max_new_tokens=N) for pf in (prefill(model, x[None], window=8) for x in ids)]
    with hf.press(model, "adakv", budget=16, window=8, kernel=kernel, capacity=3) as p:  # the tail grows
        got = greedy(model, ids).tolist()
    assert got == expect
    assert (p.cache.attend is None) == (kernel == "reference") and p.cache.ragged.capacity > 3


def test_sampling_runs(embedded, prompts):
    model, _ = embedded
    with hf.press(model, "snapkv", budget=BUDGET, window=WINDOW) as p:
        torch.manual_seed(0)
        out = model.generate(prompts[0], attention_mask=torch.ones_like(prompts[0]), max_new_tokens=4,
                             do_sample=True, top_k=20, pad_token_id=0)
    assert out.shape[1] <= 164 and p.cache.ragged.used == out.shape[1] - 161


def test_bad_input(embedded, prompts):
    model, _ = embedded
    ids = prompts[0]
    for kw, err, match in [(dict(policy="nope"), ValueError, "unknown policy 'nope'"),
                           (dict(budget=0), ValueError, "budget=0"),
                           (dict(budget=1.5), ValueError, r"fractional budget must lie in \(0, 1\]"),
                           (dict(budget="half"), ValueError, "budget='half'"),
                           (dict(kernel="triton"), ValueError, "kernel='triton'"),
                           (dict(capacity=0), ValueError, "capacity=0"),
                           (dict(kernel_size=3), TypeError, "policy 'snapkv'"),
                           (dict(policy=get_policy("snapkv"), window=8), ValueError, "brings its own window")]:
        with pytest.raises(err, match=match), hf.press(model, **{"policy": "snapkv", "budget": BUDGET, **kw}):
            pass
    with hf.press(model, "snapkv", budget=BUDGET, window=WINDOW):
        for kw, match in [(dict(num_beams=2), "generation mode 'beam_search'"),
                          (dict(assistant_model=model), "assistant_model"),
                          (dict(past_key_values=DynamicCache()), "builds its own cache"),
                          (dict(use_cache=False), "use_cache=False"),
                          (dict(cache_implementation="static"), "cache_implementation='static'"),
                          (dict(prefill_chunk_size=64), "prefill_chunk_size=64")]:
            with pytest.raises(ValueError, match=match):
                model.generate(ids, max_new_tokens=2, **kw)
        with pytest.raises(RuntimeError, match="already active"), hf.press(model, "snapkv", BUDGET):
            pass
        with pytest.raises(ValueError, match="not supported: labels"):
            model(ids, labels=ids)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__  # the model is itself again
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="inside hf.press"):
        hf.ragged_attention(model.model.layers[0].self_attn, None, None, None, None, flowkv_cache=None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_split_kv_equals_project_generate(dtype):
    """On CUDA the press decodes with the split-KV Triton kernel ("auto"): the same tokens as the project's generate
    with the same kernel (`fastdecode.SplitKVAttend`), per row of an equal-length batch; float32 also with the
    reference kernel. Run on the lent GPU: `python -m pytest -m gpu tests/test_hf.py`."""
    from flowkv_utils.fastdecode import SplitKVAttend

    model = random_model("llama", layers=3, heads=8, kv_heads=2, head_dim=64, vocab=256, seed=0).to("cuda", dtype)
    ids = torch.randint(256, (2, 96), generator=torch.Generator().manual_seed(0)).cuda()
    policy = get_policy("flowkv", window=16)
    pfs = [prefill(model, x[None], window=16) for x in ids]
    expect = [generate(pf, policy(pf, 32), max_new_tokens=N, attend=SplitKVAttend()) for pf in pfs]
    with hf.press(model, "flowkv", budget=32, window=16) as p:
        got = greedy(model, ids).tolist()
    assert isinstance(p.cache.attend, SplitKVAttend) and p.cache.ragged.layers[0].k.is_cuda
    assert got == expect
    if dtype == torch.float32:
        with hf.press(model, "flowkv", budget=32, window=16, kernel="reference"):
            assert greedy(model, ids).tolist() == [generate(pf, policy(pf, 32), max_new_tokens=N) for pf in pfs]
