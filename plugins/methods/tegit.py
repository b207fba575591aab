"""TeGit / DoG-Instruct: text-grounded instruction wrapping (Chen et al. 2023, arXiv 2309.05447).

From each text a model "designs a task based on the given text": a whole task, instruction, input
and output at once, in the public wrapper model's format (Bahuia/Dog-Instruct ``inference.py``)::

    #instruction#: <what the user asks>
    #input#: <what the instruction works on, often an excerpt of the text; may be empty>
    #output#: <the answer, drawn from the text>

The wrapper is a LoRA trained on GPT-4-written tasks; here a prompted chat model writes the task,
with worked examples as chat turns, decoded greedily as the wrapper is (temperature 0).

Stages:

- ``augment``: text -> task. The reply is parsed strictly by :func:`parse_task`: no tags, a missing,
  repeated, malformed, unknown or out-of-order tag, text before the tags, an empty instruction or
  output, the prompt's own instruction echoed back, a worked example copied, a refusal, an output
  that only repeats the instruction or the input, or an instruction that points at "the text" with
  no input to carry it, is a parse failure with its reason (the public parser falls back to an empty
  dict there). Then the output must be grounded in the text (``--grounding``):

  * ``overlap`` (default, no model call): at least ``--min-overlap`` of the output's distinct
    words (:func:`btkit.kit.text.words`, lower-cased) occur in the text; checked inside the parse,
    so ``--parse-retries`` re-samples an ungrounded task too;
  * ``likelihood``: the kit's continuation likelihood, mean log P(output | text) - mean
    log P(output) (pointwise mutual information, nats per token) must be >= ``--min-grounding-pmi``
    (two ``score_continuation`` calls; the unconditional one is cached per output);
  * ``off``.

  Every failure is a dropped record (``task_<reason>``, ``ungrounded``); nothing is repaired.
- ``curate``: the kit's :class:`~btkit.kit.judges.PairCurateStage` with this method's rubric, judging
  the user turn (instruction with its input) against the output; ``--judge-mode`` as everywhere.

A kept record is in chat shape (``instruction`` = the instruction, then a blank line and the input
when there is one, as the user turn carries it; ``response`` = the output) and keeps the task apart
for an Alpaca export: ``alpaca: {"instruction", "input", "output"}`` in the ``data.jsonl`` line
(fields ``task_instruction`` and ``input`` on the record).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator

import click

from btkit.backends import SCORE_CONTINUATION
from btkit.errors import BtkitError
from btkit.hookspecs import hookimpl
from btkit.kit.judges import PairCurateStage, likelihood_parts, pair_curate_options
from btkit.kit.segment import segment_corpus, segment_options
from btkit.kit.text import is_refusal, words
from btkit.methods import Method, ParseError, Stage, StageInfo
from btkit.options import SCORE, SHARE, SHOTS
from btkit.records import Record

from ._prompts import PROMPTS

#: The wrapper's instruction for the model, the start of this method's user turn.
DESIGN_PROMPT = "Design a task based on the given text."
TAGS = ("instruction", "input", "output")
GROUNDING_MODES = ("overlap", "likelihood", "off")

#: A tag as the format writes it, ``#instruction#:``; case and spaces inside the hashes are not
#: held against it, nor Markdown bold around it (``**#output#:**``, ``**#output#**:``). The colon is required.
_TAG = re.compile(r"(\*\*|__)?#[ \t]*(?P<name>instruction|input|output)[ \t]*#(?(1)(?:[ \t]*:[ \t]*\1|[ \t]*\1[ \t]*:)|[ \t]*:)",
                  re.IGNORECASE)
#: Anything that looks like a tag, colon or not: more of these than of :data:`_TAG` is a malformed tag.
_TAG_LIKE = re.compile(r"#[ \t]*(?:instruction|input|output)[ \t]*#", re.IGNORECASE)
#: A line that opens with some other tag (``#text#:``, ``#remarks#:``): the model went on past the task.
_OTHER_TAG = re.compile(r"^[ \t]*(?:\*\*|__)?#[ \t]*(?!(?:instruction|input|output)[ \t]*#)([^\W_][\w ]{0,30}?)[ \t]*#[ \t]*:", re.IGNORECASE | re.MULTILINE)
#: End-of-sequence markers a raw completion may still carry at its end (the public parser strips ``</s>``).
EOS_MARKERS = ("</s>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>")
#: An input that says there is none ("N/A", "<noinput>", Alpaca's placeholder): read as empty.
_NO_INPUT = re.compile(r"^[\(\[<]?\s*(?:none|n/?a|no input|noinput|null|nil|empty|nothing|-+|\"\"|'')\s*[\)\]>]?\.?$", re.IGNORECASE)
#: An instruction that points at a text the user turn would not carry ("Summarize the passage.").
#: A pointing word and a noun for a text ("this document", "the following short passage"), or "the"
#: with a noun that names nothing but a text ("the passage", "the text"); "the document" or "the
#: content" alone are everyday phrases of standalone requests ("print the document").
_REFERENCE = re.compile(
    r"\b(?:(?:this|these|given|provided|following|above|below|attached|aforementioned)\s+(?:\w+\s+)?"
    r"(?:text|passage|article|paragraph|excerpt|document|snippet|story|essay|material|content|notice)s?"
    r"|the\s+(?:text|passage|article|paragraph|excerpt|snippet)s?)\b",
    re.IGNORECASE,
)
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "`": "`"}
#: A short lead-in before the first tag ("Task:", "Here is the task:") is tolerated, a longer one is not.
MAX_LEAD_IN_WORDS = 12


def _clean(value: str) -> str:
    """A field's text: outer whitespace off, and one pair of quotes around the whole of it."""
    s = value.strip()
    if len(s) >= 2 and _QUOTES.get(s[0]) == s[-1] and s[0] not in s[1:-1]:
        s = s[1:-1].strip()
    return s


