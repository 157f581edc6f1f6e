"""The project's eviction policies inside plain Hugging Face `generate`, kvpress-style:

    with hf.press(model, "snapkv", budget=0.1, window=32) as p:
        out = model.generate(ids, max_new_tokens=64, do_sample=False)
    p.cache.kept_entries()  # prompt entries the policy kept, over every layer, row and KV head

The semantics are the project's own path (`generate.generate`). While the press is active the model's forward
answers two kinds of call:

- the prefill (prompt tokens and no cache yet, or generate's empty one): each row runs `capture.prefill` (full
  attention: the first new token is the argmax of the full prefill's logits), the policy compresses its cache, and
  the rows' kept entries are packed into one `cache.RaggedCache` whose segments are (row, KV head). The call returns
  the next-token logits (B, 1, vocab) and a `PressCache`, a `transformers.Cache` over that ragged cache;
- a decode step over a `PressCache`: the model's own HF forward at RoPE positions n_b, n_b + 1, ... (row b's prompt
  length, not its kept count). `PressCache.update` appends the new keys/values to the ragged cache's tail, and the
  attention over kept prefix + tail is `ragged_attention`, registered in transformers' attention registry
  (`AttentionInterface`) as "flowkv_ragged" and selected with `model.set_attn_implementation` while the press is
  active: `RaggedCache.attend` (the reference) on the CPU, `fastdecode.SplitKVAttend` (the split-KV kernel) on CUDA.

The cache holds only the kept entries (packed per layer, per (row, KV head)) and the decoded tokens: nothing is padded
to the prompt length, and no mask hides evicted entries. Batches: rows of equal length, or left-padded rows (each row
is prefilled and compressed without its padding, exactly as if alone). Greedy search and sampling are supported; beam
search, assisted decoding, a user-supplied cache, chunked prefill, use_cache=False and inputs_embeds fail with an
error that says so.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface, Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .attention import scaling_of
from .budgets import parse_budget
from .cache import RaggedCache
from .capture import check_token_ids, prefill
from .fastdecode import SplitKVAttend
from .policies import Policy, get_policy, prefill_options

ATTENTION = "flowkv_ragged"  # the name of `ragged_attention` in transformers' attention registry
CACHE_KWARG = "flowkv_cache"  # the forward keyword that carries the PressCache down to `ragged_attention`
KERNELS = ("auto", "reference", "split_kv")
MODES = ("greedy_search", "sample")  # transformers' GenerationMode values the press supports
# transformers 5.17 names the cache `past_key_values` (in forward arguments and outputs); later versions `cache`
CACHE_NAMES = ("cache", "past_key_values")
OUTPUT_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class PressCache(Cache):
    """A `transformers.Cache` over one `cache.RaggedCache` of B rows (segments = (row, KV head), row-major): the
    kept prompt entries of every (layer, row, KV head), packed, plus a dense tail of decoded tokens."""

    def __init__(self, ragged: RaggedCache, lengths: torch.Tensor, kept: torch.Tensor, fed: int, attend=None):
        super().__init__(layers=[])  # the ragged cache replaces transformers' per-layer objects
        self.ragged = ragged
        self.lengths = lengths  # (B,) prompt length n_b of each row without padding: its next RoPE position
        self.kept = kept  # (B, L, G) prompt entries the policy kept per (row, layer, KV head)
        self.fed = fed  # prompt tokens generate fed, padding included (what get_seq_length reports, as HF counts)
        self.attend = attend  # None: RaggedCache.attend; else attend(ragged, layer, q, T, scaling)

    def __repr__(self) -> str:
        B, L, G = self.kept.shape
        return f"PressCache(rows={B}, layers={L}, kv_heads={G}, kept={self.kept_entries()}, decoded={self.ragged.used})"

    def __len__(self) -> int:
        return len(self.ragged.layers)

    # what transformers asks of a cache ----------------------------------------------------------------------
    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens fed so far, padding included (as a DynamicCache counts them); far more than the entries held."""
        return self.fed + self.ragged.used

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # the tail grows

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append T new tokens' keys/values (B, G, T, d) to layer `layer_idx`'s tail; `ragged_attention` reads them."""
        B, G, T, d = key_states.shape
        self.ragged.append(layer_idx, key_states.reshape(B * G, T, d), value_states.reshape(B * G, T, d))
        return key_states, value_states

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("PressCache cannot be cropped, reordered, reset or re-batched: the press "
                                  "supports greedy search and sampling only (no beam search, no assisted decoding)")

    crop = reorder_cache = batch_repeat_interleave = batch_select_indices = reset = _unsupported

    # the press's own --------------------------------------------------------------------------------------
    def attention(self, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of the T tokens just appended over kept prefix + tail: query (B, H, T, d) → (B, T, H, d)."""
        B, H, T, d = query.shape
        q = query.reshape(B * H, T, d)  # row-major (row, head), as the segments are (row, KV head)
        out = (self.ragged.attend(layer, q, T, scaling) if self.attend is None
               else self.attend(self.ragged, layer, q, T, scaling))
        return out.view(B, H, T, d).transpose(1, 2)

    def positions(self, T: int) -> torch.Tensor:
        """(B, T) RoPE positions of the next T tokens of every row: n_b + decoded + 0..T-1."""
        return self.lengths.view(-1, 1) + self.ragged.used + torch.arange(T, device=self.lengths.device)

    def kept_entries(self) -> int:
        """Kept prompt entries over every layer, row and KV head (the packed prefix's rows)."""
        return self.ragged.kept_entries()

    def entries(self) -> int:
        """Entries the cache holds: the kept prompt entries plus every decoded token of every segment."""
        S = self.ragged.layers[0].offsets.numel() - 1
        return self.kept_entries() + len(self) * S * self.ragged.used

    def kept_bytes(self) -> int:
        return self.ragged.kept_bytes()

    def allocated_bytes(self, include_tail: bool = False) -> int:
        return self.ragged.allocated_bytes(include_tail)


