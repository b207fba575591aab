"""Instruction back-and-forth translation (Nguyen et al. 2024, arXiv 2408.04614).

Humpback's self-augmentation and self-curation under this method's name, then **rewrite**: an aligned model rewrites the response given the
instruction and the original document, keeping the document's information and turning it into an
assistant-style answer. The paper rewrites only the highest-scoring pairs, hence the default
curation threshold of 5. Each kept record keeps the original text (``meta.original_response`` in
``data.jsonl``, ``fields.text`` in ``candidates.jsonl``) next to the rewritten response.

How it reuses Humpback without importing it: ``augment`` is the ``humpback`` method's own augment
stage, asked of the plugin registry when the stage is built (a public API; this method's options,
seed and shots included, are passed to it); ``curate`` is the kit's
:class:`~btkit.kit.judges.PairCurateStage` with Humpback's templates (``humpback/curate``,
``humpback/pmi``), which are public by name like every template.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator

import click

from btkit.errors import BtkitError
from btkit.hookspecs import hookimpl
from btkit.kit.judges import PairCurateStage, pair_curate_options
from btkit.kit.seeds import seed_options
from btkit.kit.segment import segment_corpus, segment_options
from btkit.methods import Method, ParseError, Stage, StageInfo
from btkit.records import Record

from ._prompts import PROMPTS

#: The system prompt of a kept pair: Humpback's tag for backtranslated data, which the paper keeps.
AUGMENTED_SYSTEM = "Answer with knowledge from web search."

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
        self.min_words = int(options["min_rewrite_words"])  # 0 means 0

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


class CurateStage(PairCurateStage):
    """Humpback's curation: its 5-point rubric (or a likelihood mode) on the pair, through the kit's stage."""

    judge_template = "humpback/curate"
    likelihood_template = "humpback/pmi"
    system = AUGMENTED_SYSTEM


def humpback_augment_stage(method: str, name: str, options: dict[str, Any]) -> Stage:
    """Humpback's backward instruction generation as this method's stage ``name``.

    Asked of the plugin registry (the ``humpback`` method must be installed, as it is with btkit),
    with Humpback's option defaults under ``options``; the stage is renamed to this method so its
    label, drops and lineage say ``backforth.augment``."""
    from btkit.plugins import get_registry

    try:
        humpback = get_registry().method("humpback")
    except BtkitError as e:
        raise BtkitError(f"{method}.{name} is Humpback's augment stage and needs the humpback method: {e}") from None
    stage = humpback.stage_with_defaults("augment", options)
    stage.method, stage.name = method, name
    return stage


class BackAndForth(Method):
    def prepare(self, rows: Iterable[dict[str, Any]], options: dict[str, Any]) -> Iterator[Record]:
        return segment_corpus(rows, options, stage="backforth.segment")

    def build_stage(self, name: str, options: dict[str, Any]) -> Stage:
        if name == "augment":
            return humpback_augment_stage(self.name, name, options)
        if name == "curate":
            return CurateStage(self.name, name, options)
        if name == "rewrite":
            return RewriteStage(self.name, name, options)
        raise BtkitError(f"backforth has no stage '{name}'")


METHOD = BackAndForth(
    name="backforth",
    description="Instruction back-and-forth translation: Humpback's augment and curate, then rewrite the response from the instruction and the original document.",
    paper="Nguyen et al. 2024, Better Alignment with Instruction Back-and-Forth Translation, arXiv:2408.04614",
    stages=[
        StageInfo("augment", "augment", ("text",), ("instruction", "response"), "Humpback's backward instruction generation (template humpback/augment)"),
        StageInfo("curate", "curate", ("instruction", "response"), ("system",), "Humpback's 5-point rubric (or pmi/ifd; meta.score), keep score >= threshold (template humpback/curate)"),
        StageInfo("rewrite", "rewrite", ("instruction", "response"), ("response", "text"),
                  "rewrite the response as an assistant's answer grounded in the original document (text, else the response; "
                  "the original response goes to meta.original_response)"),
    ],
    default_stages=("augment", "curate", "rewrite"),
    prompts_dir=PROMPTS,
    cli_options=[
        *seed_options(),
        *pair_curate_options(default_threshold=5),
        click.Option(["--candidates"], type=click.IntRange(1), default=1, show_default=True, help="Instructions generated per segment: one request with n=N where the backend samples several (vllm:, openai:, litellm:), else N requests with seeds seed+i. A failed candidate is dropped on its own."),
        *segment_options(),
        click.Option(["--min-rewrite-words"], type=click.IntRange(0), default=5, show_default=True, help="Drop rewritten answers shorter than this (0: keep any non-empty answer)."),
    ],
)


@hookimpl
def btkit_register_methods(register):
    register(METHOD)
