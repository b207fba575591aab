"""Text measures every method may use: words, sentences, paragraphs, ROUGE-L, near-duplicates, refusals.

One definition of "word", "sentence" and "paragraph" is used both to *compute* a constraint from a
response and to *verify* it, so a constraint computed from a text always holds on that text.

- word: a run of letters or digits, with inner apostrophes or hyphens (``don't``, ``x-ray``);
  punctuation and markup are not words.
- paragraph: text between blank lines.
- sentence: a piece of a paragraph line ended by ``.``, ``!``, ``?`` (followed by space) or by
  ``。！？``; pieces without any word are not sentences.

ROUGE-L is implemented here (longest common subsequence over lower-cased word tokens, CJK
characters as single tokens, F1) so near-duplicate constraints can be removed without a
dependency.
"""

from __future__ import annotations

import re

WORD_RE = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*")
_PARAGRAPH_SPLIT = re.compile(r"\n[ \t\r\f\v]*\n")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])")
_ROUGE_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|[^\W_]+")
#: How a model's refusal starts ("I'm sorry", "I cannot", "As an AI"): checked at the start of a
#: reply only, so an answer that quotes an apology later is not a refusal.
REFUSAL_RE = re.compile(r"^\s*(?:i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i apologi[sz]e|as an ai\b|i'?m unable|i am unable|unfortunately, i)", re.IGNORECASE)

__all__ = ["WORD_RE", "REFUSAL_RE", "words", "count_words", "paragraphs", "sentences", "rouge_tokens", "rouge_l",
           "near_duplicate", "is_refusal"]


def is_refusal(text: str) -> bool:
    """Whether a generated reply opens with a refusal (see :data:`REFUSAL_RE`)."""
    return bool(REFUSAL_RE.match(text))


def words(text: str) -> list[str]:
    """The words of ``text`` in order."""
    return WORD_RE.findall(text)


def count_words(text: str) -> int:
    return len(words(text))


def paragraphs(text: str) -> list[str]:
    """Non-empty blocks of text separated by blank lines."""
    return [p.strip() for p in _PARAGRAPH_SPLIT.split(text) if p.strip()]


def sentences(paragraph: str) -> list[str]:
    """Sentences of one paragraph: each line is cut at sentence ends; wordless pieces are dropped."""
    out = []
    for line in paragraph.splitlines():
        for piece in _SENTENCE_SPLIT.split(line):
            if piece and WORD_RE.search(piece):
                out.append(piece.strip())
    return out


def rouge_tokens(text: str) -> list[str]:
    return _ROUGE_TOKEN.findall(text.lower())


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 between two texts (symmetric), 0.0 when either has no tokens."""
    ta, tb = rouge_tokens(a), rouge_tokens(b)
    lcs = _lcs(ta, tb)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(tb), lcs / len(ta)
    return 2 * precision * recall / (precision + recall)


def near_duplicate(text: str, others: list[str], threshold: float = 0.6) -> tuple[str, float] | None:
    """The first of ``others`` whose ROUGE-L with ``text`` exceeds ``threshold``, with the score."""
    for other in others:
        score = rouge_l(text, other)
        if score > threshold:
            return other, score
    return None
