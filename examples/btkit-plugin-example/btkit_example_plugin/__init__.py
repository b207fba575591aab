"""An example third-party btkit plugin, installed separately from btkit.

It adds a method, ``quiz`` (one stage: write a quiz question a passage answers), with its own
templates shipped inside this package, and a record filter (``btkit_after_stage``) that drops
questions which do not end with a question mark. Nothing in btkit itself was edited to add it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

from btkit.hookspecs import hookimpl
from btkit.methods import Method, Stage, StageInfo
from btkit.records import Record

PROMPTS = Path(__file__).parent / "prompts"


class AskStage(Stage):
    kind = "augment"
    templates = ("quiz/ask",)
    variables = ("text",)

    async def process(self, record: Record, ctx: Any) -> list[Record]:
        comp = await ctx.complete("quiz/ask", {"text": record.fields["text"]}, **self.sampling(temperature=0.7, max_tokens=64))
        if not comp.ok:
            comp.step["parse_error"] = "empty_or_truncated"
            return [record.drop(self.label, "no_question")]
        question = comp.text.strip().splitlines()[0].strip()
        comp.step["parsed"] = {"instruction": question}
        record.fields.update(instruction=question, response=record.fields["text"])
        return [record]


class Quiz(Method):
    def prepare(self, rows: Iterable[dict[str, Any]], options: dict[str, Any]) -> Iterator[Record]:
        field = options.get("text_field", "text")
        for n, row in enumerate(rows, start=1):
            doc_id = str(row.get(options.get("id_field", "id")) or f"line{n}")
            yield Record(id=doc_id, source_id=doc_id, fields={"text": row[field]})

    def build_stage(self, name: str, options: dict[str, Any]) -> Stage:
        return AskStage(self.name, name, options)


@hookimpl
def btkit_register_methods(register):
    register(Quiz(
        name="quiz",
        description="Example plugin: write a quiz question each passage answers.",
        stages=[StageInfo("ask", "augment", ("text",), ("instruction", "response"), "write a quiz question")],
        default_stages=("ask",),
        prompts_dir=PROMPTS,
    ))


@hookimpl
def btkit_after_stage(record, stage, run):
    """A filter: drop quiz questions that are not questions."""
    if stage.method == "quiz" and not record.fields.get("instruction", "").rstrip().endswith("?"):
        return "not_a_question"
    return None
