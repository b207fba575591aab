"""Cycle-Instruct: seed-free instruction data from raw text by cycle consistency (arXiv 2508.16100, EMNLP 2025).

What the paper specifies
------------------------
No seed pairs at all. Raw text is split into segments. Two models are bootstrapped from the base
model: a *question generator* (A2Q: answer -> question) and an *answer generator* (Q2A: question ->
answer). Each round, one model's pseudo-labels train the other, and each must reconstruct the
original text from its counterpart's output (cycle consistency): the question generator's question
for a real segment trains the answer generator to produce that segment; the answer generator's
answer to a generated question trains the question generator to give back that question. The
rounds iterate. The paper's segmentation, prompts, losses and number of rounds are not public, and
no official code exists (a GitHub repository of the same name is unrelated).

What btkit does (chosen, measured, documented here)
---------------------------------------------------
This module is the *method*: the stages a round runs. ``btkit loop cycle_instruct`` (the loop,
elsewhere) trains the two generators and runs these stages with a different model per stage.

- Units: corpus segments from :func:`btkit.kit.segment.segment_corpus`, the same segmentation as
  Humpback (paragraphs packed up to ``--max-words``, split at headers, too-short segments and exact
  duplicates journalled as dropped, under ``cycle_instruct.segment``). A segment is the "answer"
  side of the cycle, so it must be something an assistant could say whole: 30..400 words by
  default, as Humpback.
- ``question`` (augment, A2Q): the question generator writes the question a real segment answers.
  Zero-shot (there is no seed to draw examples from): a short fixed prompt,
  ``prompts/cycle_instruct/question.j2``, parsed and cleaned with
  :func:`btkit.kit.instructions.parse_instruction` (labels, quotes, refusals, copies of the segment
  are parse failures, never guesses; so is a question that repeats more than ``--max-copied-words``
  (12) consecutive words of its segment, ``question_copies_segment``: it would hand the answer
  generator the text it must reconstruct; the embedded SmolLM2-135M, zero-shot, did so on 2 of
  the 10 questions it wrote for the first 16 documents of ``examples/corpus.jsonl``, with runs of
  48 and 24 words, while the longest run among the others was 10). Fields: ``instruction`` (the
  question), ``response`` and ``segment`` (both the segment; ``segment`` survives a later stage
  that rewrites ``response``).
  Sampling: temperature 0.7, top-p 0.9, 128 tokens (Humpback's).
- ``answer`` (rewrite, Q2A): the answer generator answers the question with **no access to the
  segment**: ``prompts/cycle_instruct/answer.j2`` is a plain chat turn, the question as the only
  user message and no system prompt, so a model trained on (question -> segment) rows is used
  exactly as it was trained. Field ``reconstruction``; ``meta.rouge_l``: ROUGE-L F1 of the
  reconstruction against the segment (:func:`rouge_l`). Greedy by default (temperature 0), so the
  reconstruction score of a held-back set compares across rounds without sampling noise; 512
  tokens, and a reply cut there is kept (``meta.reconstruction_truncated``): a partial
  reconstruction is still a reconstruction, and ROUGE-L's recall charges it for what is missing.
- ``score`` (curate, optional, not in the default stages: it needs a backend that scores
  continuations, e.g. ``llamacpp:`` or ``transformers:``): the continuation-likelihood gain of the
  segment given the question, ``mean log P(segment | question) - mean log P(segment)`` in nats per
  token (btkit's ``pmi``, :func:`btkit.kit.judges.likelihood_score`), scored in the answer
  generator's own frame (the same template). ``meta.gain`` and its parts in ``meta.gain_details``.
  Every pair is kept unless ``--min-gain X`` is given.

``data.jsonl`` holds (question, segment) as ``instruction``/``response`` (the rows the answer
generator trains on), with ``meta.reconstruction`` (the rows the question generator trains on,
reversed), ``meta.rouge_l`` and ``meta.gain``.

Helpers for the loop (pure, no model): :func:`rouge_l` and :func:`longest_shared_run`;
:func:`question_prompt` and :func:`answer_prompt`, the two generators' prompts rendered from this
method's templates with btkit's own renderer (``btkit.prompts.PromptLibrary``; pass
``prompts=PromptLibrary([PROMPTS], overrides=[DIR])`` to include a user's ``--prompts`` folder);
:func:`answer_training_pair` and :func:`question_training_pair`, the training rows of each
direction in exactly the frame the stages prompt in, as ``{"instruction", "response", "system"}``
rows:

- answer generator: (generated question -> real segment), ``answer_training_pair(q, segment)``;
- question generator: (the answer generator's output for a generated question -> that question),
  ``question_training_pair(reconstruction, q)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Iterator

import click

from btkit.backends import SCORE_CONTINUATION
from btkit.hookspecs import hookimpl
from btkit.methods import Method, ParseError, Stage, StageInfo
from btkit.options import SCORE
from btkit.records import Record

from btkit.kit.instructions import parse_instruction
from btkit.kit.judges import likelihood_score
from btkit.kit.segment import segment_corpus, segment_options
from btkit.kit.text import rouge_l as _kit_rouge_l, rouge_tokens

from ._prompts import PROMPTS

if TYPE_CHECKING:  # the helpers render with btkit's prompt library, imported when first used
    from btkit.prompts import PromptLibrary, RenderedPrompt

NAME = "cycle_instruct"
QUESTION_TEMPLATE = f"{NAME}/question"
ANSWER_TEMPLATE = f"{NAME}/answer"
#: The stage label segmentation drops are journalled under.
SEGMENT_STAGE = f"{NAME}.segment"

#: Decoding defaults of each generator (a stage's options override them).
QUESTION_SAMPLING = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 128}
ANSWER_SAMPLING = {"temperature": 0.0, "max_tokens": 512}

__all__ = ["NAME", "QUESTION_TEMPLATE", "ANSWER_TEMPLATE", "QUESTION_SAMPLING", "ANSWER_SAMPLING", "rouge_l", "longest_shared_run", "parse_answer",
           "question_prompt", "answer_prompt", "question_training_pair", "answer_training_pair", "METHOD"]


# -- pure functions (the loop uses these too) ----------------------------------------------------
def rouge_l(reference: str, candidate: str) -> float:
    """ROUGE-L F1 of ``candidate`` against ``reference``: the longest common subsequence of their
    lower-cased word tokens (CJK characters count as one token each), F1 of its precision
    (LCS / candidate tokens) and recall (LCS / reference tokens). 1.0 for identical token
    sequences, 0.0 when they share no token or either has none. Symmetric, so the argument order
    only documents intent. The kit's one implementation (:func:`btkit.kit.text.rouge_l`), no
    dependency."""
    return _kit_rouge_l(reference, candidate)


def longest_shared_run(a: str, b: str) -> int:
    """The longest run of consecutive word tokens (lower-cased, as :func:`rouge_l` reads them) that
    ``a`` and ``b`` share: how much of the segment a question copies verbatim."""
    ta, tb = rouge_tokens(a), rouge_tokens(b)
    best = 0
    prev = [0] * (len(tb) + 1)
    for x in ta:
        cur = [0] * (len(tb) + 1)
        for j, y in enumerate(tb, start=1):
            if x == y:
                cur[j] = prev[j - 1] + 1
                if cur[j] > best:
                    best = cur[j]
        prev = cur
    return best


def parse_answer(text: str | None) -> str:
    """The answer generator's reply as written; only an empty reply is a failure (``empty_reply``)."""
    if text is None or not text.strip():
        raise ParseError("empty_reply")
    return text.strip()


