"""Long-context tasks, built deterministically from a seed with nothing downloaded.

Every task instance is one `TaskInstance`: the prompt token ids (question at the end, inside the observation
window: "question-aware"), the reference answers, how many new tokens to generate and the metric that scores
the generated text (a name in `metrics.METRICS`).

- `niah`: needle-in-a-haystack grid (context length × depth) in a prose haystack (`haystack`).
- `ruler`: RULER-style synthetic tasks (single/multi-key, multi-value, multi-query NIAH, variable tracking,
  common-words extraction).
- `longbench`: loader for the official LongBench JSONL files when the user has them on disk.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch


@dataclass
class TaskInstance:
    """One prompt to answer. `meta` carries what a metric or a figure may need (depth, all_classes, ...)."""

    task: str  # e.g. "niah", "ruler_niah_multikey", "longbench_qasper"
    instance: str  # id, unique within the task, e.g. "len1024_depth050"
    prompt_ids: torch.Tensor  # (1, n) token ids, chat template (and answer prefix) applied
    references: list[str]  # acceptable answers (or all required strings, for string_match_all)
    max_new_tokens: int
    metric: str  # name in flowkv_utils.metrics.METRICS
    meta: dict = field(default_factory=dict)
    # token index where the question starts (prompt_ids[:, :question_at] is the context): what a question-agnostic
    # sweep compresses before the question arrives. None: the task does not say (question-aware only). Not part
    # of `fingerprint` (the question-agnostic sweep keys it itself), so stored question-aware rows keep their keys.
    question_at: int | None = None

    @property
    def context_tokens(self) -> int:
        """Prompt length n in tokens of the model's tokenizer."""
        return int(self.prompt_ids.shape[-1])

    def fingerprint(self) -> str:
        """16 hex digits of sha256 over everything that defines the instance (prompt ids, references, new tokens,
        metric, meta): two instances built with other generator settings never share it."""
        h = hashlib.sha256(self.prompt_ids.to(torch.int64).cpu().numpy().tobytes())
        h.update(json.dumps([self.task, self.references, self.max_new_tokens, self.metric, self.meta],
                            sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]


def question_index(tok, ids: torch.Tensor, marker: str) -> int:
    """Index of the first token of the question in prompt ids (1, n): the last position q from which the decoded
    tail ids[q:] still holds `marker` (the question's opening words, found once in the prompt). Binary search over
    decodes; raises naming the marker if the prompt does not hold it."""
    row = ids.view(-1).tolist()
    if marker not in tok.decode(row):
        raise ValueError(f"the prompt does not contain the question marker {marker!r}")
    lo, hi = 0, len(row) - 1  # invariant: marker in decode(row[lo:])
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if marker in tok.decode(row[mid:]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def build_prompt(tok, user_text: str, answer_prefix: str = "", chat: bool = True) -> torch.Tensor:
    """Token ids (1, n) of one user turn (chat template with the generation prompt when `chat`), followed by
    the answer prefix as the start of the assistant's reply (RULER's convention)."""
    from ..models import chat_ids

    ids = chat_ids(tok, user_text, chat=chat)
    if answer_prefix:
        extra = tok(answer_prefix, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([ids, extra], dim=-1)
    return ids


from . import haystack, longbench, niah, ruler  # noqa: E402  (submodules use TaskInstance)

__all__ = ["TaskInstance", "build_prompt", "haystack", "longbench", "niah", "question_index", "ruler"]
