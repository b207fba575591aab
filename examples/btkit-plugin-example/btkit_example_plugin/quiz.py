"""``quiz``, a method: one stage that asks the model for a quiz question each passage answers.

The stage follows the idiom of btkit's own methods: ``ctx.complete(template, variables,
parse=...)`` renders the template (this package's ``prompts/quiz/ask.j2``), calls the model
(cached, counted, recorded in the record's lineage) and hands the reply to ``parse``. A parser
returns the value or raises :class:`btkit.methods.ParseError` with a reason; btkit then re-samples
up to ``--parse-retries`` times and otherwise gives the completion a ``parse_error``, and the stage
drops the record with that reason (counted in ``stats.json``). A reply cut at ``max_tokens``
never reaches the parser: it is a ``truncated`` parse error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

from btkit.methods import Method, ParseError, Stage, StageContext, StageInfo
from btkit.records import Record

PROMPTS = Path(__file__).parent / "prompts"


def parse_question(text: str | None) -> str:
    """The reply's first non-empty line, without a ``Question:`` label or surrounding quotes."""
    for line in (text or "").splitlines():
        line = line.strip()
        if line.lower().startswith("question:"):
            line = line[len("question:"):].strip()
        line = line.strip("\"'").strip()
        if line:
            return line
    raise ParseError("empty_reply")


class AskStage(Stage):
    """Passage -> quiz question (``instruction``); the passage is the ``response``."""

    kind = "augment"
    templates = ("quiz/ask",)
    variables = ("text",)

    async def process(self, record: Record, ctx: StageContext) -> list[Record]:
        text = record.fields["text"]
        comp = await ctx.complete("quiz/ask", {"text": text}, parse=parse_question, **self.sampling(temperature=0.7, max_tokens=64))
        if comp.parse_error is not None:
            return [record.drop(self.label, f"question_{comp.parse_error.reason}")]
        record.fields.update(instruction=comp.parsed, response=text)
        return [record]


class Quiz(Method):
    """Reads ``text`` (``--text-field``) and ``id`` (``--id-field``) from each input row."""

    def prepare(self, rows: Iterable[dict[str, Any]], options: dict[str, Any]) -> Iterator[Record]:
        field = options.get("text_field") or "text"
        for n, row in enumerate(rows, start=1):
            doc_id = str(row.get(options.get("id_field") or "id") or f"line{n}")
            yield Record(id=doc_id, source_id=doc_id, fields={"text": row[field]})

    def build_stage(self, name: str, options: dict[str, Any]) -> Stage:
        return AskStage(self.name, name, options)


def quiz_method() -> Quiz:
    """A new ``quiz`` method for each registry (btkit sets its ``version`` when it registers it)."""
    return Quiz(
        name="quiz",
        description="Example plugin: write a quiz question each passage answers.",
        stages=[StageInfo("ask", "augment", ("text",), ("instruction", "response"), "write a quiz question")],
        default_stages=("ask",),
        prompts_dir=PROMPTS,
    )
