"""RULER-style synthetic tasks (Hsieh et al., 2024), following RULER's definitions (method.md §6), built from
our prose haystack and a seed; nothing downloaded. Each prompt ends with RULER's question, and the assistant's
reply starts with RULER's answer prefix (appended after the chat template's generation prompt).

- `niah_single`: one needle "One of the special magic numbers for {key} is: {value}." (7-digit numbers or UUIDs).
- `niah_multikey`: the queried needle among 3 distractor needles with other keys.
- `niah_multivalue`: 4 needles with the same key and different values; all 4 must be recalled.
- `niah_multiquery`: 4 needles with different keys, all 4 asked for at once.
- `vt` (variable tracking): one chain "VAR X1 = 12345", "VAR X2 = VAR X1", … of 4 hops hidden in the haystack;
  name every variable that holds the value.
- `cwe` (common-words extraction): a numbered list where 10 common words appear 30 times each among rare words
  appearing 3 times each; name the 10 common words.
- `fwe` (frequent-words extraction): "coded text" of random 6-letter words whose counts follow a zeta law: the word
  of rank k appears ⌊N·k^(−α)/ζ(α)⌋ times (α = 2), the top-ranked word is the noise "...", the vocabulary is
  ⌊length/50⌋ words; name the three most frequent words (ranks 2–4), as RULER's freq_words_extraction does.
Haystack (`haystack=`): the NIAH tasks and `vt` hide their needles in a source of `haystack.SOURCES` ("docs", the
default; "essay"; "noise", RULER's repeated sentences); another than "docs" names the task (e.g.
`ruler_niah_single_essay`). `cwe` and `fwe` are word lists and have no haystack.
Metric: string_match_all (fraction of references found in the output, case-insensitive).
Keys are adjective–noun pairs and words come from the haystack vocabulary (RULER draws them from word lists).
"""

from __future__ import annotations

import random
import uuid

from . import TaskInstance, build_prompt, question_index
from .haystack import Haystack, check_source, fit_length, words

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")

ADJECTIVES = ("ancient", "bitter", "brave", "calm", "clever", "crimson", "curious", "distant", "eager", "faint",
              "fierce", "gentle", "golden", "hollow", "humble", "icy", "jolly", "lively", "lonely", "mellow",
              "misty", "noble", "quiet", "rapid", "rustic", "silent", "silver", "sturdy", "tender", "vivid")
NOUNS = ("anchor", "badger", "beacon", "canyon", "cedar", "comet", "falcon", "garden", "glacier", "harbor",
         "island", "lantern", "meadow", "mirror", "orchard", "otter", "pebble", "pillar", "quarry", "raven",
         "river", "saddle", "thistle", "tower", "tunnel", "valley", "violin", "walnut", "willow", "zephyr")

NIAH_TEMPLATE = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. I will "
                 "quiz you about the {kind} afterwards.\n{context}\nWhat are all the special magic {kind} for "
                 "{query} mentioned in the provided text?")
NIAH_ANSWER = "The special magic {kind} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_ANSWER = ("Answer: According to the chain(s) of variable assignment in the text above, {num} variables are "
             "assigned the value {query}, they are:")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                "the ones that appear most often.\n{context}\nQuestion: What are the {num} most common words in "
                "the above list?")
CWE_ANSWER = "Answer: The top {num} words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_ANSWER = "Answer: According to the coded text above, the three most frequently appeared words are:"

# the question's opening words in each template: where a question-agnostic sweep splits context from question
QUESTION_MARKERS = {"niah_single": "What are all the special magic", "niah_multikey": "What are all the special magic",
                    "niah_multivalue": "What are all the special magic",
                    "niah_multiquery": "What are all the special magic", "vt": "Question: Find all variables",
                    "cwe": "Question: What are the", "fwe": "Question: Do not provide any explanation"}
MAX_NEW_TOKENS = {"niah_single": 24, "niah_multikey": 24, "niah_multivalue": 48, "niah_multiquery": 48,
                  "vt": 30, "cwe": 64, "fwe": 50}


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if k not in taken:
            taken.add(k)
            return k


