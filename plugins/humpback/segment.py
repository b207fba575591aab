"""Corpus segmentation for Humpback: documents -> segments, length-filtered and de-duplicated.

The paper takes the text under each header of a web page as a segment, drops segments by length
and removes duplicates. Here a document is split at header lines and blank lines into
paragraphs, consecutive paragraphs are packed into segments of at most ``max_words`` words (an
over-long paragraph is cut at sentence boundaries), and each segment is normalised and hashed to
drop exact duplicates. Too-short segments and duplicates are kept as dropped records (with their
reason) so nothing disappears silently.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable, Iterator

from btkit.dedup import SeenSet
from btkit.records import Record

_HEADER = re.compile(r"^\s{0,3}(#{1,6}\s+\S|[=\-]{3,}\s*$)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def paragraphs(text: str) -> list[str]:
    """Split at blank lines and header lines; collapse whitespace inside a paragraph."""
    paras: list[str] = []
    current: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip() or _HEADER.match(line):
            if current:
                paras.append(" ".join(" ".join(current).split()))
                current = []
            continue
        current.append(line.strip())
    if current:
        paras.append(" ".join(" ".join(current).split()))
    return [p for p in paras if p]


def _split_long(para: str, max_words: int) -> list[str]:
    words = para.split()
    if len(words) <= max_words:
        return [para]
    pieces, current, count = [], [], 0
    for sentence in _SENTENCE_END.split(para):
        n = len(sentence.split())
        if count and count + n > max_words:
            pieces.append(" ".join(current))
            current, count = [], 0
        if n > max_words:  # one enormous "sentence": cut by words
            ws = sentence.split()
            for i in range(0, len(ws), max_words):
                pieces.append(" ".join(ws[i : i + max_words]))
            continue
        current.append(sentence)
        count += n
    if current:
        pieces.append(" ".join(current))
    return pieces


#: A segment is also capped at this many characters per allowed word, so text without spaces
#: (a base64 blob, a minified file, CJK prose) cannot become one segment of any size.
CHARS_PER_WORD = 20


def _cap_chars(segment: str, max_chars: int) -> list[str]:
    if len(segment) <= max_chars:
        return [segment]
    return [segment[i : i + max_chars] for i in range(0, len(segment), max_chars)]


def segments(text: str, max_words: int) -> list[str]:
    """Pack paragraphs into segments of at most ``max_words`` words (and ``max_words * CHARS_PER_WORD`` characters)."""
    return [cut for seg in _word_segments(text, max_words) for cut in _cap_chars(seg, max_words * CHARS_PER_WORD)]


def _word_segments(text: str, max_words: int) -> list[str]:
    out: list[str] = []
    current: list[str] = []
    count = 0
    for para in paragraphs(text):
        for piece in _split_long(para, max_words):
            n = len(piece.split())
            if current and count + n > max_words:
                out.append("\n\n".join(current))
                current, count = [], 0
            current.append(piece)
            count += n
    if current:
        out.append("\n\n".join(current))
    return out


def fingerprint(text: str) -> str:
    norm = " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=12).hexdigest()


def segment_corpus(rows: Iterable[dict[str, Any]], options: dict[str, Any], stage: str = "humpback.segment") -> Iterator[Record]:
    """Turn input rows into segment records (alive, or dropped with 'too_short'/'duplicate')."""
    text_field = options.get("text_field", "text")
    id_field = options.get("id_field", "id")
    min_words = int(options["min_words"]) if options.get("min_words") is not None else 30  # 0 keeps every segment
    max_words = int(options["max_words"]) if options.get("max_words") is not None else 400
    with SeenSet() as seen:  # exact, in flat memory however many segments the corpus has
        for n, row in enumerate(rows, start=1):
            doc_id = str(row.get(id_field) if row.get(id_field) not in (None, "") else f"line{n}")
            for i, seg in enumerate(segments(row[text_field], max_words)):
                rec = Record(id=f"{doc_id}#{i}", source_id=doc_id, fields={"text": seg})
                words = len(seg.split())
                if words < min_words:
                    rec.drop(stage, "too_short", words=words, min_words=min_words)
                elif not seen.add(fingerprint(seg)):
                    rec.drop(stage, "duplicate")
                yield rec
