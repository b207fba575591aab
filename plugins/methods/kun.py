"""Kun: answer polishment for self-alignment with instruction back-translation (Zheng et al. 2024, arXiv 2401.06477).

Stages, in the paper's order:

- ``perplexity``: text cleaning beyond length (segments of ``--min-words``..``--max-words``): with
  ``--max-perplexity X``, drop texts the model finds less likely than perplexity X (one
  likelihood pass per text; off by default, then no model call).
- ``augment`` (label model): text -> instruction, seed pairs reversed as few-shot turns.
- ``filter``: drop instructions that point at "the text" instead of standing alone (English and
  Chinese word lists, :data:`DEFAULT_REFERENCE_WORDS`; ``--reference-words`` replaces them).
- ``judge`` (point model): a binary good/bad judgment of the *instruction alone* on clarity,
  completeness and feasibility.
- ``polish`` (answer polishment): the answer model rewrites the raw text into the response to the
  instruction, grounded in the text ("Given: <text>").
- ``postfilter``: drop responses that are too short, refer to the assistant itself ("as an AI"),
  refer to the text ("according to the text"), apologise, or repeat themselves; each drop names
  its reason.

Generation uses the paper's decoding (temperature 0.5, top-p 0.95, repetition penalty 1.2); the
judge is greedy, or reads P(good)/P(bad) from logprobs where the backend can.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Iterator

import click

from btkit.hookspecs import hookimpl
from btkit.methods import Method, ParseError, Stage, StageInfo
from btkit.options import SHARE, FiniteFloatRange
from btkit.records import Record

from ._prompts import PROMPTS
from btkit.kit.text import rouge_tokens
from btkit.kit.judges import LABEL_JUDGE_MODES, JudgingStage, invalid_logprobs, judge_mode_option
from btkit.kit.verdict import binary_verdict
from btkit.kit.seeds import DEFAULT_SEED, load_seed, pick_examples, seed_options
from btkit.kit.instructions import parse_instruction
from btkit.kit.segment import segment_corpus, segment_options

#: The paper's decoding for generation (label and answer models).
KUN_SAMPLING = {"temperature": 0.5, "top_p": 0.95, "repetition_penalty": 1.2}

_DETERMINERS = ("the", "this", "that", "these", "those", "given", "provided", "following", "above", "attached", "aforementioned")
_NOUNS = ("text", "texts", "article", "articles", "passage", "passages", "paragraph", "paragraphs", "excerpt", "excerpts",
          "document", "documents", "essay", "story", "blog post", "link", "links", "website", "web page", "webpage", "page", "material")
#: English, from the paper's list (article, text, passage, according to, summary, link, website):
#:
#: - the nouns for the text itself (text, article, passage, link, ...) only after a pointing word
#:   ("the article", "this passage", "the following text", "the link"): bare, "text" and "link"
#:   have everyday senses a standalone request uses ("How do I edit a text file?", "What is a
#:   hard link?");
#: - "summary" and "website" bare, as the paper lists them, with their forms (summarize,
#:   summarise) and the web-only words for a link (url, hyperlink), plus phrases that presuppose
#:   a text ("according to", "the author"). Bare, these also drop some standalone requests ("How
#:   do I build a website?", "Write a summary of the French Revolution"): the paper accepts that
#:   loss, since back-translated instructions that say "summary" or "website" mostly mean the
#:   text the label model was shown. ``--reference-words`` replaces the whole list.
REFERENCE_WORDS_EN = tuple(f"{d} {n}" for d in _DETERMINERS for n in _NOUNS) + (
    "according to", "mentioned above", "as mentioned", "as stated", "the author", "summary", "summarize", "summarise",
    "website", "url", "hyperlink",
)
#: Chinese: the paper's list is Chinese (article, text, passage, according to, summary, link, website...).
REFERENCE_WORDS_ZH = ("文章", "文本", "本文", "原文", "上文", "下文", "短文", "段落", "这段话", "这段文字", "材料", "根据",
                      "链接", "网站", "网页", "摘要", "总结", "作者", "文中", "上述")
DEFAULT_REFERENCE_WORDS = REFERENCE_WORDS_EN + REFERENCE_WORDS_ZH

_SELF_REFERENCE = re.compile(
    r"\bas an? (?:ai|artificial intelligence)\b|\bas an? (?:large )?language model\b|\bi(?:'m| am) an? (?:ai|artificial intelligence)\b"
    r"|\bi(?:'m| am) an? (?:large )?language model\b|作为一个?(?:ai|AI|人工智能|语言模型)|我是一个?(?:ai|AI|人工智能|语言模型)", re.IGNORECASE)
_REFERS_TO_TEXT = re.compile(
    r"\b(?:according to|based on|as (?:stated|mentioned|described) in) (?:the |this )?(?:given |provided |above )?(?:text|article|passage|document|excerpt|paragraph|information (?:given|provided))\b"
    r"|\bthe (?:text|article|passage|document|excerpt) (?:says|states|mentions|describes|explains)\b|\bin the (?:given|provided|above) (?:text|article|passage)\b"
    r"|根据(?:文章|文本|原文|上文|材料|给定)|(?:文中|文章中|原文中)(?:提到|所述|指出)", re.IGNORECASE)
_APOLOGY = re.compile(
    r"\b(?:i'?m sorry|i am sorry|i apologi[sz]e|my apologies|sorry, but|unfortunately, i (?:can(?:no|')t|am unable|don't))\b"
    r"|抱歉|对不起|很遗憾", re.IGNORECASE)


def compile_reference_words(terms: Iterable[str]) -> list[tuple[str, re.Pattern]]:
    """Patterns for reference words: word-bounded for Latin script, plain substrings otherwise."""
    out = []
    for term in terms:
        t = " ".join(str(term).split())
        if not t:
            continue
        if t.isascii():
            out.append((t, re.compile(r"(?<![A-Za-z0-9])" + re.escape(t).replace(r"\ ", r"\s+") + r"(?![A-Za-z0-9])", re.IGNORECASE)))
        else:
            out.append((t, re.compile(re.escape(t))))
    return out


def find_reference(instruction: str, patterns: list[tuple[str, re.Pattern]]) -> str | None:
    """The first reference word found in the instruction, or None."""
    for term, pattern in patterns:
        if pattern.search(instruction):
            return term
    return None


def repetition_ratio(text: str, n: int = 4) -> float:
    """Share of repeated n-grams (words; CJK characters count as words): 0 for varied text."""
    tokens = rouge_tokens(text)
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if len(grams) < 8:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def postfilter_reason(response: str, min_chars: int = 20, max_repetition: float = 0.3) -> tuple[str, dict[str, Any]] | None:
    """(reason, details) for a response Kun's post-filter drops, or None to keep it."""
    stripped = response.strip()
    if len(stripped) < min_chars:
        return "too_short", {"chars": len(stripped), "min_chars": min_chars}
    for reason, pattern in (("self_reference", _SELF_REFERENCE), ("refers_to_text", _REFERS_TO_TEXT), ("apology", _APOLOGY)):
        m = pattern.search(stripped)
        if m:
            return reason, {"match": m.group(0)}
    ratio = repetition_ratio(stripped)
    if ratio > max_repetition:
        return "repetitive", {"repetition": round(ratio, 3), "max_repetition": max_repetition}
    return None