def _value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _niah(tok, task: str, length: int, rng: random.Random, kind: str, chat: bool, haystack: str,
          n_needles: int = 4):
    """Prompt ids and references of the four NIAH variants."""
    taken: set[str] = set()
    if task == "niah_single":
        keys = [_key(rng, taken)]
        needles = [(keys[0], _value(rng, kind))]
        query_keys, refs = keys, [needles[0][1]]
    elif task == "niah_multikey":
        keys = [_key(rng, taken) for _ in range(n_needles)]
        needles = [(k, _value(rng, kind)) for k in keys]
        q = rng.randrange(n_needles)
        query_keys, refs = [keys[q]], [needles[q][1]]
    elif task == "niah_multivalue":
        key = _key(rng, taken)
        needles = [(key, _value(rng, kind)) for _ in range(n_needles)]
        query_keys, refs = [key], [v for _, v in needles]
    else:  # niah_multiquery
        keys = [_key(rng, taken) for _ in range(n_needles)]
        needles = [(k, _value(rng, kind)) for k in keys]
        query_keys, refs = keys, [v for _, v in needles]
    query = query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
    inserts = [(rng.random(), NEEDLE.format(kind=kind, key=k, value=v)) for k, v in needles]
    hay = Haystack(tok, start=rng.randrange(10**6), source=haystack)

    def make(hay_tokens: int):
        text = NIAH_TEMPLATE.format(kind=kind, context=hay.with_insertions(hay_tokens, inserts), query=query)
        return build_prompt(tok, text, NIAH_ANSWER.format(kind=kind, query=query), chat)

    return fit_length(make, length), refs, {"keys": query_keys, "depths": [d for d, _ in inserts]}


def _vt(tok, length: int, rng: random.Random, chat: bool, haystack: str, hops: int = 4):
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    names: list[str] = []
    while len(names) < hops + 1:
        v = "".join(rng.choice(letters) for _ in range(5))
        if v not in names:
            names.append(v)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    depths = sorted(rng.random() for _ in chain)  # the chain appears in order
    hay = Haystack(tok, start=rng.randrange(10**6), source=haystack)

    def make(hay_tokens: int):
        text = VT_TEMPLATE.format(context=hay.with_insertions(hay_tokens, list(zip(depths, chain, strict=True))), query=value)
        return build_prompt(tok, text, VT_ANSWER.format(num=hops + 1, query=value), chat)

    return fit_length(make, length), names, {"value": value, "depths": depths}


def largest_fitting(make, most: int, length: int) -> int:
    """The largest k in [0, most] with make(k) (prompt ids (1, n)) at most `length` tokens, by bisection: the
    prompt must grow monotonically with k, and make(0) must fit."""
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if make(mid).shape[-1] <= length:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _cwe(tok, length: int, rng: random.Random, chat: bool, n_common: int = 10, freq_common: int = 30,
         freq_rare: int = 3):
    vocab = list(words())
    rng.shuffle(vocab)
    common, pool = vocab[:n_common], vocab[n_common:]

    def make_list(n_rare: int) -> list[str]:
        items = common * freq_common + pool[:n_rare] * freq_rare
        random.Random(f"{common}-{n_rare}").shuffle(items)
        return items

    def make(n_rare: int):
        listing = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(make_list(n_rare)))
        text = CWE_TEMPLATE.format(context=listing, num=n_common)
        return build_prompt(tok, text, CWE_ANSWER.format(num=n_common), chat)

    base = make(0).shape[-1]
    if base >= length:
        raise ValueError(f"cwe: length={length} tokens cannot hold {n_common} common words × {freq_common} "
                         f"(they alone take {base} tokens); use a longer length or fewer repetitions")
    lo = largest_fitting(make, len(pool), length)  # the most rare words that fit
    return make(lo), common, {"n_rare": lo}


