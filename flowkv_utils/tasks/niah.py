"""Needle in a haystack: a grid of context lengths (tokens of the model's tokenizer) × needle depths.

The needle "The special magic number for <city> is <5 digits>." is placed at depth δ of the prose haystack (moved
back to the previous sentence end); the question comes last, inside the observation window (question-aware); the
chat template is applied. Scored by exact match of the value appearing in the generated text (`contains`).
"""

from __future__ import annotations

import random

from . import TaskInstance, build_prompt, question_index
from .haystack import Haystack, check_source, fit_length

CITIES = (
    "Amsterdam", "Athens", "Bangkok", "Barcelona", "Berlin", "Bogota", "Boston", "Brussels", "Budapest", "Cairo",
    "Chicago", "Copenhagen", "Dublin", "Edinburgh", "Florence", "Geneva", "Hamburg", "Havana", "Helsinki",
    "Istanbul", "Jakarta", "Kyoto", "Lagos", "Lima", "Lisbon", "London", "Madrid", "Manila", "Marseille",
    "Melbourne", "Milan", "Montreal", "Moscow", "Mumbai", "Munich", "Nairobi", "Naples", "Oslo", "Paris",
    "Prague", "Quito", "Rome", "Santiago", "Seoul", "Singapore", "Stockholm", "Sydney", "Tokyo", "Toronto",
    "Vienna", "Warsaw", "Zurich",
)

TEMPLATE = ("There is a special magic number hidden in the following text. Memorize it: I will ask you about it "
            "afterwards.\n\n{context}\n\nWhat is the special magic number for {city} mentioned in the text above?")
NEEDLE = "The special magic number for {city} is {value}."


def needle_instance(tok, length: int, depth: float, seed: int = 0, chat: bool = True,
                    max_new_tokens: int = 24, haystack: str = "docs") -> TaskInstance:
    """One NIAH prompt of ≤ `length` tokens with the needle at `depth` ∈ [0, 1] of the haystack (a source of
    `haystack.SOURCES`; another than "docs" names the task, e.g. "niah_essay", and is recorded in its meta)."""
    rng = random.Random(f"niah-{seed}-{length}-{depth:.4f}")
    city = rng.choice(CITIES)
    value = str(rng.randint(10000, 99999))
    needle = NEEDLE.format(city=city, value=value)
    hay = Haystack(tok, start=rng.randrange(10**6), source=check_source(haystack))

    def make(hay_tokens: int):
        context = hay.with_insertions(hay_tokens, [(depth, needle)])
        return build_prompt(tok, TEMPLATE.format(context=context, city=city), chat=chat)

    ids = fit_length(make, length)
    meta = {"length": length, "depth": depth, "key": city, "needle": needle}
    task = "niah" if haystack == "docs" else f"niah_{haystack}"  # the default keeps the stored instances' identity
    if haystack != "docs":
        meta["haystack"] = haystack
    return TaskInstance(task, f"len{length}_depth{round(depth * 100):03d}", ids, [value], max_new_tokens, "contains",
                        meta, question_index(tok, ids, f"What is the special magic number for {city}"))


def niah(tok, lengths: list[int], depths: list[float], seed: int = 0, chat: bool = True,
         max_new_tokens: int = 24, haystack: str = "docs") -> list[TaskInstance]:
    """The grid lengths × depths (depths as fractions in [0, 1]), one instance per cell, deterministic in seed."""
    for d in depths:
        if not 0.0 <= float(d) <= 1.0:
            raise ValueError(f"depth={d}: NIAH depths are fractions of the haystack in [0, 1]")
    check_source(haystack)
    return [needle_instance(tok, int(n), float(d), seed, chat, max_new_tokens, haystack) for n in lengths
            for d in depths]
