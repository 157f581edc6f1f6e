"""Decode from a compressed cache: greedy generation and teacher-forced logits.

The prefill (and so the first next-token distribution) is shared by every policy; compression is applied to the
cache after it, and only decoding differs. That is why a sweep prefills each task instance once.
"""

from __future__ import annotations

import torch

from .attention import scaling_of
from .cache import RaggedCache
from .capture import Prefill, check_token_ids, forward_layers, rotary
from .selection import PolicyResult


@torch.no_grad()
def decode(model, cache: RaggedCache, ids: torch.Tensor, attend=None) -> torch.Tensor:
    """Feed T tokens (1, T) through the model over `cache`; returns logits (T, vocab) float32.
    attend(cache, layer, q, T, scaling) overrides the reference attention (e.g. `fastdecode.SplitKVAttend()`)."""
    device = next(model.parameters()).device
    ids = check_token_ids(ids, model.config.vocab_size).to(device).view(1, -1)
    T = ids.shape[1]
    h = model.model.embed_tokens(ids)
    pos = torch.arange(cache.next_pos, cache.next_pos + T, device=device).unsqueeze(0)
    cos, sin = rotary(model, h, pos)
    scalings = [scaling_of(layer.self_attn) for layer in model.model.layers]

    def att(li, q, k, v):
        cache.append(li, k[0], v[0])
        fn = cache.attend if attend is None else (lambda *a: attend(cache, *a))
        return fn(li, q[0], T, scalings[li]).unsqueeze(0)

    h = forward_layers(model, h, cos, sin, att)
    cache.advance(T)
    return model.lm_head(model.model.norm(h))[0].float()


def stop_ids(tok) -> set[int]:
    ids = {tok.eos_token_id} if tok is not None and tok.eos_token_id is not None else set()
    for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        i = tok.convert_tokens_to_ids(t) if tok is not None else None
        if isinstance(i, int) and i != getattr(tok, "unk_token_id", None):
            ids.add(i)
    return ids


@torch.no_grad()
def generate(pf: Prefill, result: PolicyResult | None = None, max_new_tokens: int = 32, tok=None,
             attend=None, prefix: torch.Tensor | None = None) -> list[int]:
    """Greedy continuation of the prompt from the (compressed) cache; stops at an end-of-turn token. prefix: tokens
    fed (teacher-forced, kept in full) after the compressed cache before the answer starts — the question of a
    question-agnostic evaluation, whose context alone was prefilled and compressed."""
    prefix = _prefix(prefix)
    cache = RaggedCache.from_prefill(pf, result, capacity=max_new_tokens + prefix.numel())
    stops = stop_ids(tok)
    last = decode(pf.model, cache, prefix.view(1, -1), attend)[-1] if prefix.numel() else pf.logits
    nxt = int(last.argmax())
    out = [nxt]
    while len(out) < max_new_tokens and nxt not in stops:
        nxt = int(decode(pf.model, cache, torch.tensor([[nxt]]), attend)[-1].argmax())
        out.append(nxt)
    return [t for t in out if t not in stops]


@torch.no_grad()
def teacher_forced_logits(pf: Prefill, continuation: torch.Tensor, result: PolicyResult | None = None,
                          prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token logits (T + 1, vocab) at the end of the prompt (after `prefix`, if any, fed after the cache as in
    `generate`) and after each continuation token."""
    prefix = _prefix(prefix)
    cache = RaggedCache.from_prefill(pf, result, capacity=prefix.numel() + continuation.numel())
    if not prefix.numel():
        return torch.cat([pf.logits.unsqueeze(0), decode(pf.model, cache, continuation.view(1, -1))])
    rows = decode(pf.model, cache, torch.cat([prefix.view(-1), continuation.view(-1).to(prefix.device)]).view(1, -1))
    return rows[prefix.numel() - 1:]


def _prefix(prefix: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long) if prefix is None else torch.as_tensor(prefix).view(-1).long().cpu()
