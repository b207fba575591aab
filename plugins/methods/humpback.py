"""Humpback: self-augmentation and self-curation (Li et al. 2023, arXiv 2308.06259).

Stages: ``augment`` writes one instruction per corpus segment with a prompted backward model
(seed pairs reversed as few-shot examples, as the paper's M_yx is trained on output -> instruction);
``curate`` rates each (instruction, segment) pair with the paper's 5-point rubric and keeps score
>= threshold (default 5, the paper's A5). Kept pairs carry the paper's source tag as system prompt.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import click

from btkit.hookspecs import hookimpl
from btkit.methods import Method, Stage, StageInfo
from btkit.records import Record, failed_record

from btkit.kit import judges as curation
from btkit.kit.instructions import parse_instruction
from btkit.kit.seeds import DEFAULT_SEED, load_seed, pick_examples, seed_options
from btkit.kit.segment import segment_corpus, segment_options

from ._prompts import PROMPTS

AUGMENTED_SYSTEM = "Answer with knowledge from web search."
SEED_SYSTEM = "Answer in the style of an AI Assistant."


class AugmentStage(Stage):
    """Segment -> instruction (the segment becomes the response)."""

    kind = "augment"
    templates = ("humpback/augment",)
    variables = ("text", "examples")

    def __init__(self, method: str, name: str, options: dict[str, Any]):
        super().__init__(method, name, options)
        seed_path = options.get("seed_file")
        self.seed = load_seed(seed_path) if seed_path else load_seed(DEFAULT_SEED)
        self.shots = int(options["shots"])  # 0 is zero-shot
        self.candidates = int(options["candidates"])

    async def process(self, record: Record, ctx) -> list[Record]:
        """One record per candidate instruction; a candidate whose call failed is its own dropped record.

        With ``--candidates N`` the N candidates come from one ``n=N`` request where the backend
        samples several choices (vllm:, openai:, litellm:), else from N requests with seeds
        ``seed + i`` (``ctx.complete_choices``).
        """
        text = record.fields["text"]
        examples = pick_examples(self.seed, record.id, self.shots)
        params = self.sampling(temperature=0.7, top_p=0.9, max_tokens=128)
        variables = {"text": text, "examples": examples}
        parse = lambda reply: {"instruction": parse_instruction(reply, text)}  # noqa: E731
        if self.candidates == 1:  # the record itself, sampled as the user asked (no seed unless given)
            comp = await ctx.complete("humpback/augment", variables, parse=parse, **params)
            return [self._finish(record, comp)]
        kids = [record.child(f"~{i}") for i in range(self.candidates)]
        comps = await ctx.complete_choices("humpback/augment", variables, kids, parse=parse, **params)
        return [failed_record(kid, self.label, c) if isinstance(c, Exception) else self._finish(kid, c) for kid, c in zip(kids, comps)]

    def _finish(self, rec: Record, comp: Any) -> Record:
        """Keep the parsed instruction, or drop the candidate with the parse failure's reason."""
        if comp.parse_error is not None:  # truncated, content-filtered, empty, copied back, ... (recorded in the step)
            return rec.drop(self.label, f"instruction_{comp.parse_error.reason}", detail=comp.parse_error.detail)
        rec.fields.update(instruction=comp.parsed["instruction"], response=rec.fields["text"])
        return rec


class CurateStage(curation.PairCurateStage):
    """(instruction, response) -> score; keep the pair if it scores well enough.

    Modes (``--judge-mode``): the paper's 5-point rubric, generated and parsed (``rubric``) or read
    from the digit distribution after ``Score: `` (``logprob``); or by likelihood, with no judging
    prompt (``pmi``, ``ifd``: how much the instruction makes the response more likely, see
    :mod:`btkit.kit.judges`). Scoring, thresholds and keep-top-P% are the kit's
    :class:`~btkit.kit.judges.PairCurateStage`; kept pairs carry the paper's source tag.
    """

    judge_template = "humpback/curate"
    likelihood_template = "humpback/pmi"
    system = AUGMENTED_SYSTEM


class Humpback(Method):
    def prepare(self, rows: Iterable[dict[str, Any]], options: dict[str, Any]) -> Iterator[Record]:
        return segment_corpus(rows, options)

    def extra_records(self, options: dict[str, Any]) -> Iterator[Record]:
        if not (options.get("mix_seed") and options.get("seed_file")):
            return iter(())
        recs = []
        for i, pair in enumerate(load_seed(options["seed_file"])):
            r = Record(id=f"seed#{i}", source_id=f"seed:{i}", fields={**pair, "system": SEED_SYSTEM})
            r.meta["source"] = "seed"
            recs.append(r)
        return iter(recs)


METHOD = Humpback(
    stage_classes={"augment": AugmentStage, "curate": CurateStage},
    name="humpback",
    description="Humpback: self-augmentation (backward instruction generation) and self-curation (5-point rubric).",
    paper="Li et al. 2023, Self-Alignment with Instruction Backtranslation, arXiv:2308.06259",
    stages=[
        StageInfo("augment", "augment", ("text",), ("instruction", "response"), "write the instruction a segment answers (seed pairs reversed as few-shot examples)"),
        StageInfo("curate", "curate", ("instruction", "response"), ("system",), "score the pair (5-point rubric, or likelihood: pmi/ifd; meta.score) and keep it above a threshold or in the top P%"),
    ],
    default_stages=("augment", "curate"),
    prompts_dir=PROMPTS,
    cli_options=[
        *seed_options(),
        *curation.pair_curate_options(default_threshold=5),
        click.Option(["--candidates"], type=click.IntRange(1), default=1, show_default=True, help="Instructions generated per segment: one request with n=N where the backend samples several (vllm:, openai:, litellm:), else N requests with seeds seed+i. A failed candidate is dropped on its own."),
        *segment_options(),
        click.Option(["--mix-seed"], is_flag=True, default=False, help="Also write the seed pairs to data.jsonl, tagged 'Answer in the style of an AI Assistant.' (the paper trains on seed + curated)."),
    ],
)


@hookimpl
def btkit_register_methods(register):
    register(METHOD)