def _library(prompts: "PromptLibrary | None") -> "PromptLibrary":
    if prompts is not None:
        return prompts
    from btkit.prompts import PromptLibrary  # the engine's renderer (sandbox, delimit, defuse): prompts identical to a run's

    return PromptLibrary([PROMPTS])


def question_prompt(answer: str, prompts: "PromptLibrary | None" = None) -> "RenderedPrompt":
    """The question generator's prompt for ``answer`` (a real segment, or a generated answer):
    what the ``question`` stage sends. ``prompts``: a library with the user's overrides (default:
    the shipped templates)."""
    return _library(prompts).render(QUESTION_TEMPLATE, {"text": answer})


def answer_prompt(question: str, prompts: "PromptLibrary | None" = None) -> "RenderedPrompt":
    """The answer generator's prompt for ``question``: what the ``answer`` stage sends, and the
    frame the ``score`` stage scores the segment in. It never holds the segment."""
    return _library(prompts).render(ANSWER_TEMPLATE, {"instruction": question})


def _pair(prompt: "RenderedPrompt", response: str) -> dict[str, str]:
    """A rendered one-turn prompt and its target as an (instruction, response, system) training row."""
    roles = [m["role"] for m in prompt.messages]
    if roles not in (["user"], ["system", "user"]) or prompt.assistant_prefix:
        raise ValueError(f"template {prompt.template} must render to [system,] user with no assistant prefix to be a training row, got {roles}")
    system = prompt.messages[0]["content"] if roles[0] == "system" else ""
    return {"instruction": prompt.messages[-1]["content"], "response": response, "system": system}