def zeta(alpha: float, terms: int = 100_000) -> float:
    """Riemann ζ(α) for α > 1: the partial sum to `terms` plus its Euler–Maclaurin tail (relative error < 1e-12
    at α = 2)."""
    if not alpha > 1:
        raise ValueError(f"alpha={alpha!r}: the zeta law needs α > 1")
    head = sum(k ** -alpha for k in range(1, terms))
    return head + terms ** (1 - alpha) / (alpha - 1) + terms ** -alpha / 2


def _fwe(tok, length: int, rng: random.Random, chat: bool, alpha: float = 2.0, wordlen: int = 6):
    """RULER's frequent-words extraction: counts ⌊N·k^(−α)/ζ(α)⌋ by rank k; the largest N that fits the length."""
    size = max(8, length // 50)
    vocab: list[str] = []
    while len(vocab) < size:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(wordlen))
        if w not in vocab:
            vocab.append(w)
    vocab[0] = "..."  # the top-ranked word is noise, as in RULER
    z = zeta(alpha)
    order = random.Random(rng.random())

    def make(n_words: int):
        words_ = [w for k, w in enumerate(vocab, 1) for _ in range(int(n_words * k ** -alpha / z))]
        order.seed(f"fwe-{vocab[1]}-{n_words}")
        order.shuffle(words_)
        return build_prompt(tok, FWE_TEMPLATE.format(context=" ".join(words_)), FWE_ANSWER, chat)

    if make(0).shape[-1] >= length:
        raise ValueError(f"fwe: length={length} tokens cannot hold the template; use a longer length")
    lo = largest_fitting(make, 4 * length, length)  # the largest N that fits
    counts = [int(lo * k ** -alpha / z) for k in range(1, 5)]
    if not counts[1] > counts[2] > counts[3] > 0:
        raise ValueError(f"fwe: length={length} tokens is too short for three distinct frequent words "
                         f"(counts of ranks 2-4: {counts[1:]}); use a longer length")
    return make(lo), vocab[1:4], {"n_words": lo, "alpha": alpha, "counts": counts[1:]}


def ruler_instance(tok, task: str, length: int, index: int = 0, seed: int = 0, kind: str = "numbers",
                   chat: bool = True, max_new_tokens: int | None = None, haystack: str = "docs") -> TaskInstance:
    """One RULER-style instance of `task` (see TASKS) with a prompt of ≤ `length` tokens."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}: allowed are {', '.join(TASKS)}")
    if kind not in ("numbers", "uuids"):
        raise ValueError(f"kind={kind!r}: needle values are 'numbers' (7 digits) or 'uuids'")
    check_source(haystack)
    rng = random.Random(f"ruler-{task}-{seed}-{length}-{index}-{kind}")
    hay_task = task.startswith("niah") or task == "vt"
    if task.startswith("niah"):
        ids, refs, meta = _niah(tok, task, length, rng, kind, chat, haystack)
    elif task == "vt":
        ids, refs, meta = _vt(tok, length, rng, chat, haystack)
    elif task == "cwe":
        ids, refs, meta = _cwe(tok, length, rng, chat)
    else:
        ids, refs, meta = _fwe(tok, length, rng, chat)
    meta["length"] = length
    name = f"ruler_{task}"
    if hay_task and haystack != "docs":  # the default keeps the stored instances' identity
        name, meta["haystack"] = f"{name}_{haystack}", haystack
    return TaskInstance(name, f"len{length}_{index:02d}", ids, refs, max_new_tokens or MAX_NEW_TOKENS[task],
                        "string_match_all", meta, question_index(tok, ids, QUESTION_MARKERS[task]))


def ruler(tok, tasks: list[str], lengths: list[int], per_length: int = 1, seed: int = 0, kind: str = "numbers",
          chat: bool = True, haystack: str = "docs") -> list[TaskInstance]:
    """`per_length` instances of every task at every length, deterministic in seed (haystack: see the module)."""
    return [ruler_instance(tok, t, int(n), i, seed, kind, chat, haystack=haystack) for t in tasks for n in lengths
            for i in range(per_length)]