def ragged_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                     scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers' attention-function signature: the new keys/values are already in the PressCache (its
    `update`), so key, value and the mask are not read. Returns ((B, T, H, d), no weights)."""
    cache = kwargs.get(CACHE_KWARG)
    if not isinstance(cache, PressCache):
        raise RuntimeError(f"attn_implementation {ATTENTION!r} attends over a PressCache; it runs only inside "
                           "hf.press(model, ...), which passes the cache")
    scaling = scaling_of(module) if scaling is None else scaling
    return cache.attention(module.layer_idx, query, scaling), None


AttentionInterface.register(ATTENTION, ragged_attention)


def unpadded_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Each row's prompt without its left padding; right or inner padding fails, naming the row."""
    if attention_mask is None:
        return list(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)}: the press needs a 2D 0/1 mask "
                         f"of the input's shape {tuple(input_ids.shape)}")
    rows = []
    for b, (ids, m) in enumerate(zip(input_ids, attention_mask.bool(), strict=True)):
        first = int(m.int().argmax())
        if not m.any() or not m[first:].all():
            raise ValueError(f"attention_mask row {b} is {'all zeros' if not m.any() else 'padded on the right'}: the "
                             "press supports unpadded rows or left padding (tokenizer.padding_side = 'left')")
        rows.append(ids[first:])
    return rows