def _normal(text: str) -> str:
    return " ".join(w.lower() for w in words(text))


_ECHO = _normal(DESIGN_PROMPT)


def _strip_eos(text: str) -> str:
    s = text.rstrip()
    while s.endswith(EOS_MARKERS):
        s = s[: -len(next(m for m in EOS_MARKERS if s.endswith(m)))].rstrip()
    return s


def is_no_input(value: str) -> bool:
    """Whether an input field says there is no input ("N/A", "None", "<noinput>", "-"): read as empty."""
    return bool(_NO_INPUT.match(value))


def parse_task(reply: str | None) -> dict[str, str]:
    """``{"instruction", "input", "output"}`` from a ``#instruction#: ... #input#: ... #output#: ...`` reply.

    Raises :class:`ParseError` with a stable reason, never guesses: ``empty_reply``, ``no_tags``,
    ``malformed_tag`` (``#output#`` without its colon), ``repeated_tag``,
    ``missing_instruction_tag``/``missing_input_tag``/``missing_output_tag``, ``tags_out_of_order``,
    ``unknown_tag`` (a line opens with another tag, ``#text#:``: the model went on past the task),
    ``text_before_tags`` (more than a short lead-in), ``empty_instruction``, ``empty_output``,
    ``echoed_prompt`` (the instruction is this method's own request), ``refusal``,
    ``output_repeats_instruction``/``output_repeats_input`` (the same words, case and punctuation aside),
    ``dangling_reference`` (the instruction points at "the text" and the input is empty). An empty
    input is a task with no input; a placeholder ("N/A", "None", "<noinput>") reads as empty.
    """
    if reply is None or not reply.strip():
        raise ParseError("empty_reply")
    s = _strip_eos(reply)
    found = list(_TAG.finditer(s))
    if not found:
        if _TAG_LIKE.search(s):
            raise ParseError("malformed_tag", "tags without their colon")
        raise ParseError("no_tags", s.strip()[:80])
    if len(_TAG_LIKE.findall(s)) != len(found):
        raise ParseError("malformed_tag", "a tag without its colon")
    if other := _OTHER_TAG.search(s):
        raise ParseError("unknown_tag", f"#{other.group(1)}#")
    names = [m.group("name").lower() for m in found]
    for tag in TAGS:
        if names.count(tag) > 1:
            raise ParseError("repeated_tag", f"#{tag}# {names.count(tag)} times")
    for tag in TAGS:
        if tag not in names:
            raise ParseError(f"missing_{tag}_tag")
    if names != list(TAGS):
        raise ParseError("tags_out_of_order", " ".join(f"#{n}#" for n in names))
    lead = s[: found[0].start()].strip()
    if lead and ("\n" in lead or len(lead.split()) > MAX_LEAD_IN_WORDS):
        raise ParseError("text_before_tags", lead[:80])
    ends = [m.start() for m in found[1:]] + [len(s)]
    task = {name: _clean(s[m.end():end]) for name, m, end in zip(names, found, ends)}
    if not task["instruction"]:
        raise ParseError("empty_instruction")
    if not task["output"]:
        raise ParseError("empty_output")
    if is_no_input(task["input"]):
        task["input"] = ""
    if _normal(task["instruction"]) == _ECHO:
        raise ParseError("echoed_prompt", task["instruction"][:80])
    for name in ("instruction", "output"):
        if is_refusal(task[name]):
            raise ParseError("refusal", f"{name}: {task[name][:80]}")
    output = _normal(task["output"])
    if output == _normal(task["instruction"]):
        raise ParseError("output_repeats_instruction", task["output"][:80])
    if task["input"] and output == _normal(task["input"]):
        raise ParseError("output_repeats_input", task["output"][:80])
    if not task["input"] and (m := _REFERENCE.search(task["instruction"])):
        raise ParseError("dangling_reference", f"'{m.group(0)}' with no input")
    return task


