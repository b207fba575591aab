"""CRAB's rule-based constraints: computed from a response by code, verified by code.

Each constraint is read off the response itself (its word count, the punctuation it avoids, its
frequent words, its longest paragraph and sentence, its shortest word), then phrased as an
instruction; :func:`check` verifies a constraint against any text with the same measures
(:mod:`.text`), so a constraint computed from a response always holds on that response.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any, Callable

from btkit.kit.text import count_words, paragraphs, sentences, words

#: The rule-based constraint types (the paper's list), in the order they are computed.
RULE_TYPES = (
    "word_count_min", "word_count_max", "word_count_around", "word_count_range",
    "forbidden_punctuation", "keywords", "max_sentences_per_paragraph",
    "max_words_per_sentence", "min_chars_per_word",
)

#: Punctuation a response may avoid: name -> characters (ASCII and full-width forms).
PUNCTUATION = {
    "commas": (",", "，", "、"),
    "semicolons": (";", "；"),
    "exclamation marks": ("!", "！"),
    "question marks": ("?", "？"),
    "colons": (":", "："),
}

STOPWORDS = frozenset("""
a about above after again against all also although among an and any are as at be because been before
being below between both but by can could did does doing done down during each either else even ever
every few for from further had has have having here how however into its itself just more most much
must neither never next nor not now often once only other others otherwise ought our ours ourselves
over own same shall should since some such than that their theirs them themselves then there these they
this those though through thus too under until upon very was were what whatever when where whether which
while whom whose will with within without would yet you your yours yourself yourselves also many
""".split())

_PHRASES: dict[str, tuple[str, ...]] = {
    "word_count_min": ("Answer with at least {n} words.", "Write no fewer than {n} words.", "Your reply must be at least {n} words long."),
    "word_count_max": ("Answer with at most {n} words.", "Keep your reply to {n} words or fewer.", "Do not write more than {n} words."),
    "word_count_around": ("Answer in about {n} words.", "Aim for roughly {n} words.", "Your reply should be around {n} words long."),
    "word_count_range": ("Answer in {lo} to {hi} words.", "Keep your reply between {lo} and {hi} words."),
    "forbidden_punctuation": ("Do not use any {name} in your response.", "Your entire response must contain no {name}.", "Avoid {name} throughout your answer."),
    "keywords": ("Include the keywords {quoted} in your response.", "Make sure your answer mentions {quoted}.", "Use the words {quoted} in your reply."),
    "max_sentences_per_paragraph": ("Each paragraph must have at most {n} {sentence}.", "Keep every paragraph to {n} {sentence} or fewer."),
    "max_words_per_sentence": ("No sentence may be longer than {n} words.", "Keep every sentence to at most {n} words."),
    "min_chars_per_word": ("Every word in your response must have at least {n} characters.", "Use only words of {n} or more characters."),
}


def _around_tolerance(n: int) -> int:
    return max(5, n // 10)


def _lowered_words(text: str) -> set[str]:
    return {w.lower() for w in words(text)}


def _all_sentences(text: str) -> list[str]:
    return [s for p in paragraphs(text) for s in sentences(p)]


# -- verification ---------------------------------------------------------------------------
_CHECKS: dict[str, Callable[[dict[str, Any], str], bool]] = {
    "word_count_min": lambda p, t: count_words(t) >= p["n"],
    "word_count_max": lambda p, t: count_words(t) <= p["n"],
    "word_count_around": lambda p, t: abs(count_words(t) - p["n"]) <= _around_tolerance(p["n"]),
    "word_count_range": lambda p, t: p["lo"] <= count_words(t) <= p["hi"],
    "forbidden_punctuation": lambda p, t: not any(c in t for c in PUNCTUATION[p["name"]]),
    "keywords": lambda p, t: set(p["keywords"]) <= _lowered_words(t),
    "max_sentences_per_paragraph": lambda p, t: all(len(sentences(par)) <= p["n"] for par in paragraphs(t)),
    "max_words_per_sentence": lambda p, t: all(count_words(s) <= p["n"] for s in _all_sentences(t)),
    "min_chars_per_word": lambda p, t: all(len(w) >= p["n"] for w in words(t)),
}


def check(constraint: dict[str, Any], text: str) -> bool:
    """Whether ``text`` satisfies a rule constraint (a dict made by :func:`rule_constraints`)."""
    return _CHECKS[constraint["type"]](constraint["params"], text)


# -- computation ------------------------------------------------------------------------------
def _make(kind: str, rng: random.Random, **params: Any) -> dict[str, Any]:
    fmt = dict(params)
    if kind == "keywords":
        fmt["quoted"] = _join_quoted(params["keywords"])
    if kind == "max_sentences_per_paragraph":
        fmt["sentence"] = "sentence" if params["n"] == 1 else "sentences"
    text = rng.choice(_PHRASES[kind]).format(**fmt)
    return {"type": kind, "source": "rule", "text": text, "params": params, "verified_by": "code"}


def _join_quoted(items: list[str]) -> str:
    quoted = [f'"{k}"' for k in items]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def length_constraint(n_words: int, rng: random.Random) -> dict[str, Any] | None:
    """One word-count constraint (at least / at most / around / between) the count satisfies."""
    if n_words <= 0:
        return None
    low = math.floor(n_words * 0.8 / 10) * 10 if n_words >= 25 else max(1, math.floor(n_words * 0.8))
    high = math.ceil(n_words * 1.2 / 10) * 10
    around = round(n_words / 10) * 10 if n_words >= 20 else n_words
    kind = rng.choice(("word_count_min", "word_count_max", "word_count_around", "word_count_range"))
    if kind == "word_count_min":
        return _make(kind, rng, n=low)
    if kind == "word_count_max":
        return _make(kind, rng, n=high)
    if kind == "word_count_around":
        return _make(kind, rng, n=around)
    return _make(kind, rng, lo=low, hi=high)


def punctuation_constraint(text: str, rng: random.Random) -> dict[str, Any] | None:
    """Forbid a punctuation mark the text does not use: commas when possible (as IFEval does)."""
    absent = [name for name, chars in PUNCTUATION.items() if not any(c in text for c in chars)]
    if not absent:
        return None
    name = "commas" if "commas" in absent else rng.choice(absent)
    return _make("forbidden_punctuation", rng, name=name)


def keyword_constraint(text: str, rng: random.Random, max_keywords: int = 3) -> dict[str, Any] | None:
    """Require 1..3 of the text's most frequent content words (4-20 letters, not stopwords)."""
    tokens = [w.lower() for w in words(text)]
    first: dict[str, int] = {}
    for i, w in enumerate(tokens):
        first.setdefault(w, i)
    counts = Counter(w for w in tokens if 4 <= len(w) <= 20 and w.isalpha() and w not in STOPWORDS)
    pool = sorted(counts, key=lambda w: (-counts[w], first[w]))[:8]
    if not pool:
        return None
    repeated = [w for w in pool if counts[w] >= 2]  # a word the text dwells on says more than a passing one
    pool = repeated or pool
    k = rng.randint(1, min(max_keywords, len(pool)))
    chosen = sorted(rng.sample(pool, k), key=lambda w: first[w])
    return _make("keywords", rng, keywords=chosen)


def rule_constraints(text: str, rng: random.Random) -> list[dict[str, Any]]:
    """Every rule constraint that can be read off ``text`` (each one holds on ``text``)."""
    out: list[dict[str, Any]] = []
    n_words = count_words(text)
    for made in (length_constraint(n_words, rng), punctuation_constraint(text, rng), keyword_constraint(text, rng)):
        if made:
            out.append(made)
    per_paragraph = [len(sentences(p)) for p in paragraphs(text)]
    if per_paragraph and max(per_paragraph) >= 1:
        out.append(_make("max_sentences_per_paragraph", rng, n=max(per_paragraph)))
    sentence_lengths = [count_words(s) for s in _all_sentences(text)]
    if sentence_lengths:
        out.append(_make("max_words_per_sentence", rng, n=math.ceil(max(sentence_lengths) / 5) * 5))
    lengths = [len(w) for w in words(text)]
    if lengths and min(lengths) >= 2:
        out.append(_make("min_chars_per_word", rng, n=min(lengths)))
    return out