def answer_training_pair(question: str, segment: str, prompts: "PromptLibrary | None" = None) -> dict[str, str]:
    """A training row for the answer generator: (generated question -> real segment), in the frame
    the ``answer`` stage prompts it in (``system`` empty: a plain chat turn)."""
    return _pair(answer_prompt(question, prompts), segment)


def question_training_pair(answer: str, question: str, prompts: "PromptLibrary | None" = None) -> dict[str, str]:
    """A training row for the question generator: (the answer generator's output for ``question``
    -> ``question``), in the frame the ``question`` stage prompts it in (its system prompt and the
    quoted answer)."""
    return _pair(question_prompt(answer, prompts), question)


def _reference(fields: dict[str, Any]) -> str:
    """The real segment of a record: ``segment`` where the question stage set it, else ``response``."""
    return fields["segment"] if fields.get("segment") is not None else fields["response"]


# -- stages ----------------------------------------------------------------------------------------
class QuestionStage(Stage):
    """A2Q: the question a real segment answers (zero-shot); the segment becomes the response."""

    kind = "augment"
    templates = (QUESTION_TEMPLATE,)
    variables = ("text",)

    def __init__(self, method: str, name: str, options: dict[str, Any]):
        super().__init__(method, name, options)
        self.max_copied_words = int(options.get("max_copied_words") or 0)  # 0: no check

    def parse(self, reply: str | None, text: str) -> str:
        """:func:`parse_instruction`, and a question that copies a long run of the segment is a
        failure (``copies_segment``): it would hand the answer generator the segment it must reconstruct."""
        question = parse_instruction(reply, text)
        if self.max_copied_words:
            run = longest_shared_run(question, text)
            if run > self.max_copied_words:
                raise ParseError("copies_segment", f"{run} consecutive words of the segment > {self.max_copied_words}")
        return question

    async def process(self, record: Record, ctx) -> list[Record]:
        text = record.fields["text"]
        comp = await ctx.complete(QUESTION_TEMPLATE, {"text": text}, parse=lambda reply: self.parse(reply, text),
                                  **self.sampling(**QUESTION_SAMPLING))
        if comp.parse_error is not None:  # truncated, empty, refusal, copied the segment, ... (raw reply in lineage)
            return [record.drop(self.label, f"question_{comp.parse_error.reason}", detail=comp.parse_error.detail)]
        record.fields.update(instruction=comp.parsed, response=text, segment=text)
        return [record]


class AnswerStage(Stage):
    """Q2A: answer the question without the segment; ROUGE-L of the answer against the segment."""

    kind = "rewrite"
    templates = (ANSWER_TEMPLATE,)
    variables = ("instruction",)  # never the segment: the answer generator reconstructs it blind

    async def process(self, record: Record, ctx) -> list[Record]:
        f = record.fields
        comp = await ctx.complete(ANSWER_TEMPLATE, {"instruction": f["instruction"]}, parse=parse_answer, accept_truncated=True,
                                  **self.sampling(**ANSWER_SAMPLING))
        if comp.parse_error is not None:
            return [record.drop(self.label, f"answer_{comp.parse_error.reason}", detail=comp.parse_error.detail)]
        f["reconstruction"] = comp.parsed
        record.meta["rouge_l"] = round(rouge_l(_reference(f), comp.parsed), 6)
        if comp.finish_reason == "length":
            record.meta["reconstruction_truncated"] = True
        return [record]