def render_task(task: dict[str, str]) -> str:
    """The task in the wrapper's format, as :func:`parse_task` reads it (worked examples use this)."""
    return f"#instruction#: {task['instruction']}\n#input#: {task.get('input', '')}\n#output#: {task['output']}"


def overlap_share(output: str, text: str) -> tuple[float, int, int]:
    """(share, found, total) of the output's distinct lower-cased words that occur in ``text``.

    Distinct words, so an output that repeats one word of the text is not grounded by repetition;
    an output with no word at all has share 0."""
    mine = {w.lower() for w in words(output)}
    if not mine:
        return 0.0, 0, 0
    theirs = {w.lower() for w in words(text)}
    found = len(mine & theirs)
    return found / len(mine), found, len(mine)


def check_overlap(task: dict[str, str], text: str, min_share: float) -> dict[str, Any]:
    """The overlap grounding details of a parsed task, or ``ParseError("ungrounded")`` below ``min_share``."""
    share, found, total = overlap_share(task["output"], text)
    if share < min_share:
        raise ParseError("ungrounded", f"overlap {share:.2f} < {min_share:g}: {found} of the output's {total} words are in the text")
    return {"mode": "overlap", "overlap": round(share, 4), "words_found": found, "words": total, "threshold": min_share}


def check_not_example(task: dict[str, str], examples: Iterable[dict[str, str]]) -> None:
    """``ParseError("copied_example")`` when the task's instruction or output is one of the worked examples' (small models copy them)."""
    for ex in examples:
        for name in ("instruction", "output"):
            if _normal(task[name]) == _normal(ex[name]):
                raise ParseError("copied_example", f"{name}: {task[name][:80]}")


def user_turn(instruction: str, input: str) -> str:
    """The chat user turn of a task: the instruction, then a blank line and the input when there is one."""
    return f"{instruction}\n\n{input}" if input else instruction


