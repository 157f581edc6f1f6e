"""Scores: task metrics on generated text, and output fidelity of a compressed cache (method.md §4).

Task metrics take (prediction, references) and return a score in [0, 1]:
    contains / exact_match   the (normalised) reference appears in / equals the prediction; max over references
    string_match_all          RULER: fraction of the references found in the prediction (case-insensitive)
    qa_f1                     LongBench token F1 after normalisation (lower-case, no punctuation/articles)
    rouge_l                   ROUGE-L F-measure (`rouge-score` package)
    classification            LongBench: 1/(#classes named) if the right one is among them
    retrieval / count         LongBench: fraction of the numbers in the prediction that are right
    code_sim                  LongBench: edit similarity (difflib ratio) of the first non-comment line
`score(metric, prediction, references, **meta)` dispatches by name; LongBench's per-sample max over
references and first-line cut are applied there.

Fidelity: `attention_output_errors` (‖O_S − O‖_F/‖O‖_F per layer on the window, softmax renormalised over the
kept set; the keep-set of KV head g applies to all its query heads), the same error on held-out rows
(`heldout_attention`: the queries of FullKV's continuation, rows after the window that no score has seen), and
`next_token_kl` (KL(full ‖ compressed) of the next-token distributions along a teacher-forced continuation).
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Sequence

import torch

from .attention import window_attention
from .capture import stacked_values
from .decomposition import renormalised_output

# ------------------------------------------------------------------------------------------------------------
# text normalisation


def normalize_answer(s: str) -> str:
    """LongBench/SQuAD normalisation: lower-case, remove punctuation, remove articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def first_line(s: str) -> str:
    """The first line of a prediction after leading newlines (LongBench: trec, triviaqa, samsum, lsht)."""
    return s.lstrip("\n").split("\n")[0]


# ------------------------------------------------------------------------------------------------------------
# per-reference scores (prediction, one reference) → [0, 1]


def contains(prediction: str, reference: str) -> float:
    """1 if the reference (stripped, case-insensitive) appears in the prediction: NIAH's exact match of the value."""
    ref = reference.strip().lower()
    return float(bool(ref) and ref in prediction.lower())


