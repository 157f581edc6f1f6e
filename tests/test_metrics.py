"""Task metrics and output-fidelity metrics against hand-computed cases."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from flowkv_utils import metrics as M
from flowkv_utils.capture import prefill
from flowkv_utils.models import random_model
from flowkv_utils.policies import get_policy

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------- task metrics


def test_normalize_answer():
    assert M.normalize_answer("  The Cat, sat on a MAT!  ") == "cat sat on mat"
    assert M.normalize_answer("An apple-pie") == "applepie"


def test_qa_f1_hand():
    # "cat sat" vs "cat sat on mat": overlap 2, precision 1, recall 1/2 → F1 = 2/3
    assert M.qa_f1("The cat sat.", "a cat sat on the mat") == pytest.approx(2 / 3)
    assert M.qa_f1("dog", "cat") == 0.0
    assert M.qa_f1("Paris", "paris") == 1.0


def test_rouge_l_hand():
    # LCS("the cat sat", "the cat was sat") = 3: P = 3/3, R = 3/4 → F = 2·0.75/1.75
    assert M.rouge_l("the cat sat", "the cat was sat") == pytest.approx(2 * 0.75 / 1.75)
    assert M.rouge_l("", "anything") == 0.0


def test_classification_hand():
    classes = ["Location", "Number", "Description", "Entity", "Abbreviation", "Human being"]
    assert M.classification("Location", "Location", classes) == 1.0
    assert M.classification("Location or Number", "Location", classes) == 0.5
    assert M.classification("Number", "Location", classes) == 0.0
    # a class that is a substring of the right one is not counted against it
    assert M.classification("Human being", "Human being", classes + ["Human"]) == 1.0


def test_retrieval_count_hand():
    assert M.retrieval("Paragraph 3", "Paragraph 3") == 1.0
    assert M.retrieval("Paragraph 3 or Paragraph 12", "Paragraph 3") == 0.5
    assert M.retrieval("no idea", "Paragraph 3") == 0.0
    with pytest.raises(ValueError, match="Paragraph"):
        M.retrieval("3", "three")
    assert M.count("There are 5 unique paragraphs.", "5") == 1.0
    assert M.count("5 or 6", "5") == 0.5
    assert M.count("five", "5") == 0.0


def test_code_sim_first_noncomment_line():
    assert M.code_sim("# a comment\nx = foo(1)\ny = 2", "x = foo(1)") == 1.0
    assert M.code_sim("```python\nreturn a + b", "return a + b") == 1.0
    assert M.code_sim("\n\nabcd", "abce") == pytest.approx(0.75)  # difflib: 2·3 matches / 8 chars


def test_contains_exact_match_string_match_all():
    assert M.contains("The number is 12345.", "12345") == 1.0
    assert M.contains("The number is 1234.", "12345") == 0.0
    assert M.exact_match("The Answer.", "answer") == 1.0
    assert M.string_match_all("Alpha and GAMMA", ["alpha", "beta", "gamma", "delta"]) == 0.5
    with pytest.raises(ValueError):
        M.string_match_all("x", [])


def test_score_dispatch_max_over_references_and_first_line():
    assert M.score("qa_f1", "paris", ["London", "Paris"]) == 1.0
    assert M.score("qa_f1", "paris\nlondon berlin", ["Paris"], cut_first_line=True) == 1.0
    assert M.score("qa_f1", "paris\nlondon berlin", ["Paris"]) == pytest.approx(0.5)
    assert M.score("classification", "Number", ["Number"], all_classes=["Number", "Location"]) == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        M.score("bleu", "a", ["a"])


# ------------------------------------------------------------------------------------------------- fidelity


def _stub_prefill(A, V, W):
    """A hand-sized 'prefill': one layer, attention A (H, w, n), values V (G, n, d), W_O (H, d, D)."""
    return SimpleNamespace(n=A.shape[-1], attn=lambda li: A, layers=[SimpleNamespace(v=V)], w_o=lambda li: W,
                           b_o=lambda li: None)


def test_window_output_and_error_hand():
    # H = G = 1, w = 1, n = 2, d = D = 1: A = [.25, .75], V = [1, 3], W_O = 2 → O = (.25 + 2.25)·2 = 5
    pf = _stub_prefill(torch.tensor([[[0.25, 0.75]]]), torch.tensor([[[1.0], [3.0]]]), torch.tensor([[[2.0]]]))
    assert M.window_output(pf, 0).item() == pytest.approx(5.0)
    # keep token 1 only: softmax renormalises to [0, 1] → O_S = 3·2 = 6, error 1/5
    err = M.attention_output_errors(pf, torch.tensor([[[False, True]]]))
    assert err.item() == pytest.approx(0.2)
    # keep token 0 only: O_S = 2, error 3/5; merged value 4 for token 0: O_S = 8, error 3/5
    assert M.attention_output_errors(pf, torch.tensor([[[True, False]]])).item() == pytest.approx(0.6)
    vals = [torch.tensor([[[4.0], [3.0]]])]
    assert M.attention_output_errors(pf, torch.tensor([[[True, False]]]), vals).item() == pytest.approx(0.6)


def test_gqa_keep_set_applies_to_all_query_heads():
    # H = 2 query heads share G = 1 KV head; the kept set of the KV head masks both
    A = torch.tensor([[[0.5, 0.5]], [[0.1, 0.9]]])  # (H=2, w=1, n=2)
    V = torch.tensor([[[1.0], [2.0]]])  # (G=1, n=2, d=1)
    W = torch.tensor([[[1.0]], [[10.0]]])  # (H, d, D=1)
    pf = _stub_prefill(A, V, W)
    full = 0.5 * 1 + 0.5 * 2 + 10 * (0.1 * 1 + 0.9 * 2)  # 1.5 + 19 = 20.5
    assert M.window_output(pf, 0).item() == pytest.approx(full)
    kept = 1 * 2 + 10 * 2  # both heads see token 1 only
    assert M.attention_output_errors(pf, torch.tensor([[[False, True]]])).item() == pytest.approx(
        abs(kept - full) / full)


def test_kl_hand():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = ½ ln 2 + ½ ln(2/3) = ½ ln(4/3)
    kl = M.kl_divergence(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]]))
    assert kl.item() == pytest.approx(0.5 * math.log(4 / 3))
    assert M.kl_divergence(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]])).item() == 0.0


@pytest.fixture(scope="module")
def tiny_prefill(one_thread):
    model = random_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8, vocab=64, seed=1)
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    return prefill(model, ids, window=8)


def test_window_output_matches_model(tiny_prefill):
    """Our window output (decomposition route) equals the model's attention block output on the window."""
    for li in range(2):
        torch.testing.assert_close(M.window_output(tiny_prefill, li), tiny_prefill.layers[li].attn_out.float(),
                                   rtol=1e-4, atol=1e-5)