def parse_polished(text: str | None) -> str:
    """The polished answer as written; only an empty reply is a parse failure (the post-filter judges the rest)."""
    if text is None or not text.strip():
        raise ParseError("empty_reply")
    return text.strip()


def _word_list(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(i).strip() for i in items if str(i).strip())


class WordList(click.ParamType):
    """Comma-separated words on the command line, or a list in a pipeline file."""

    name = "WORDS"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        if not isinstance(value, (str, list)):
            self.fail(f"{value!r} is not a list of words", param, ctx)
        words = _word_list(value)
        if not words:
            self.fail("no words given", param, ctx)
        return words


class PerplexityStage(Stage):
    """Drop texts whose perplexity under the model exceeds ``max_perplexity`` (None: keep all, no call)."""

    kind = "curate"

    def __init__(self, method: str, name: str, options: dict[str, Any]):
        super().__init__(method, name, options)
        self.max_perplexity = float(options["max_perplexity"]) if options.get("max_perplexity") is not None else None  # None: off

    def check_backend(self, backend: Any) -> None:
        if self.max_perplexity is not None:
            backend.require("score_continuation", f"--max-perplexity in stage {self.label}")

    async def process(self, record: Record, ctx) -> list[Record]:
        if self.max_perplexity is None:
            return [record]
        logprobs = await ctx.score_continuation(None, {}, record.fields["text"])
        if not logprobs:
            return [record.drop(self.label, "no_tokens")]
        if invalid_logprobs(logprobs):  # a NaN perplexity compares as "not too high" and would keep the text
            return [record.drop(self.label, "invalid_logprobs")]
        try:
            perplexity = math.exp(-math.fsum(logprobs) / len(logprobs))
        except OverflowError:  # a token at -inf (or near it): the text is as unlikely as it gets
            perplexity = math.inf
        record.meta["perplexity"] = round(perplexity, 3)
        if perplexity > self.max_perplexity:
            return [record.drop(self.label, "perplexity_too_high", perplexity=round(perplexity, 3), max_perplexity=self.max_perplexity)]
        return [record]


