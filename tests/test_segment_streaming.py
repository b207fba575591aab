"""Segmentation streams: a huge one-line document is cut in bounded memory, into the same segments as before.

Segments are what resume and the cache key on, so the streaming segmenter must cut every text
exactly as the list-based one did: the reference below is that implementation, kept as an oracle.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from btkit.kit import segment
from btkit.kit.segment import CHARS_PER_WORD, iter_segments, segment_corpus, segments


# -- the list-based segmenter that shipped before, as an oracle ------------------------------------
_REF_HEADER = re.compile(r"^\s{0,3}(#{1,6}\s+\S|[=\-]{3,}\s*$)")
_REF_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _ref_paragraphs(text: str) -> list[str]:
    paras, current = [], []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip() or _REF_HEADER.match(line):
            if current:
                paras.append(" ".join(" ".join(current).split()))
                current = []
            continue
        current.append(line.strip())
    if current:
        paras.append(" ".join(" ".join(current).split()))
    return [p for p in paras if p]


def _ref_split_long(para: str, max_words: int) -> list[str]:
    if len(para.split()) <= max_words:
        return [para]
    pieces, current, count = [], [], 0
    for sentence in _REF_SENTENCE_END.split(para):
        n = len(sentence.split())
        if count and count + n > max_words:
            pieces.append(" ".join(current))
            current, count = [], 0
        if n > max_words:
            ws = sentence.split()
            pieces += [" ".join(ws[i : i + max_words]) for i in range(0, len(ws), max_words)]
            continue
        current.append(sentence)
        count += n
    if current:
        pieces.append(" ".join(current))
    return pieces


def reference_segments(text: str, max_words: int) -> list[str]:
    out, current, count = [], [], 0
    for para in _ref_paragraphs(text):
        for piece in _ref_split_long(para, max_words):
            n = len(piece.split())
            if current and count + n > max_words:
                out.append("\n\n".join(current))
                current, count = [], 0
            current.append(piece)
            count += n
    if current:
        out.append("\n\n".join(current))
    cap = max_words * CHARS_PER_WORD
    return [s[i : i + cap] for s in out for i in range(0, len(s), cap)]


# Pieces of text that exercise every rule: sentence ends, headers and rules (indented or not),
# CRLF and lone CR, Unicode whitespace (NBSP, U+2028, U+0085, U+001C), words longer than the cap.
ATOMS = ["a", "bb", "ccc.", "dd!", "e?", "f.", "...", "end.", "  ", " ", "\t", "\n", "\n\n", "\r\n", "\r", "\x0c",
         "\u00a0", "\u2028", "\x85", "\x1c", "é", "字", "x" * 50, "# head\n", "\n## h2 \n", "\n---\n", "===", "#", "-- ",
         "\n   # x\n", "\n    # y\n", "\n####### seven\n"]


@pytest.mark.slow
@pytest.mark.parametrize("short_line", [segment._SHORT_LINE, 0])  # 0: every line read in place, as a huge one is
def test_streaming_cuts_every_text_as_the_list_based_segmenter_did(monkeypatch, short_line):
    monkeypatch.setattr(segment, "_SHORT_LINE", short_line)
    rng = random.Random(11)
    for _ in range(6000):
        text = "".join(rng.choice(ATOMS) + rng.choice(["", " "]) for _ in range(rng.randint(0, 150)))
        max_words = rng.choice([1, 2, 3, 5, 8, 20, 400])
        assert segments(text, max_words) == reference_segments(text, max_words), (text, max_words)


def test_streaming_matches_on_real_documents():
    corpus = Path(__file__).resolve().parent.parent / "examples" / "corpus.jsonl"
    for line in corpus.read_text(encoding="utf-8").splitlines():
        text = json.loads(line)["text"]
        for max_words in (20, 100, 400):
            assert segments(text, max_words) == reference_segments(text, max_words)


def test_segments_come_one_at_a_time():
    """The first segment of a long text is there before the rest of the text is cut."""
    stream = iter_segments("word " * 10_000_000, 400)
    assert next(stream) == " ".join(["word"] * 400)


# -- empty documents ----------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "   ", "\n\n\t\r\n", "\u00a0\u2028", "## Title\n---\n===\n"])
def test_a_document_without_words_is_a_dropped_record_not_nothing(text):
    recs = list(segment_corpus([{"id": "a", "text": "one two three"}, {"id": "b", "text": text}], {"min_words": 1}))
    assert [(r.id, r.source_id, r.reason, r.dropped_at) for r in recs] == [
        ("a#0", "a", None, None), ("b#0", "b", "empty_text", "humpback.segment")]
    assert recs[1].meta["drop_details"] == {"chars": len(text)}


# -- memory -----------------------------------------------------------------------------------
_PEAK = """
import json, resource, sys
from btkit.cli import cli

def run(corpus, out):
    try:
        cli(["run", "humpback", corpus, "-o", out, "--model", "echo:", "--min-words", "1000000", "--no-cache", "-q"],
            standalone_mode=False)
    except SystemExit as e:
        assert not e.code, e.code
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

tiny, big, out = sys.argv[1:4]
baseline = run(tiny, out + "-tiny")  # every module and the run machinery loaded
print(json.dumps({"baseline": baseline, "peak": run(big, out)}))
"""


@pytest.mark.slow
def test_a_20mb_one_line_document_is_segmented_in_bounded_memory(tmp_path):
    """Through the real command: a 20 MB document on one line, of short words (the worst case for
    a word list: 3.5 million small strings), once peaked at 32x its size. Reading the line costs
    about 3x (bytes, text, parsed value); the segments must cost next to nothing on top."""
    rng = random.Random(5)
    vocab = [f"{rng.choice(['ab', 'cd', 'ef', 'gh', 'ij'])}{i}" + ("." if i % 17 == 0 else "") for i in range(100)]
    text = " ".join(rng.choices(vocab, k=20 * 2**20 // 5))
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"id": "big", "text": text}) + "\n", encoding="utf-8")
    size = big.stat().st_size
    assert size > 20 * 10**6
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps({"id": "tiny", "text": "a few words"}) + "\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(tiny), str(big), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = rss["peak"] - rss["baseline"]
    assert growth < 8 * size, f"peak RSS grew {growth / 2**20:.0f} MB for a {size / 2**20:.0f} MB document"
    candidates = (tmp_path / "out" / "candidates.jsonl").read_text(encoding="utf-8").splitlines()
    first = json.loads(candidates[0])
    assert len(candidates) > 10_000 and first["reason"] == "too_short" and 300 < len(first["fields"]["text"].split()) <= 400