class Press:
    """The state of one `press(...)`: the policy, its budget and settings, and the model's own forward/generate
    while they are wrapped. `cache` is the PressCache of the last prefill (inspect its size; dropped with the press)."""

    def __init__(self, model, policy: Policy, budget, chunk: int | None, kernel: str, capacity: int):
        self.model = model
        self.policy = policy
        self.budget = budget
        self.chunk = chunk
        self.kernel = kernel
        self.capacity = capacity
        self.cache: PressCache | None = None
        self._forward = model.forward
        self._generate = model.generate

    # generate ---------------------------------------------------------------------------------------------
    def generate(self, *args, **kwargs):
        """model.generate with the press's checks: greedy search or sampling, the press's own cache."""
        for name in CACHE_NAMES:
            if kwargs.get(name) is not None:
                raise ValueError(f"generate({name}=...): the press builds its own cache at the prefill; call "
                                 "generate without one")
        for name in ("assistant_model", "inputs_embeds", "custom_generate"):
            if kwargs.get(name) is not None:
                raise ValueError(f"generate({name}=...) is not supported inside a press: pass input_ids and use "
                                 f"greedy search or sampling ({', '.join(MODES)})")
        given = kwargs.get("generation_config") or (args[1] if len(args) > 1 else None)  # generate(inputs, config)
        config = copy.deepcopy(given or self.model.generation_config)
        config.update(**{k: v for k, v in kwargs.items() if k != "generation_config"})
        mode = config.get_generation_mode().value
        if mode not in MODES:
            raise ValueError(f"generation mode {mode!r} is not supported inside a press: use num_beams=1 and "
                             f"do_sample=False or True ({', '.join(MODES)}); beam search needs a cache that can be "
                             "reordered")
        if config.cache_implementation is not None:
            raise ValueError(f"cache_implementation={config.cache_implementation!r}: the press builds its own cache "
                             "at the prefill; leave cache_implementation unset")
        if config.use_cache is False:
            raise ValueError("generate(use_cache=False): the press decodes over its compressed cache; keep "
                             "use_cache=True")
        if getattr(config, "prefill_chunk_size", None) is not None:
            raise ValueError(f"prefill_chunk_size={config.prefill_chunk_size}: the press prefills the whole prompt "
                             f"at once; use press(..., chunk={config.prefill_chunk_size}) to bound its memory")
        return self._generate(*args, **kwargs)

    # forward ----------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, *args, **kwargs):
        """A prefill (no cache, or an empty one) is answered by the project's prefill + policy; a decode step over
        a PressCache runs the model's own forward; a forward over any other cache fails."""
        if args:
            raise TypeError("inside a press, call the model with input_ids and keyword arguments only")
        names = [n for n in CACHE_NAMES if kwargs.get(n) is not None]
        cache = kwargs.pop(names[0]) if names else None
        for n in CACHE_NAMES:
            kwargs.pop(n, None)
        if isinstance(cache, PressCache):
            return self.decode(input_ids, cache, names[0], **kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(f"a forward over a {type(cache).__name__} of {cache.get_seq_length()} tokens: inside a "
                             "press the cache is the press's own (prefill without a cache, then decode over the "
                             "PressCache it returns)")
        return self.prefill(input_ids, **kwargs)

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, use_cache=None,
                logits_to_keep=None, **kwargs):
        """Prefill and compress every row; returns the next-token logits (B, 1, vocab) and the PressCache.
        position_ids are the rows' own 0..n_b-1 (HF passes those; others are refused)."""
        refused = {"inputs_embeds": inputs_embeds, "labels": labels, "output_attentions": output_attentions,
                   "output_hidden_states": output_hidden_states, **kwargs}
        bad = sorted(k for k, v in refused.items() if v is not None and v is not False)
        if bad or input_ids is None:
            raise ValueError(f"the press's prefill takes input_ids, attention_mask and position_ids; not supported: "
                             f"{', '.join(bad) or 'input_ids=None'}")
        input_ids = check_token_ids(input_ids, self.model.config.vocab_size)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids of shape {tuple(input_ids.shape)}: must be (batch, tokens)")
        rows = unpadded_rows(input_ids, attention_mask)
        if position_ids is not None:  # HF passes each row's 0..n_b-1 on its tokens (padding positions are free)
            pos = position_ids.to("cpu").expand(input_ids.shape)
            for b, r in enumerate(rows):
                if not torch.equal(pos[b, input_ids.shape[1] - r.numel():], torch.arange(r.numel())):
                    raise ValueError(f"position_ids row {b}: the press prefills each row at positions 0..n-1 of "
                                     "its unpadded tokens; other positions are not supported")
        caches, logits, kept = [], [], []
        options = prefill_options([self.policy])
        for ids in rows:
            pf = prefill(self.model, ids.unsqueeze(0), window=min(self.policy.window, ids.numel()), chunk=self.chunk,
                         **options)
            result = self.policy(pf, self.budget)
            caches.append(RaggedCache.from_prefill(pf, result, capacity=self.capacity))
            logits.append(pf.logits)
            kept.append(result.kept_per_head.cpu())
            del pf, result
        ragged = caches[0] if len(caches) == 1 else RaggedCache.concat(caches, self.capacity)
        device = ragged.layers[0].k.device
        lengths = torch.tensor([r.numel() for r in rows], device=device)
        use_split = self.kernel == "split_kv" or (self.kernel == "auto" and device.type == "cuda")
        self.cache = PressCache(ragged, lengths, torch.stack(kept), input_ids.shape[1],
                                SplitKVAttend() if use_split else None)
        out = CausalLMOutputWithPast(logits=torch.stack(logits).unsqueeze(1), **{OUTPUT_CACHE: self.cache})
        return out if return_dict is not False else out.to_tuple()

    def decode(self, input_ids, cache: PressCache, cache_name: str, attention_mask=None, position_ids=None, **kwargs):
        """T new tokens per row over the PressCache: the model's own forward at the rows' positions n_b + decoded,
        attention by `ragged_attention` (no mask: every kept entry and every earlier decoded token is visible)."""
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[0] != cache.lengths.numel():
            got = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(f"decode over a PressCache of {cache.lengths.numel()} rows needs input_ids of shape "
                             f"({cache.lengths.numel()}, T), got {got}")
        T = input_ids.shape[1]
        kwargs.pop("use_cache", None)
        out = self._forward(input_ids=input_ids, position_ids=cache.positions(T), use_cache=True,
                            **{cache_name: cache, CACHE_KWARG: cache}, **kwargs)
        cache.ragged.advance(T)
        return out