class KunAugmentStage(Stage):
    """Text -> instruction (the label model); the text stays in ``text`` for polishment."""

    kind = "augment"
    templates = ("kun/augment",)
    variables = ("text", "examples")

    def __init__(self, method: str, name: str, options: dict[str, Any]):
        super().__init__(method, name, options)
        self.seed = load_seed(options["seed_file"]) if options.get("seed_file") else load_seed(DEFAULT_SEED)
        self.shots = int(options["shots"])  # 0 is zero-shot

    async def process(self, record: Record, ctx) -> list[Record]:
        text = record.fields["text"]
        comp = await ctx.complete("kun/augment", {"text": text, "examples": pick_examples(self.seed, record.id, self.shots)},
                                  parse=lambda t: parse_instruction(t, text), **self.sampling(**KUN_SAMPLING, max_tokens=128))
        if comp.parse_error is not None:
            return [record.drop(self.label, f"instruction_{comp.parse_error.reason}", detail=comp.parse_error.detail)]
        record.fields["instruction"] = comp.parsed
        return [record]


class ReferenceFilterStage(Stage):
    """Drop instructions that point at a text the reader never sees (no model call)."""

    kind = "curate"

    def __init__(self, method: str, name: str, options: dict[str, Any]):
        super().__init__(method, name, options)
        self.patterns = compile_reference_words(_word_list(options.get("reference_words")) or DEFAULT_REFERENCE_WORDS)

    async def process(self, record: Record, ctx) -> list[Record]:
        term = find_reference(record.fields["instruction"], self.patterns)
        if term:
            return [record.drop(self.label, "refers_to_text", word=term)]
        return [record]


class JudgeStage(JudgingStage):
    """The point model: good/bad on the instruction alone (a label judge: rubric or logprob)."""

    kind = "curate"
    templates = ("kun/judge",)
    variables = ("instruction", "mode")
    judge_modes = LABEL_JUDGE_MODES

    async def process(self, record: Record, ctx) -> list[Record]:
        verdict, details = await binary_verdict(ctx, "kun/judge", {"instruction": record.fields["instruction"]}, "good", "bad",
                                                self.judge_mode, self.sampling(temperature=0.0, max_tokens=8))
        record.meta.update(judge=details)
        if verdict is None:
            return [record.drop(self.label, "unparseable_verdict", error=details.get("verdict_error"))]
        if not verdict:
            return [record.drop(self.label, "judged_bad", **{k: v for k, v in details.items() if k.startswith("p_")})]
        return [record]