#: Worked examples, shown as chat turns before the text (my own; neither is from the example corpus).
#: One task has an input and one has none, and both outputs use the text's own words, as the
#: grounding check asks.
EXAMPLES: tuple[dict[str, str], ...] = (
    {
        "text": ("A sourdough starter kept at room temperature needs feeding once or twice a day: discard about half, then "
                 "add equal weights of flour and water. Kept in the refrigerator, it can go a week between feedings. A "
                 "starter that is left too long turns sour and grey liquid collects on top; pour the liquid off and feed "
                 "it twice before baking with it again."),
        "instruction": "How often should I feed a sourdough starter, and what should I do if I left it too long?",
        "input": "",
        "output": ("Feed it once or twice a day at room temperature, or about once a week if you keep it in the refrigerator: "
                   "discard about half, then add equal weights of flour and water. If it was left too long and grey liquid "
                   "collects on top, pour the liquid off and feed it twice before baking with it again."),
    },
    {
        "text": ("Library notice. The reading room closes early on 3 March for a staff meeting. From 10 March, returns go in "
                 "the new box by the side door; the old slot at the front is sealed. The autumn book sale, postponed "
                 "in October, now takes place on 22 March in the main hall."),
        "instruction": "List each date in the notice below with what happens on it.",
        "input": ("The reading room closes early on 3 March for a staff meeting. From 10 March, returns go in the new box by "
                  "the side door. The book sale now takes place on 22 March in the main hall."),
        "output": "- 3 March: the reading room closes early for a staff meeting.\n- 10 March: returns go in the new box by the side door.\n- 22 March: the book sale in the main hall.",
    },
)


class AugmentStage(Stage):
    """Text -> task (instruction, input, output), parsed strictly and checked for grounding in the text."""

    kind = "augment"
    variables = ("text", "examples")

    def __init__(self, method: str, name: str, options: dict[str, Any]):
        super().__init__(method, name, options)
        self.grounding = str(options["grounding"])
        if self.grounding not in GROUNDING_MODES:
            raise BtkitError(f"stage {self.label}: --grounding must be one of {', '.join(GROUNDING_MODES)}, got '{self.grounding}'")
        self.min_overlap = float(options["min_overlap"])
        self.min_pmi = float(options["min_grounding_pmi"])
        shots = int(options["shots"])  # 0 is zero-shot
        if shots > len(EXAMPLES):
            raise BtkitError(f"stage {self.label}: --shots is at most {len(EXAMPLES)} (the worked examples it has), got {shots}")
        self.examples = list(EXAMPLES[:shots])
        self.templates = ("tegit/augment", "tegit/ground") if self.grounding == "likelihood" else ("tegit/augment",)

    def check_backend(self, backend: Any) -> None:
        if self.grounding == "likelihood":
            backend.require(SCORE_CONTINUATION, f"--grounding likelihood in stage {self.label} (or use --grounding overlap)")

    async def process(self, record: Record, ctx: Any) -> list[Record]:
        text = record.fields["text"]

        def parse(reply: str | None) -> dict[str, Any]:
            task = parse_task(reply)
            check_not_example(task, self.examples)
            if self.grounding == "overlap":
                return {**task, "grounding": check_overlap(task, text, self.min_overlap)}
            return task

        comp = await ctx.complete("tegit/augment", {"text": text, "examples": self.examples}, parse=parse,
                                  **self.sampling(temperature=0.0, max_tokens=512))
        if comp.parse_error is not None:  # truncated, no tags, ungrounded, ... (reply and reason in the lineage)
            e = comp.parse_error
            reason = "ungrounded" if e.reason == "ungrounded" else f"task_{e.reason}"
            return [record.drop(self.label, reason, detail=e.detail)]
        task = dict(comp.parsed)  # the lineage keeps what was parsed, grounding included
        record.meta["grounding"] = task.pop("grounding", None) or {"mode": "off"}
        if self.grounding == "likelihood":
            cond = await ctx.score_continuation("tegit/ground", {"text": text}, task["output"])
            uncond = await ctx.score_continuation(None, {}, task["output"])
            pmi, details = likelihood_parts("pmi", cond, uncond)
            details.pop("score", None)
            record.meta["grounding"] = {"mode": "likelihood", **details, "threshold": self.min_pmi}
            if pmi is None:
                return [record.drop(self.label, "grounding_no_score", error=details.get("score_error"))]
            if pmi < self.min_pmi:
                return [record.drop(self.label, "ungrounded", pmi=pmi, threshold=self.min_pmi)]
        record.fields.update(task_instruction=task["instruction"], input=task["input"],
                             instruction=user_turn(task["instruction"], task["input"]), response=task["output"])
        return [record]


