"""Instruction back-and-forth translation (Nguyen et al. 2024, arXiv 2408.04614).

Humpback's self-augmentation and self-curation (reused from :mod:`btkit_plugins.methods.humpback`, under
this method's name), then **rewrite**: an aligned model rewrites the response given the
instruction and the original document, keeping the document's information and turning it into an
assistant-style answer. The paper rewrites only the highest-scoring pairs, hence the default
curation threshold of 5. Each kept record keeps the original text (``meta.original_response`` in
``data.jsonl``, ``fields.text`` in ``candidates.jsonl``) next to the rewritten response.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator

import click

from btkit.errors import BtkitError
from btkit.hookspecs import hookimpl
from btkit.methods import Method, ParseError, Stage, StageInfo
from btkit.records import Record

from ._prompts import PROMPTS
from .humpback import METHOD as HUMPBACK
from .humpback import AugmentStage, CurateStage
from btkit.kit.segment import segment_corpus

_PREAMBLE = re.compile(
    r"^\s*(?:#+\s*)?(?:\*\*)?\s*(?:(?:here(?:'s| is) (?:the |my |a )?)?(?:rewritten |improved |revised )?(?:answer|response)(?: to the request)?|rewritten(?: answer| response)?)\s*(?:\*\*)?\s*[:\-–]\s*(?:\*\*)?\s*\n?",
    re.IGNORECASE,
)
_REFUSAL = re.compile(r"^\s*(?:i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i apologi[sz]e|as an ai\b|i'?m unable|i am unable|unfortunately, i)", re.IGNORECASE)


def parse_rewrite(text: str | None, min_words: int = 5) -> str:
    """The rewritten answer without a leading label ("Rewritten answer:"); ParseError otherwise."""
    if text is None or not text.strip():
        raise ParseError("empty_reply")
    s = _PREAMBLE.sub("", text.strip(), count=1).strip()
    if not s:
        raise ParseError("empty_reply")
    if _REFUSAL.match(s):
        raise ParseError("refusal", s[:80])
    n = len(s.split())
    if n < min_words:
        raise ParseError("too_short", f"{n} words")
    return s


class RewriteStage(Stage):
    """(instruction, document, response) -> the response rewritten as an assistant's answer."""

    kind = "rewrite"
    templates = ("backforth/rewrite",)
    variables = ("instruction", "text", "response")

    def __init__(self, method: str, name: str, options: dict[str, Any]):
        super().__init__(method, name, options)
        self.min_words = int(options["min_rewrite_words"]) if options.get("min_rewrite_words") is not None else 5  # 0 means 0

    async def process(self, record: Record, ctx) -> list[Record]:
        f = record.fields
        document = f.get("text") or f["response"]
        variables = {"instruction": f["instruction"], "text": document, "response": f["response"]}
        comp = await ctx.complete("backforth/rewrite", variables, parse=lambda t: parse_rewrite(t, self.min_words),
                                  **self.sampling(temperature=0.7, top_p=0.9, max_tokens=768))
        if comp.parse_error is not None:
            e = comp.parse_error
            return [record.drop(self.label, f"rewrite_{e.reason}", detail=e.detail)]
        rewritten = comp.parsed
        record.meta["original_response"] = f["response"]
        f["text"] = document
        f["response"] = rewritten
        return [record]


class BackAndForth(Method):
    def prepare(self, rows: Iterable[dict[str, Any]], options: dict[str, Any]) -> Iterator[Record]:
        return segment_corpus(rows, options, stage="backforth.segment")

    def build_stage(self, name: str, options: dict[str, Any]) -> Stage:
        if name == "augment":
            return AugmentStage(self.name, name, options)
        if name == "curate":
            return CurateStage(self.name, name, options)
        if name == "rewrite":
            return RewriteStage(self.name, name, options)
        raise BtkitError(f"backforth has no stage '{name}'")


_NOT_SHARED = {"mix_seed"}  # backforth writes no seed pairs to its output

METHOD = BackAndForth(
    name="backforth",
    description="Instruction back-and-forth translation: Humpback's augment and curate, then rewrite the response from the instruction and the original document.",
    paper="Nguyen et al. 2024, Better Alignment with Instruction Back-and-Forth Translation, arXiv:2408.04614",
    stages=[
        StageInfo("augment", "augment", ("text",), ("instruction", "response"), "Humpback's backward instruction generation (template humpback/augment)"),
        StageInfo("curate", "curate", ("instruction", "response"), ("score", "system"), "Humpback's 5-point rubric, keep score >= threshold (template humpback/curate)"),
        StageInfo("rewrite", "rewrite", ("instruction", "text", "response"), ("response", "original_response"),
                  "rewrite the response as an assistant's answer grounded in the original document"),
    ],
    default_stages=("augment", "curate", "rewrite"),
    prompts_dir=PROMPTS,
    cli_options=[o for o in HUMPBACK.cli_options if o.name not in _NOT_SHARED] + [
        click.Option(["--min-rewrite-words"], type=click.IntRange(0), default=5, show_default=True, help="Drop rewritten answers shorter than this (0: keep any non-empty answer)."),
    ],
)


@hookimpl
def btkit_register_methods(register):
    register(METHOD)