@contextmanager
def press(model, policy: str | Policy, budget: int | float | str, *, window: int | None = None,
          chunk: int | None = None, kernel: str = "auto", capacity: int = 64, **params) -> Iterator[Press]:
    """Run the project's eviction policy `policy` (a registered name with its `params`, or a Policy instance) inside
    the model's own `generate` and forward calls (see the module docstring). budget: tokens per KV head, a fraction
    of the prompt or "full" (`budgets.parse_budget`); window: the policy's observation window (None: its default,
    32); chunk: the prefill's
    query chunk (long prompts); kernel: decode attention, "auto" (split-KV on CUDA, the reference elsewhere),
    "reference" (`RaggedCache.attend`) or "split_kv" (`fastdecode.SplitKVAttend`: Triton on CUDA, its PyTorch
    transcription elsewhere); capacity: decoded tokens the tail holds before it grows (doubling)."""
    if isinstance(policy, Policy):
        if params or window is not None:
            raise ValueError(f"press(model, {policy!r}, window=..., ...): a Policy instance brings its own window and "
                             "parameters; pass a registered name to set them here")
    else:
        policy = get_policy(policy, **params, **({} if window is None else {"window": window}))
    budget = parse_budget(budget)
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}: must be one of {', '.join(KERNELS)}")
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity={capacity!r}: must be a positive int (decoded tokens before the tail grows)")
    if getattr(model.forward, "_flowkv_press", None) is not None:
        raise RuntimeError("a press is already active on this model; leave it before entering another")
    p = Press(model, policy, budget, chunk, kernel, capacity)

    @functools.wraps(p._forward)  # generate inspects forward's signature (logits_to_keep, position_ids)
    def forward(*args, **kwargs):
        return p.forward(*args, **kwargs)

    @functools.wraps(p._generate)
    def generate(*args, **kwargs):
        return p.generate(*args, **kwargs)

    forward._flowkv_press = generate._flowkv_press = p
    before = {k: model.__dict__[k] for k in ("forward", "generate") if k in model.__dict__}
    attn = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION)
    model.forward, model.generate = forward, generate
    try:
        yield p
    finally:
        for k in ("forward", "generate"):
            if k in before:
                setattr(model, k, before[k])
            else:
                delattr(model, k)
        model.set_attn_implementation(attn)