class CurateStage(PairCurateStage):
    """The user turn (instruction with its input) against the output, with the kit's curation.

    Modes (``--judge-mode``): this method's 5-point task rubric, generated and parsed (``rubric``)
    or read from the digit distribution after ``Score: `` (``logprob``); or by likelihood (``pmi``,
    ``ifd``: how much the user turn makes the output more likely). Thresholds and keep-top-P% are
    the kit's. Kept pairs get no system prompt: TeGit tags none."""

    judge_template = "tegit/curate"
    likelihood_template = "tegit/pmi"


class TeGit(Method):
    def prepare(self, rows: Iterable[dict[str, Any]], options: dict[str, Any]) -> Iterator[Record]:
        return segment_corpus(rows, options, stage="tegit.segment")

    def to_output(self, record: Record) -> dict[str, Any]:
        """The chat pair, and the task apart as ``alpaca`` (instruction, input, output) for an Alpaca export.

        If a later stage changed the instruction (it no longer is the task's instruction and input),
        the whole user turn is the Alpaca instruction, with no input: never a stale triple."""
        out = super().to_output(record)
        f = record.fields
        bare, inp = f.get("task_instruction"), f.get("input") or ""
        if bare is not None and user_turn(bare, inp) == out["instruction"]:
            alpaca = {"instruction": bare, "input": inp, "output": out["response"]}
        else:
            alpaca = {"instruction": out["instruction"], "input": "", "output": out["response"]}
        meta = out.pop("meta")
        return {**out, "alpaca": alpaca, "meta": meta}


METHOD = TeGit(
    stage_classes={"augment": AugmentStage, "curate": CurateStage},
    name="tegit",
    description="TeGit / DoG-Instruct: design a whole task (instruction, input, output) grounded in each text; strict parse, grounding check, curation.",
    paper="Chen et al. 2023, DoG-Instruct: Towards Premium Instruction-Tuning Data via Text-Grounded Instruction Wrapping, arXiv:2309.05447",
    stages=[
        StageInfo("augment", "augment", ("text",), ("instruction", "response", "task_instruction", "input"),
                  "design a task from the text as #instruction#/#input#/#output#; strict parse; the output grounded in the text "
                  "(word overlap or likelihood, meta.grounding); instruction = the user turn (instruction + input)"),
        StageInfo("curate", "curate", ("instruction", "response"), (),
                  "score the user turn against the output (5-point task rubric, or likelihood: pmi/ifd; meta.score) and keep it above a threshold or in the top P%"),
    ],
    default_stages=("augment", "curate"),
    prompts_dir=PROMPTS,
    cli_options=[
        click.Option(["--grounding"], type=click.Choice(GROUNDING_MODES), default="overlap", show_default=True,
                     help="How the output must be grounded in the text: overlap (share of the output's distinct words found in the text, "
                          "no model call), likelihood (mean log P(output|text) - mean log P(output), needs a backend that scores "
                          "continuations), off."),
        click.Option(["--min-overlap"], type=SHARE, default=0.5, show_default=True,
                     help="--grounding overlap: keep tasks whose output has at least this share of its distinct words in the text."),
        click.Option(["--min-grounding-pmi"], type=SCORE, default=0.0, show_default=True,
                     help="--grounding likelihood: keep tasks whose output is at least this much more likely (nats per token) after the text."),
        *pair_curate_options(default_threshold=4),
        click.Option(["--shots"], type=SHOTS, default=2, show_default=True,
                     help=f"Worked examples (text -> task) shown before the text, at most {len(EXAMPLES)} (0: none)."),
        *segment_options("texts"),
    ],
)


@hookimpl
def btkit_register_methods(register):
    register(METHOD)