def test_renormalised_equals_masked_softmax(tiny_prefill):
    """Renormalising A over the kept set = softmax with evicted logits at −inf (direct transcription)."""
    pf = tiny_prefill
    keep = torch.rand(2, 2, pf.n, generator=torch.Generator().manual_seed(3)) < 0.5
    keep[..., -8:] = True
    errs = M.attention_output_errors(pf, keep)
    for li in range(2):
        c = pf.layers[li]
        H, w, d = c.q.shape
        qk = torch.einsum("hwd,hnd->hwn", c.q.float(), c.k.float().repeat_interleave(H // 2, 0)) * c.scaling
        pos = torch.arange(pf.n)
        causal = pos.unsqueeze(0) > (pf.n - w + torch.arange(w)).unsqueeze(1)
        mask = causal | ~keep[li].repeat_interleave(H // 2, 0).unsqueeze(1)
        A = torch.softmax(qk.masked_fill(mask, float("-inf")), -1)
        ctx = torch.einsum("hwn,hnd->whd", A, c.v.float().repeat_interleave(H // 2, 0)).reshape(w, -1)
        kept = ctx @ pf.model.model.layers[li].self_attn.o_proj.weight.float().T
        full = M.window_output(pf, li)
        assert errs[li].item() == pytest.approx(float((kept - full).norm() / full.norm()), rel=1e-4)
    assert M.attention_output_errors(pf, torch.ones_like(keep)).max().item() < 1e-5


def test_next_token_kl(tiny_prefill):
    pf = tiny_prefill
    cont = torch.tensor([1, 2, 3])
    full = get_policy("fullkv")(pf)
    assert M.next_token_kl(pf, cont, full) == pytest.approx(0.0, abs=1e-9)
    snap = get_policy("snapkv", window=8)(pf, 12)
    assert M.next_token_kl(pf, cont, snap) > 0.0
    with pytest.raises(ValueError, match="at least one token"):
        M.next_token_kl(pf, torch.tensor([], dtype=torch.long), snap)


@pytest.mark.parametrize("prefix_len", [0, 3])
def test_heldout_attention_is_the_longer_prompts_attention(tiny_prefill, prefix_len):
    """The held-out rows' queries (FullKV's continuation decoded over the full cache, after an optional prefix)
    are the queries a prefill of prompt + prefix + continuation computes at those rows; their attention over the
    n prompt keys, softmax taken over the prompt only, is `heldout_attention`'s."""
    pf = tiny_prefill
    cont = torch.tensor([5, 9, 2, 7])
    pre = torch.arange(prefix_len) + 11
    held = M.heldout_attention(pf, cont, pre if prefix_len else None)
    longer = prefill(pf.model, torch.cat([pf.input_ids[0], pre, cont]).view(1, -1), window=cont.numel())
    for li, c in enumerate(longer.layers):
        H, T, _ = c.q.shape
        qk = torch.einsum("htd,hnd->htn", c.q.float(), c.k[:, : pf.n].float().repeat_interleave(H // 2, 0))
        torch.testing.assert_close(held[li], torch.softmax(qk * c.scaling, -1), rtol=1e-4, atol=1e-6)
        assert held[li].shape == (4, 4, pf.n)


def test_heldout_errors_zero_when_all_kept_and_positive_otherwise(tiny_prefill):
    pf = tiny_prefill
    held = M.heldout_attention(pf, torch.tensor([1, 2, 3]))
    keep = torch.ones(2, 2, pf.n, dtype=torch.bool)
    assert M.attention_output_errors(pf, keep, attn=held).max().item() < 1e-5
    snap = get_policy("snapkv", window=8)(pf, 12)
    errs = M.attention_output_errors(pf, snap.keep, attn=held)
    assert errs.shape == (2,) and (errs > 0).all()
    batch = M.attention_output_errors_batch(pf, torch.stack([snap.keep, keep]), attn=held)
    torch.testing.assert_close(batch[0], errs)
    with pytest.raises(ValueError, match="at least one token"):
        M.heldout_attention(pf, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="attn: 1 layers"):
        M.attention_output_errors(pf, keep, attn=held[:1])
