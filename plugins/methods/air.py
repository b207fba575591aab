"""AIR: complex instruction generation via automatic iterative refinement (Liu et al. 2025, arXiv 2502.17787).

- ``augment``: back-translate a document into one instruction it would answer.
- ``score``: rate the instruction on AIR's additive 5-point scale (a point each for: basic task,
  answerable from knowledge, no external document needed, clear intent, general topic); keep >= 4.
- ``refine``: up to ``--rounds`` times (default 5): the model answers the current instruction; a
  judge compares that answer with the document (the ideal response) and names the single most
  important constraint the answer misses, or None (which ends the loop); a constraint that
  near-duplicates an earlier one (ROUGE-L > 0.6) is skipped; otherwise it is merged into the
  instruction. The response stays the document. Every round (answer, constraint, what happened)
  is kept in the record, and in ``data.jsonl`` under ``meta.rounds``.

Each round's answer is sampled with its own seed, so a round after a skipped constraint sees a
new answer rather than a cached repeat.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator

import click

from btkit.errors import BtkitError
from btkit.hookspecs import hookimpl
from btkit.methods import Method, ParseError, Stage, StageInfo
from btkit.options import SHARE
from btkit.records import Record

from btkit.kit import judges as curation
from btkit.kit.instructions import parse_instruction
from btkit.kit.judges import LABEL_JUDGE_MODES, JudgingStage, deprecated_alias, judge_mode_option
from btkit.kit.segment import segment_corpus, segment_options
from btkit.kit.text import near_duplicate

from ._prompts import PROMPTS

TOP_SCORE = 5
_CONSTRAINT_LINE = re.compile(r"^[\s>*#_-]*constraint[\s*_]*[:：]\s*(.*)$", re.IGNORECASE)
_NONE = {"none", "no", "n/a", "na", "null", "nothing", "no constraint", "no constraints", "none needed", "no missing constraint"}


def parse_points(text: str | None) -> int:
    """An additive score 0..5 from a judge reply ("... Score: 4"); ParseError otherwise.

    The rubric parser's rules (last line, score lines must agree, no ranges) on a scale that
    starts at 0, since an instruction can meet none of the five criteria.
    """
    return curation.parse_score(text, TOP_SCORE, bottom=0)


#: The judge is asked for a 10-20 word constraint; the parser accepts 3-40 words. The paper's
#: prompt gives the length as guidance and nothing in the method drops a constraint for missing
#: it; a clear 8-word constraint ("Present the steps as a numbered list for beginners.") is as
#: usable as a 12-word one. The bounds only refuse what is not a constraint sentence at all: a
#: fragment ("Steps.") or a paragraph of analysis pasted after "Constraint:". Refusals are counted
#: as parse failures (``too_short``/``too_long``), so a model that ignores the guidance shows.
MIN_CONSTRAINT_WORDS, MAX_CONSTRAINT_WORDS = 3, 40


def parse_constraint(text: str | None, min_words: int = MIN_CONSTRAINT_WORDS, max_words: int = MAX_CONSTRAINT_WORDS) -> str | None:
    """The judge's constraint, or None when it found nothing missing; ParseError when unclear.

    Length bounds: see :data:`MIN_CONSTRAINT_WORDS` (why they are looser than the prompt's 10-20).
    """
    if text is None or not text.strip():
        raise ParseError("empty_reply")
    lines = [l for l in text.strip().splitlines() if l.strip()]
    found = [m.group(1) for m in (_CONSTRAINT_LINE.match(l) for l in lines) if m]
    if found:
        value = found[-1]
    elif len(lines) == 1:
        value = lines[0]
    else:
        raise ParseError("no_constraint_line", "no 'Constraint:' line in the reply")
    value = value.strip().strip("*_`").strip().strip('"“”\'').strip()
    if value.rstrip(".!").strip().lower() in _NONE:
        return None
    n = len(value.split())
    if n < min_words:
        raise ParseError("too_short", f"{n} words")
    if n > max_words:
        raise ParseError("too_long", f"{n} words")
    return value


async def score_instruction(ctx: Any, instruction: str, mode: str, params: dict[str, Any]) -> tuple[int | None, dict[str, Any]]:
    """AIR's additive score by generated reasoning + parse, or read from the digits' logprobs.

    Rubric replies are parsed through ``ctx.complete(parse=...)``, so ``--parse-retries``
    re-samples an unparseable one; logprobs that are not log-probabilities (NaN, > 0) are a
    counted failure (``invalid_logprobs``), never a score.
    """
    variables = {"instruction": instruction}
    mode = curation.resolve_judge_mode(mode, ctx.backend(), LABEL_JUDGE_MODES)[0]
    if mode == "logprob":  # the additive scale starts at 0: an instruction can meet none of the criteria
        score, details = await curation.logprob_score(ctx, "air/score", variables, TOP_SCORE, bottom=0)
    else:
        score, details = await curation.rubric_score(ctx, "air/score", variables, params, TOP_SCORE, bottom=0)
    return score, {"score_mode": mode, **details}


class AugmentStage(Stage):
    """Document -> the single instruction it answers; the document becomes the response."""

    kind = "augment"
    templates = ("air/augment",)
    variables = ("text",)

    async def process(self, record: Record, ctx) -> list[Record]:
        text = record.fields["text"]
        comp = await ctx.complete("air/augment", {"text": text}, parse=lambda t: parse_instruction(t, text),
                                  **self.sampling(temperature=0.7, top_p=0.9, max_tokens=160))
        if comp.parse_error is not None:
            return [record.drop(self.label, f"instruction_{comp.parse_error.reason}", detail=comp.parse_error.detail)]
        record.fields.update(instruction=comp.parsed, response=text)
        return [record]


class ScoreStage(JudgingStage):
    """Keep instructions scoring at least ``--threshold`` on the additive scale (a score of the
    instruction alone: rubric or logprob, no likelihood modes)."""

    kind = "curate"
    templates = ("air/score",)
    variables = ("instruction", "mode")
    judge_modes = LABEL_JUDGE_MODES
    former_flag = "--score-mode"
    former_key = "score_mode"

    def __init__(self, method: str, name: str, options: dict[str, Any]):
        super().__init__(method, name, options)
        self.threshold = int(options["threshold"])  # 0 keeps every scored instruction

    async def process(self, record: Record, ctx) -> list[Record]:
        score, details = await score_instruction(ctx, record.fields["instruction"], self.judge_mode, self.sampling(temperature=0.0, max_tokens=256))
        record.meta.update(details, threshold=self.threshold)
        if score is None:
            return [record.drop(self.label, "unparseable_score", error=details.get("score_error"))]
        if score < self.threshold:
            return [record.drop(self.label, "below_threshold", score=score)]
        return [record]


class RefineStage(Stage):
    """Iterative refinement: answer, judge against the document, merge the missing constraint."""

    kind = "constrain"
    templates = ("air/answer", "air/judge", "air/merge")
    variables = ("instruction", "document", "answer", "constraints", "constraint")

    def __init__(self, method: str, name: str, options: dict[str, Any]):
        super().__init__(method, name, options)
        self.rounds = int(options["rounds"])
        self.min_constraints = int(options["min_constraints"])  # 0 keeps records that gained none
        self.dedup_threshold = float(options["dedup_threshold"])
        self.merge = options["merge"]
        if self.merge not in ("llm", "append"):
            raise BtkitError(f"merge '{self.merge}' unknown; choose llm or append")

    async def _merge(self, ctx, instruction: str, constraint: str, document: str) -> tuple[str, dict[str, Any]]:
        appended = f"{instruction.rstrip()} {constraint}"
        if self.merge == "append":
            return appended, {"merge": "append"}
        comp = await ctx.complete("air/merge", {"instruction": instruction, "constraint": constraint},
                                  parse=lambda t: parse_instruction(t, document, max_words=400), **self.sampling(temperature=0.0, max_tokens=320))
        if comp.parse_error is not None:  # a failed merge keeps the constraint, appended verbatim
            return appended, {"merge": "append_fallback", "merge_error": comp.parse_error.reason}
        return comp.parsed, {"merge": "llm"}

    async def process(self, record: Record, ctx) -> list[Record]:
        document = record.fields["response"]
        initial = instruction = record.fields["instruction"]
        constraints: list[str] = []
        rounds: list[dict[str, Any]] = []
        answer_params = self.sampling(temperature=0.7, top_p=0.9, max_tokens=512)
        for i in range(1, self.rounds + 1):
            params = {**answer_params, "seed": int(answer_params.get("seed") or 0) + i}
            ans = await ctx.complete("air/answer", {"instruction": instruction}, **params)
            entry: dict[str, Any] = {"round": i, "instruction": instruction, "answer": ans.text or "", "answer_finish": ans.finish_reason}
            rounds.append(entry)
            judge = await ctx.complete("air/judge", {"instruction": instruction, "document": document, "answer": ans.text or "",
                                                     "constraints": constraints}, parse=parse_constraint,
                                       **self.sampling(temperature=0.0, max_tokens=256))
            if judge.parse_error is not None:
                entry.update(status="unparseable_judgment", error=judge.parse_error.reason)
                continue
            constraint = entry["constraint"] = judge.parsed
            if constraint is None:
                entry["status"] = "none"
                break
            dup = near_duplicate(constraint, constraints, self.dedup_threshold)
            if dup:
                entry.update(status="duplicate", duplicate_of=dup[0], rouge_l=round(dup[1], 3))
                continue
            instruction, how = await self._merge(ctx, instruction, constraint, document)
            constraints.append(constraint)
            entry.update(status="added", merged_instruction=instruction, **how)
        record.fields.update(instruction=instruction, initial_instruction=initial, constraints=constraints, rounds=rounds)
        if len(constraints) < self.min_constraints:
            return [record.drop(self.label, "too_few_constraints", constraints=len(constraints), min_constraints=self.min_constraints,
                                statuses=[r.get("status") for r in rounds])]
        return [record]


class Air(Method):
    def prepare(self, rows: Iterable[dict[str, Any]], options: dict[str, Any]) -> Iterator[Record]:
        return segment_corpus(rows, options, stage="air.segment")

    def to_output(self, record: Record) -> dict[str, Any]:
        out = super().to_output(record)
        f = record.fields
        out["meta"].update({k: f[k] for k in ("initial_instruction", "constraints", "rounds") if k in f})
        return out


def _score_mode_options() -> list[click.Option]:
    judge_mode = judge_mode_option(LABEL_JUDGE_MODES, "How the score stage reads AIR's judge: rubric generates and parses 'Score: N'; "
                                   "logprob reads P(0..5) after 'Score: '; auto: logprob when the backend can.")
    return [judge_mode, deprecated_alias(judge_mode, "--score-mode")]


METHOD = Air(
    stage_classes={"augment": AugmentStage, "score": ScoreStage, "refine": RefineStage},
    name="air",
    description="AIR: automatic iterative refinement; an instruction from the document, then constraints the model's answer misses, merged in round by round.",
    paper="Liu et al. 2025, AIR: Complex Instruction Generation via Automatic Iterative Refinement, arXiv:2502.17787",
    stages=[
        StageInfo("augment", "augment", ("text",), ("instruction", "response"), "write the single instruction that would lead to the document as the response"),
        StageInfo("score", "curate", ("instruction",), (), "additive 5-point score (basic task, answerable, no external document, clear intent, general topic; meta.score); keep >= threshold"),
        StageInfo("refine", "constrain", ("instruction", "response"), ("instruction", "initial_instruction", "constraints", "rounds"),
                  "rounds of: answer, judge vs the document for the most important missing constraint, skip duplicates, merge"),
    ],
    default_stages=("augment", "score", "refine"),
    prompts_dir=PROMPTS,
    cli_options=[
        *segment_options("documents (segments)"),
        click.Option(["--threshold"], type=click.IntRange(0, 5), default=4, show_default=True, help="Keep instructions scoring at least this on the additive 0-5 scale."),
        *_score_mode_options(),
        click.Option(["--rounds"], type=click.IntRange(1, 20), default=5, show_default=True, help="At most this many refinement rounds."),
        click.Option(["--min-constraints"], type=click.IntRange(0, 20), default=1, show_default=True, help="Drop records that gained fewer constraints than this."),
        click.Option(["--merge"], type=click.Choice(("llm", "append")), default="llm", show_default=True, help="llm: the model merges each constraint into the instruction; append: add it as a sentence."),
        click.Option(["--dedup-threshold"], type=SHARE, default=0.6, show_default=True, help="Skip a constraint whose ROUGE-L with an earlier one exceeds this."),
    ],
)


@hookimpl
def btkit_register_methods(register):
    register(METHOD)