class ScoreStage(Stage):
    """Continuation-likelihood gain of the segment given the question (pmi); keeps every pair unless ``--min-gain``."""

    kind = "curate"
    templates = (ANSWER_TEMPLATE,)
    variables = ("instruction",)

    def __init__(self, method: str, name: str, options: dict[str, Any]):
        super().__init__(method, name, options)
        self.min_gain = float(options["min_gain"]) if options.get("min_gain") is not None else None

    def check_backend(self, backend: Any) -> None:
        backend.require(SCORE_CONTINUATION, f"stage {self.label} (mean log P(segment | question) - mean log P(segment))")

    async def process(self, record: Record, ctx) -> list[Record]:
        f = record.fields
        gain, details = await likelihood_score(ctx, "pmi", ANSWER_TEMPLATE, {"instruction": f["instruction"]}, _reference(f))
        record.meta["gain"] = gain
        record.meta["gain_details"] = {k: v for k, v in details.items() if k != "score"}
        if gain is None:
            ctx.count("unscored")
            if self.min_gain is not None:
                return [record.drop(self.label, "no_score", error=details.get("score_error"))]
            return [record]
        if self.min_gain is not None and gain < self.min_gain:
            return [record.drop(self.label, "below_min_gain", gain=gain, min_gain=self.min_gain)]
        return [record]


class CycleInstruct(Method):
    def prepare(self, rows: Iterable[dict[str, Any]], options: dict[str, Any]) -> Iterator[Record]:
        return segment_corpus(rows, options, stage=SEGMENT_STAGE)

    def to_output(self, record: Record) -> dict[str, Any]:
        """(question, segment) as instruction/response; the reconstruction in meta (and the segment,
        when a later stage rewrote the response)."""
        out = super().to_output(record)
        f = record.fields
        if "reconstruction" in f:
            out["meta"]["reconstruction"] = f["reconstruction"]
        if f.get("segment") is not None and f.get("segment") != f.get("response"):
            out["meta"]["segment"] = f["segment"]
        return out


METHOD = CycleInstruct(
    stage_classes={"question": QuestionStage, "answer": AnswerStage, "score": ScoreStage},
    name=NAME,
    description="Cycle-Instruct: seed-free; a question generator writes the question a segment answers, an answer generator "
                "reconstructs the segment from the question alone (ROUGE-L), optionally the likelihood gain of the segment given the question.",
    paper="Cycle-Instruct: Fully Seed-Free Instruction Tuning via Dual Self-Training and Cycle Consistency, arXiv:2508.16100 (EMNLP 2025)",
    stages=[
        StageInfo("question", "augment", ("text",), ("instruction", "response", "segment"),
                  "question generator (A2Q): the question a segment answers, zero-shot; the segment becomes the response"),
        StageInfo("answer", "rewrite", ("instruction", "response"), ("reconstruction",),
                  "answer generator (Q2A): answer the question alone (never sees the segment); meta.rouge_l against the segment"),
        StageInfo("score", "curate", ("instruction", "response"), (),
                  "likelihood gain of the segment given the question, mean log P(a|q) - mean log P(a) (meta.gain); keeps all unless --min-gain"),
    ],
    default_stages=("question", "answer"),
    prompts_dir=PROMPTS,
    cli_options=[
        *segment_options(),
        click.Option(["--max-copied-words"], type=click.IntRange(0), default=12, show_default=True,
                     help="question stage: a question that repeats more than this many consecutive words of its segment is a "
                          "parse failure (question_copies_segment), re-sampled with --parse-retries (0: no check)."),
        click.Option(["--min-gain"], type=SCORE, default=None,
                     help="score stage: drop pairs whose likelihood gain (nats per token) is below this. Default: keep every pair."),
    ],
)


@hookimpl
def btkit_register_methods(register):
    register(METHOD)