def exact_match(prediction: str, reference: str) -> float:
    """1 if the normalised prediction equals the normalised reference."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def qa_f1(prediction: str, reference: str) -> float:
    """Token-level F1 between normalised prediction and reference (LongBench qa_f1_score)."""
    p, r = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = Counter(p) & Counter(r)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure via the `rouge-score` package (its tokenizer lower-cases and keeps alphanumerics)."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    if not prediction.strip() or not reference.strip():
        return 0.0
    return float(_ROUGE.score(reference, prediction)["rougeL"].fmeasure)


def classification(prediction: str, reference: str, all_classes: Sequence[str] = ()) -> float:
    """LongBench classification: classes named in the prediction, minus those that are only substrings of the
    right class; 1/(#named) if the right class is among them, else 0."""
    named = [c for c in all_classes if c in prediction]
    named = [c for c in named if not (c in reference and c != reference)]
    return 1.0 / len(named) if reference in named else 0.0


def retrieval(prediction: str, reference: str) -> float:
    """LongBench passage retrieval: reference "Paragraph k"; fraction of the numbers in the prediction equal to k."""
    ids = re.findall(r"Paragraph (\d+)", reference)
    if not ids:
        raise ValueError(f"retrieval reference {reference!r}: expected the form 'Paragraph <number>'")
    numbers = re.findall(r"\d+", prediction)
    return sum(n == ids[0] for n in numbers) / len(numbers) if numbers else 0.0


def count(prediction: str, reference: str) -> float:
    """LongBench passage count: fraction of the numbers in the prediction equal to the reference count."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(reference).strip() for n in numbers) / len(numbers) if numbers else 0.0


def code_sim(prediction: str, reference: str) -> float:
    """LongBench code edit similarity: the first line without ` # or // is compared with the reference
    (difflib SequenceMatcher ratio, in [0, 1]; LongBench uses fuzzywuzzy's ratio, the same quantity ×100)."""
    line = ""
    for ln in prediction.lstrip("\n").split("\n"):
        if "`" not in ln and "#" not in ln and "//" not in ln:
            line = ln
            break
    return difflib.SequenceMatcher(None, line, reference).ratio()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER: fraction of the references that appear in the prediction (case-insensitive)."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    p = prediction.lower()
    return sum(r.lower() in p for r in references) / len(references)


PER_REFERENCE = {"contains": contains, "exact_match": exact_match, "qa_f1": qa_f1, "rouge_l": rouge_l,
                 "classification": classification, "retrieval": retrieval, "count": count, "code_sim": code_sim}
METRICS = tuple(PER_REFERENCE) + ("string_match_all",)


def score(metric: str, prediction: str, references: Sequence[str], all_classes: Sequence[str] = (),
          cut_first_line: bool = False) -> float:
    """Score one prediction: string_match_all over all references, every other metric the max over references.
    cut_first_line: keep only the first line of the prediction first (LongBench's few-shot datasets)."""
    if cut_first_line:
        prediction = first_line(prediction)
    if metric == "string_match_all":
        return string_match_all(prediction, references)
    if metric not in PER_REFERENCE:
        raise ValueError(f"unknown metric {metric!r}: allowed are {', '.join(METRICS)}")
    if not references:
        raise ValueError(f"metric {metric!r} needs at least one reference")
    fn = PER_REFERENCE[metric]
    if metric == "classification":
        return max(fn(prediction, r, all_classes) for r in references)
    return max(fn(prediction, r) for r in references)


# ------------------------------------------------------------------------------------------------------------
# output fidelity


def window_output(pf, layer: int, keep: torch.Tensor | None = None, values: torch.Tensor | None = None) -> torch.Tensor:
    """Attention block output on the window rows, (w, D) float32 (`decomposition.renormalised_output`, the one
    place it is computed, from `Prefill.attn`): O = Σ_h A'_h V_{g(h)} W_O^h + b_O.

    keep (G, n) bool: the softmax is renormalised over the kept tokens, A'_h = A_h ⊙ m_g / Σ_j (A_h ⊙ m_g)[j],
    the mask m_g of KV head g applying to every query head h of its group; None keeps all (A' = A).
    values (G, n, d): replacement values (SmoothEvict's merged values), else the captured V."""
    return renormalised_output(pf, layer, keep, values=values)


def attention_output_errors(pf, keep: torch.Tensor, values: list[torch.Tensor] | None = None,
                            reference: list[torch.Tensor] | None = None,
                            attn: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Per-layer relative error ‖O_S − O‖_F / ‖O‖_F of the window attention output, (L,) float32.

    keep (L, G, n) bool; values: per-layer merged values (G, n, d) or None; reference: the full outputs
    [window_output(pf, ℓ)] if already computed (a sweep computes them once per prompt); attn: per-layer attention
    (H, r, n) of other rows than the window's (`heldout_attention`), the reference then being theirs."""
    return attention_output_errors_batch(pf, keep.unsqueeze(0), [values], reference, attn=attn)[0]


def attention_output_errors_batch(pf, keeps: torch.Tensor, values: list | None = None,
                                  reference: list[torch.Tensor] | None = None,
                                  max_bytes: int = 1 << 28, attn: list[torch.Tensor] | None = None) -> torch.Tensor:
    """`attention_output_errors` of B keep-sets of one prompt at once: keeps (B, L, G, n) bool, values a list of B
    entries (per-layer merged values or None; None: all captured), → (B, L) float32. Points go through the
    renormalised output in chunks of at most `max_bytes` of masked attention (a sweep's fast path). attn: as in
    `attention_output_errors` (None: the window rows)."""
    if keeps.dim() != 4:
        raise ValueError(f"keeps {tuple(keeps.shape)}: expected (B, L, G, n) bool")
    B, L, G, n = keeps.shape
    if n != pf.n or L != len(pf.layers):
        raise ValueError(f"keep mask {tuple(keeps.shape[1:])} does not match the prefill (L={len(pf.layers)}, "
                         f"n={pf.n})")
    if attn is not None and (len(attn) != L or any(a.shape[-1] != n for a in attn)):
        raise ValueError(f"attn: {len(attn)} layers of shape {tuple(attn[0].shape) if attn else ()}; expected {L} "
                         f"layers of (H, rows, {n})")
    values = [None] * B if values is None else list(values)
    if len(values) != B:
        raise ValueError(f"values: {len(values)} entries for {B} keep-sets")
    errs = torch.empty(B, L)
    for li in range(L):
        A = None if attn is None else attn[li]
        full = reference[li] if reference is not None else renormalised_output(pf, li, attn=A)  # O (rows, D)
        chunk = max(1, max_bytes // (4 * (pf.attn(li) if A is None else A).numel()))  # points fitting max_bytes
        dev = full.device
        for c in range(0, B, chunk):
            e = min(B, c + chunk)
            merged = any(x is not None for x in values[c:e])  # replacement values where a point has them
            vals = stacked_values(pf, li, values[c:e]) if merged else None
            kept = renormalised_output(pf, li, keeps[c:e, li].to(dev), values=vals, attn=A)  # O_S (b, rows, D)
            errs[c:e, li] = ((kept - full).flatten(1).norm(dim=1) / full.norm().clamp_min(1e-30)).cpu()
    return errs


@torch.no_grad()
def heldout_attention(pf, continuation: torch.Tensor, prefix: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Attention of held-out rows over the prompt, per layer: [(H, T, n)] float32.

    The rows are the T tokens of `continuation` (the sweep uses FullKV's own answer), decoded teacher-forced over
    the full cache after `prefix` (the question of a question-agnostic run) — rows after the observation window,
    which no policy's score has seen. Their queries' softmax is taken over the n prompt keys only (the prefix's and
    the continuation's own keys, kept in full by every policy, are left out), so `attention_output_errors(...,
    attn=heldout_attention(...))` is the window error's formula on rows the scores were not fitted to."""
    from .cache import RaggedCache  # the decode stage, after this one in the data flow
    from .generate import decode

    cont = torch.as_tensor(continuation).view(-1).long().cpu()
    if cont.numel() == 0:
        raise ValueError("heldout_attention needs a continuation of at least one token")
    pre = torch.zeros(0, dtype=torch.long) if prefix is None else torch.as_tensor(prefix).view(-1).long().cpu()
    ids = torch.cat([pre, cont])
    cache = RaggedCache.from_prefill(pf, None, capacity=ids.numel())
    queries = {}

    def record(cache, li, q, T, scaling):  # the reference attention, keeping the continuation rows' queries
        queries[li] = q[:, -cont.numel():]
        return cache.attend(li, q, T, scaling)

    decode(pf.model, cache, ids.view(1, -1), record)
    return [window_attention(queries[li], c.k, c.scaling, n_past=pf.n) for li, c in enumerate(pf.layers)]


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row of two logit tensors (T, vocab) → (T,), in nats, float64."""
    lp = torch.log_softmax(logits_p.double(), -1)
    lq = torch.log_softmax(logits_q.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


def next_token_kl(pf, continuation: torch.Tensor, result=None, full_logits: torch.Tensor | None = None) -> float:
    """Mean KL(full ‖ compressed) of the next-token distributions after each token of a teacher-forced
    continuation (T ≥ 1 tokens, e.g. FullKV's own answer), in nats. The distribution right after the prompt is
    left out: it comes from the shared prefill, so it is identical for every policy. full_logits: FullKV's
    teacher_forced_logits (T + 1, vocab) if already computed (a sweep computes them once per instance)."""
    from .generate import teacher_forced_logits

    continuation = torch.as_tensor(continuation, dtype=torch.long).view(-1)
    if continuation.numel() == 0:
        raise ValueError("next_token_kl needs a continuation of at least one token")
    full = teacher_forced_logits(pf, continuation, None) if full_logits is None else full_logits
    comp = teacher_forced_logits(pf, continuation, result)
    return float(kl_divergence(full[1:], comp[1:]).mean())