class PolishStage(Stage):
    """Answer polishment: the raw text rewritten into the response to the instruction."""

    kind = "rewrite"
    templates = ("kun/polish",)
    variables = ("instruction", "text")

    async def process(self, record: Record, ctx) -> list[Record]:
        f = record.fields
        comp = await ctx.complete("kun/polish", {"instruction": f["instruction"], "text": f["text"]}, parse=parse_polished,
                                  **self.sampling(**KUN_SAMPLING, max_tokens=768))
        if comp.parse_error is not None:
            return [record.drop(self.label, f"polish_{comp.parse_error.reason}")]
        record.meta["original_response"] = f["text"]
        f["response"] = comp.parsed
        return [record]


class PostFilterStage(Stage):
    """Drop polished responses by the paper's post-filters, each with its own reason."""

    kind = "curate"

    def __init__(self, method: str, name: str, options: dict[str, Any]):
        super().__init__(method, name, options)
        self.min_chars = int(options["min_response_chars"])
        self.max_repetition = float(options["max_repetition"])

    async def process(self, record: Record, ctx) -> list[Record]:
        found = postfilter_reason(record.fields["response"], self.min_chars, self.max_repetition)
        if found:
            reason, details = found
            return [record.drop(self.label, reason, **details)]
        return [record]


class Kun(Method):
    def prepare(self, rows: Iterable[dict[str, Any]], options: dict[str, Any]) -> Iterator[Record]:
        return segment_corpus(rows, options, stage="kun.clean")

METHOD = Kun(
    stage_classes={"perplexity": PerplexityStage, "augment": KunAugmentStage, "filter": ReferenceFilterStage, "judge": JudgeStage,
                   "polish": PolishStage, "postfilter": PostFilterStage},
    name="kun",
    description="Kun: instruction back-translation with answer polishment; instruction filters, a good/bad instruction judge and response post-filters.",
    paper="Zheng et al. 2024, Kun: Answer Polishment for Chinese Self-Alignment with Instruction Back-Translation, arXiv:2401.06477",
    stages=[
        StageInfo("perplexity", "curate", ("text",), (), "with --max-perplexity: drop texts the model finds too unlikely (meta.perplexity; off by default)"),
        StageInfo("augment", "augment", ("text",), ("instruction",), "label model: write the instruction the text answers (seed pairs reversed as few-shot turns)"),
        StageInfo("filter", "curate", ("instruction",), (), "drop instructions that point at 'the text/article/passage' (English and Chinese word lists)"),
        StageInfo("judge", "curate", ("instruction",), (), "point model: good/bad on the instruction alone (clarity, completeness, feasibility; meta.judge)"),
        StageInfo("polish", "rewrite", ("instruction", "text"), ("response",), "answer polishment: rewrite the text into the response, grounded in it (the text also goes to meta.original_response)"),
        StageInfo("postfilter", "curate", ("response",), (), "drop self-reference, 'according to the text', apologies, too short (--min-response-chars), repetition (--max-repetition)"),
    ],
    default_stages=("perplexity", "augment", "filter", "judge", "polish", "postfilter"),
    prompts_dir=PROMPTS,
    cli_options=[
        *seed_options(used_for="as few-shot examples for the label model"),
        *segment_options("text segments"),
        click.Option(["--max-perplexity"], type=FiniteFloatRange(1), default=None, help="Drop texts whose perplexity under the model exceeds this (needs a backend that scores likelihood, e.g. llamacpp:). Default: no perplexity filter."),
        click.Option(["--reference-words"], type=WordList(), default=None, help="Comma-separated words/phrases that mark an instruction as pointing at 'the text' (replaces the built-in English and Chinese lists)."),
        judge_mode_option(LABEL_JUDGE_MODES, "How the judge stage reads the point model's good/bad verdict: logprob compares "
                          "P(good)/P(bad) in one forward pass; rubric parses a good/bad reply; auto: logprob when the backend can."),
        click.Option(["--min-response-chars"], type=click.IntRange(0), default=20, show_default=True, help="Drop polished responses shorter than this many characters."),
        click.Option(["--max-repetition"], type=SHARE, default=0.3, show_default=True, help="Drop responses whose share of repeated word 4-grams exceeds this."),
    ],
)


@hookimpl
def btkit_register_methods(register):
    register(METHOD)
