"""Parsing Humpback's generated instructions. Failures are ParseErrors with a reason, never guesses."""

from __future__ import annotations

import re

from btkit.methods import ParseError

from .text import is_refusal

__all__ = ["parse_instruction"]

_LABEL = re.compile(r"^\s*(?:#+\s*)?(?:\*\*|__)?\s*(?:request|instruction|question|user(?: request)?|prompt|query)(?:\s*\d+)?\s*(?:\*\*|__)?\s*[:\-–]\s*(?:\*\*|__)?\s*", re.IGNORECASE)
_FENCE = re.compile(r"^```[\w-]*\n(.*?)\n?```\s*$", re.DOTALL)
_STOP_AT = re.compile(r"\n\s*(?:#+\s*)?(?:\*\*)?\s*(?:answer|response)(?:\s*\d+)?\s*(?:\*\*)?\s*[:\n]", re.IGNORECASE)


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


def parse_instruction(text: str | None, document: str, max_words: int = 150, min_words: int = 3) -> str:
    """Clean a generated instruction; raise ParseError for empty, refusal, copy, too long/short."""
    if text is None or not text.strip():
        raise ParseError("empty_reply")
    s = text.strip()
    fence = _FENCE.match(s)
    if fence:
        s = fence.group(1).strip()
    s = _STOP_AT.split("\n" + s, maxsplit=1)[0].strip()
    s = _LABEL.sub("", s, count=1).strip()
    s = s.strip().strip('"“”\'`').strip()
    if "\ufffd" in s:
        s = s.replace("\ufffd", "").strip()
    if not s:
        raise ParseError("empty_reply")
    if is_refusal(s):
        raise ParseError("refusal", s[:80])
    words = len(s.split())
    if words < min_words:
        raise ParseError("too_short", f"{words} words")
    if words > max_words:
        raise ParseError("too_long", f"{words} words > {max_words}")
    ns, nd = _norm(s), _norm(document)
    if len(ns) > 40 and ns in nd:
        raise ParseError("copied_document", "the instruction is a passage of the document")
    return s
