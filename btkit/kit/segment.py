"""Corpus segmentation for Humpback: documents -> segments, length-filtered and de-duplicated.

The paper takes the text under each header of a web page as a segment, drops segments by length
and removes duplicates. Here a document is split at header lines and blank lines into
paragraphs, consecutive paragraphs are packed into segments of at most ``max_words`` words (an
over-long paragraph is cut at sentence boundaries), and each segment is normalised and hashed to
drop exact duplicates. Too-short segments, duplicates and documents with no text are kept as
dropped records (with their reason) so nothing disappears silently. Segmenting streams: memory
holds a document and one segment, never the document's words all at once.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable, Iterator

import click

from btkit.dedup import SeenSet
from btkit.options import INPUT_DEFAULTS, MAX_WORDS, MIN_WORDS
from btkit.records import Record

#: A header line (Markdown ``#`` or a ``===``/``---`` rule), matched at a line's start up to its end.
_HEADER = re.compile(r"\s{0,3}(#{1,6}\s+\S|[=\-]{3,}\s*$)")
_WORD = re.compile(r"\S+")  # the words str.split() finds (same whitespace)
_SENTENCE_END_CHARS = ".!?"  # a word ending in one of these ends a sentence

#: A segment is also capped at this many characters per allowed word, so text without spaces
#: (a base64 blob, a minified file, CJK prose) cannot become one segment of any size.
CHARS_PER_WORD = 20

#: Marks the end of a paragraph in the word stream of :func:`_words`.
_PARAGRAPH_END = None
#: Lines up to this many characters are copied and split at once; longer ones are read in place.
_SHORT_LINE = 4096


def _words(text: str) -> Iterator[str | None]:
    """The words of ``text`` in order, with ``None`` after each paragraph.

    A paragraph ends at a blank line or a header line. A long line is read in place, word by word
    (``pos``/``endpos``), so a document that is one 20 MB line is never copied or split whole.
    """
    in_paragraph = False
    start, size = 0, len(text)
    while start <= size:
        end = text.find("\n", start)
        if end < 0:
            end = size
        words: Iterable[str]
        if end - start <= _SHORT_LINE:  # the usual line: a small copy, split in C
            line = text[start:end]
            words = () if _HEADER.match(line) else line.split()
        else:  # a huge line: read in place, word by word
            first = _WORD.search(text, start, end)
            words = () if first is None or _HEADER.match(text, start, end) else _words_in_place(text, first, end)
        if words:
            in_paragraph = True
            yield from words
        elif in_paragraph:
            yield _PARAGRAPH_END
            in_paragraph = False
        start = end + 1
    if in_paragraph:
        yield _PARAGRAPH_END


def _words_in_place(text: str, first: re.Match[str], end: int) -> Iterator[str]:
    yield first.group()
    for match in _WORD.finditer(text, first.end(), end):
        yield match.group()


def _pieces(words: Iterable[str | None], max_words: int) -> Iterator[list[str]]:
    """Each paragraph as pieces of at most ``max_words`` words, cut between sentences.

    Whole sentences are packed into a piece while they fit; a sentence longer than ``max_words``
    is cut every ``max_words`` words. Only one piece and one sentence are held at a time.
    """
    piece: list[str] = []  # whole sentences packed so far
    sentence: list[str] = []
    too_long = False  # the current sentence passed max_words: it is being cut

    def end_sentence() -> Iterator[list[str]]:
        nonlocal piece, sentence, too_long
        if too_long:
            if sentence:
                yield sentence
            too_long = False
        else:
            if piece and len(piece) + len(sentence) > max_words:
                yield piece
                piece = []
            piece.extend(sentence)
        sentence = []

    for word in words:
        if word is _PARAGRAPH_END:
            yield from end_sentence()
            if piece:
                yield piece
                piece = []
            continue
        sentence.append(word)
        if not too_long and len(sentence) > max_words:  # one enormous sentence: cut it by words
            if piece:
                yield piece
                piece = []
            too_long = True
        while too_long and len(sentence) >= max_words:
            yield sentence[:max_words]
            sentence = sentence[max_words:]
        if word[-1] in _SENTENCE_END_CHARS:
            yield from end_sentence()


def _word_segments(text: str, max_words: int) -> Iterator[str]:
    """Pack pieces into segments of at most ``max_words`` words; pieces are joined by a blank line."""
    current: list[str] = []
    count = 0
    for piece in _pieces(_words(text), max_words):
        if current and count + len(piece) > max_words:
            yield "\n\n".join(current)
            current, count = [], 0
        current.append(" ".join(piece))
        count += len(piece)
    if current:
        yield "\n\n".join(current)


def iter_segments(text: str, max_words: int) -> Iterator[str]:
    """Segments of ``text`` of at most ``max_words`` words and ``max_words * CHARS_PER_WORD`` characters,
    one at a time: memory holds the text and one segment, however long the text (a document that
    is one 20 MB line once took 35 times its size)."""
    max_chars = max_words * CHARS_PER_WORD
    for segment in _word_segments(text, max_words):
        if len(segment) <= max_chars:
            yield segment
        else:
            for i in range(0, len(segment), max_chars):
                yield segment[i : i + max_chars]


def segments(text: str, max_words: int) -> list[str]:
    """Pack paragraphs into segments of at most ``max_words`` words (and ``max_words * CHARS_PER_WORD`` characters)."""
    return list(iter_segments(text, max_words))


def fingerprint(text: str) -> str:
    norm = " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=12).hexdigest()


#: Segment length bounds of :func:`segment_options` (a method may pass its own).
MIN_WORDS_DEFAULT = 30
MAX_WORDS_DEFAULT = 400


def segment_options(unit: str = "segments", min_words: int = MIN_WORDS_DEFAULT, max_words: int = MAX_WORDS_DEFAULT) -> list[click.Option]:
    """``--min-words`` and ``--max-words``, the options :func:`segment_corpus` reads, with their defaults:
    a method that segments its input lists these in ``Method.cli_options`` (``unit`` names what a
    segment is to its users, e.g. "texts")."""
    return [
        click.Option(["--min-words"], type=MIN_WORDS, default=min_words, show_default=True, help=f"Drop {unit} shorter than this (0: keep all)."),
        click.Option(["--max-words"], type=MAX_WORDS, default=max_words, show_default=True, help=f"Pack paragraphs into {unit} of at most this many words."),
    ]


def segment_corpus(rows: Iterable[dict[str, Any]], options: dict[str, Any], stage: str = "humpback.segment") -> Iterator[Record]:
    """Turn input rows into segment records (alive, or dropped with 'too_short'/'duplicate').

    ``options``: ``min_words`` and ``max_words`` (:func:`segment_options`; the engine passes the
    method's declared defaults), ``text_field`` and ``id_field`` (:data:`btkit.options.INPUT_DEFAULTS`).
    A document with no words at all (empty, only whitespace, only header or rule lines) becomes
    one record dropped as ``empty_text``, so it is journalled instead of vanishing.
    """
    text_field = options.get("text_field") or INPUT_DEFAULTS["text_field"]
    id_field = options.get("id_field") or INPUT_DEFAULTS["id_field"]
    min_words = int(options.get("min_words", MIN_WORDS_DEFAULT))  # 0 keeps every segment
    max_words = int(options.get("max_words", MAX_WORDS_DEFAULT))
    with SeenSet() as seen:  # exact, in flat memory however many segments the corpus has
        for n, row in enumerate(rows, start=1):
            doc_id = str(row.get(id_field) if row.get(id_field) not in (None, "") else f"line{n}")
            text = row[text_field]
            i = -1
            for i, seg in enumerate(iter_segments(text, max_words)):
                rec = Record(id=f"{doc_id}#{i}", source_id=doc_id, fields={"text": seg})
                words = len(seg.split())
                if words < min_words:
                    rec.drop(stage, "too_short", words=words, min_words=min_words)
                elif not seen.add(fingerprint(seg)):
                    rec.drop(stage, "duplicate")
                yield rec
            if i < 0:
                shown = text[: max_words * CHARS_PER_WORD].strip()  # header marks, if any; never megabytes of blanks
                yield Record(id=f"{doc_id}#0", source_id=doc_id, fields={"text": shown}).drop(stage, "empty_text", chars=len(text))


__all__ = ["CHARS_PER_WORD", "MIN_WORDS_DEFAULT", "MAX_WORDS_DEFAULT", "iter_segments", "segments", "fingerprint", "segment_corpus", "segment_options"]
