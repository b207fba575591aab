"""Self-Lengthen: long responses grown by a Generator and an Extender (Quan et al. 2024, arXiv 2410.23933).

One round of the paper's data collection (its code: QwenLM/Self-Lengthen, ``*/step*.py``,
``*/utils.py``, ``*/mk_data.py``), without the retraining between rounds (see below):

- ``self_instruct`` (optional, ``--self-instruct N``): the input instructions are seeds; from each
  seed, paired with another seed (the paper shows two), the model writes N new instructions. A new
  instruction is kept when it is 4-499 words long (the paper's ``3 < words < 500``), is no near
  copy of a seed or a sibling (ROUGE-L > 0.7), and the suitability judge says a long answer suits
  it; otherwise it is written again with another seed, up to ``--instruct-attempts`` times (the
  paper's 10). With
  ``--self-instruct 0`` (the default) the input instructions are used as given and no call is made.
- ``generate`` (the Generator): ``--samples`` initial responses per instruction (the paper: 2).
  A response must pass :func:`check_response` (ends in punctuation, no repeated n-gram of
  ``--ngram`` tokens, no "revised version" talk in its first 2 or last 3 lines); a failing one is
  sampled again with another seed up to ``--generate-retries`` times, then dropped with the reason.
- ``extend`` (the Extender): up to ``--rounds`` rounds (the paper: 3). Each round splits the current
  best response (:func:`first_half`), asks the model to enrich that first half, keeps the first two
  thirds of the reply's paragraphs (:func:`keep_prefix`), then asks again with the *whole* response
  as the draft and the kept text prefilled as the start of the reply, so the model writes the rest
  with everything in view. A round's output replaces the best one when it passes
  :func:`check_response` and has more words. The extension is accepted when the best output has
  more than ``--min-growth`` (1.2) times the initial response's words (:func:`accepted`); otherwise
  the whole extension is tried again from the initial response with new seeds, up to
  ``--extend-attempts`` times (the paper retries up to 20), then the record is dropped
  (``not_extended``).

An accepted extension yields two training records, told apart by ``meta.role``:

- ``generator``: instruction -> extended response (the paper's ``gen_sft``);
- ``extender``: the extend prompt showing the initial response with each line dropped with
  probability ``--drop-lines`` (0.2, seeded by the record id) -> extended response (``ext_sft``).

Both carry ``meta.rounds`` (each round's words before and after, and what happened),
``meta.initial_words``/``meta.extended_words``/``meta.growth`` and the LonGen length score of the
initial and extended responses against ``--length-target`` (or a row's ``length_target`` field).
At the end of a run, ``stats.json`` gets a ``self_lengthen`` section: length growth per round,
acceptance, and the length scores (see :func:`length_report`).

``--drop-short`` applies the paper's length-rank drop (``utils.drop_short``) to the accepted
extensions when every unit is done (off by default: on a small run it mostly throws data away).

Left out: the paper trains the Generator and Extender on these sets and repeats (issue 14), and adds
word-count phrases to queries after the last round; it also rank-drops the initial responses.
"""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import click

from btkit.hookspecs import hookimpl
from btkit.kit.runfiles import iter_jsonl
from btkit.methods import Method, ParseError, Stage, StageInfo
from btkit.options import SHARE, FiniteFloatRange
from btkit.records import Record, failed_record, journal_key

from btkit.kit.instructions import parse_instruction
from btkit.kit.judges import LABEL_JUDGE_MODES, JudgingStage, judge_mode_option
from btkit.kit.text import is_refusal, near_duplicate, sentences
from btkit.kit.verdict import binary_verdict

from ._prompts import PROMPTS

NAME = "self_lengthen"
ROLES = ("generator", "extender")

# -- text checks (the paper's utils.check_response) ------------------------------------------
#: CJK characters (and Kana, Hangul): each counts as one word and one n-gram unit, as the paper's
#: ``count_words`` counts Chinese characters.
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_CJK_PUNCT = re.compile(r"[\u3000-\u303f\uff00-\uffef]")
_CJK_ANY = re.compile(r"[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")
_UNITS = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\s\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]+")

#: What a finished response may end with: sentence ends (Latin and CJK), an ellipsis, closing quotes
#: and brackets, a code fence's backtick. The paper's two lists differ (the Llama one also takes
#: ``, ; : -``, which end no sentence; the Qwen one omits ``. ! ?``, an oversight for English text);
#: this is their sentence-ending union.
END_PUNCTUATION = frozenset(".!?…。！？\"'”’)]}>）】」』》`")

#: The paper's Llama variant rejects these in a response's first 2 or last 3 lines: a model that
#: says "Here is the revised version" is talking about its reply rather than giving it.
META_WORDS = ("revised", "revision", "response", "version", "paragraph")
_META_RE = re.compile(r"\b(?:revised|revisions?|responses?|versions?|paragraphs?)\b", re.IGNORECASE)

#: The paper's n-gram lengths: 10 whitespace words in the Llama variant (13 units in the Qwen one,
#: where a unit is a CJK character or a run of ASCII).
DEFAULT_NGRAM = 10


def count_words(text: str) -> int:
    """Words as the paper counts them (``utils.count_words``, also what LonGen's length score is computed
    on): each CJK character is one word, CJK punctuation separates words, and the rest is split at whitespace."""
    if text.isascii() or not _CJK_ANY.search(text):
        return len(text.split())
    return len(_CJK.findall(text)) + len(_CJK_PUNCT.sub(" ", _CJK.sub(" ", text)).split())


def ngram_units(text: str) -> list[str]:
    """The units of the repetition check: whitespace-separated tokens, each CJK character its own unit."""
    if text.isascii() or not _CJK.search(text):
        return text.split()
    return _UNITS.findall(text)


def repeated_ngram(text: str, n: int = DEFAULT_NGRAM) -> tuple[str, ...] | None:
    """The first n-gram of :func:`ngram_units` that occurs twice (overlaps count), or None."""
    return _repeated(ngram_units(text), n)


def _repeated(units: list[str], n: int) -> tuple[str, ...] | None:
    if n < 1:
        raise ValueError("n must be at least 1")
    if len(set(zip(*(units[i:] for i in range(n))))) == max(len(units) - n + 1, 0):  # the common case, decided in C
        return None
    seen: set[tuple[str, ...]] = set()
    for gram in zip(*(units[i:] for i in range(n))):
        if gram in seen:
            return gram
        seen.add(gram)
    return None  # pragma: no cover (a repeat exists)


def ends_in_punctuation(text: str) -> bool:
    s = text.rstrip()
    return bool(s) and s[-1] in END_PUNCTUATION


def meta_commentary(text: str) -> str | None:
    """A :data:`META_WORDS` word in the first 2 or last 3 lines (word-bounded, any case), or None."""
    s = text.strip()
    head = s.split("\n", 2)
    if len(head) < 3:  # two lines or fewer: all of it
        m = _META_RE.search(s)
    else:
        tail = head[2].rsplit("\n", 3)[-3:]
        m = _META_RE.search("\n".join(head[:2] + tail))
    return m.group(0) if m else None


def check_response(text: str | None, ngram: int = DEFAULT_NGRAM, meta_check: bool = True) -> str:
    """The response, stripped, when it passes the paper's checks; ParseError naming the failed one:
    ``empty_reply``, ``refusal``, ``no_end_punctuation``, ``meta_commentary``, ``repeated_ngram``."""
    return checked(text, ngram, meta_check)[0]


def checked(text: str | None, ngram: int = DEFAULT_NGRAM, meta_check: bool = True) -> tuple[str, int]:
    """:func:`check_response`, and the response's :func:`count_words` (counted from the same split)."""
    if text is None or not text.strip():
        raise ParseError("empty_reply")
    s = text.strip()
    if is_refusal(s):
        raise ParseError("refusal", s[:80])
    if not ends_in_punctuation(s):
        raise ParseError("no_end_punctuation", repr(s[-20:]))
    if meta_check:
        word = meta_commentary(s)
        if word:
            raise ParseError("meta_commentary", word)
    plain = s.isascii() or not _CJK_ANY.search(s)
    units = s.split() if plain else _UNITS.findall(s)
    gram = _repeated(units, ngram)
    if gram:
        raise ParseError("repeated_ngram", " ".join(gram)[:200])
    return s, len(units) if plain else count_words(s)


def parse_text(text: str | None) -> str:
    """Any non-empty reply (the expansion of the first half: only its start is kept)."""
    if text is None or not text.strip():
        raise ParseError("empty_reply")
    return text.strip()


# -- the Extender's arithmetic (the paper's step2 extend_response) ---------------------------
def split_parts(text: str) -> tuple[list[str], str]:
    """The response in parts and how to join them: paragraphs; lines when there are at most two
    paragraphs (the paper's rule); sentences when it is one line (the paper would then expand an
    empty first half)."""
    parts = text.split("\n\n")
    if len(parts) > 2:
        return parts, "\n\n"
    parts = text.split("\n")
    if len(parts) > 1:
        return parts, "\n\n"  # the paper joins the lines it keeps with a blank line
    return sentences(text) or [text], " "


_BLANK_RUN = re.compile(r"\n(?:[ \t]*\n){2,}")


def first_half(text: str) -> str:
    """The first half of the response's parts (rounded down, at least one part when there are two)."""
    parts, sep = split_parts(text)
    return sep.join(parts[: len(parts) // 2]).strip()


def keep_prefix(expansion: str) -> str:
    """The first two thirds of the expansion's paragraphs, rounded down (the paper's rule: a one-paragraph
    expansion keeps nothing, and the second call writes the whole answer)."""
    parts = expansion.split("\n\n")
    return "\n\n".join(parts[: len(parts) * 2 // 3])


def join_continuation(prefix: str, continuation: str | None) -> str:
    """The prefilled prefix and the model's continuation of it, as one response."""
    return f"{prefix}{continuation or ''}"


def accepted(initial_words: int, final_words: int, min_growth: float = 1.2) -> bool:
    """The paper's acceptance rule: the extended response has *more than* ``min_growth`` times the words."""
    return final_words > min_growth * initial_words


def drop_lines(text: str, share: float, rng: random.Random) -> tuple[str, int]:
    """The initial response with each non-empty line dropped with probability ``share`` (at least one
    line kept), and how many were dropped: the Extender's training input (the paper drops 20 %). The
    lines kept stay as they were, paragraph breaks and code blocks included (the paper re-joins them
    all with blank lines); a run of blank lines left by a dropped paragraph becomes one."""
    lines = text.split("\n")
    content = [i for i, line in enumerate(lines) if line.strip()]
    drop = {i for i in content if rng.random() < share}
    if content and len(drop) == len(content):
        drop.discard(content[rng.randrange(len(content))])
    kept = "\n".join(line for i, line in enumerate(lines) if i not in drop)
    return _BLANK_RUN.sub("\n\n", kept).strip("\n"), len(drop)


def short_drops(lengths: list[tuple[Any, int]], seed: str = "") -> set[Any]:
    """The paper's ``drop_short``: with the lengths sorted, a response of rank r = 1 - i/N (i: the first
    position of its length; the shortest has r = 1) is kept when a uniform draw exceeds 2 r^3, so the
    shortest fifth always goes and longer ones ever less often (about 40 % in all). The draw is seeded
    by ``seed`` and each key, so the decision reproduces. Returns the keys to drop."""
    ordered = sorted(n for _, n in lengths)
    first: dict[int, int] = {}
    for i, n in enumerate(ordered):
        first.setdefault(n, i)
    total = len(ordered)
    return {key for key, n in lengths if random.Random(f"{seed}|{key}").random() <= 2 * (1 - first[n] / total) ** 3}


# -- LonGen's length score ---------------------------------------------------------------------
LENGTH_KINDS = ("about", "range", "above", "below")
_TARGET_RE = [
    ("range", re.compile(r"^(?:between\s+)?(\d+)\s*(?:-|–|—|to|and)\s*(\d+)(?:\s*words?)?$", re.IGNORECASE)),
    ("about", re.compile(r"^(?:about|around|approximately|roughly|~)\s*(\d+)(?:\s*words?)?$", re.IGNORECASE)),
    ("above", re.compile(r"^(?:above|over|more\s+than|at\s+least|>=?)\s*(\d+)(?:\s*words?)?$", re.IGNORECASE)),
    ("below", re.compile(r"^(?:below|under|less\s+than|at\s+most|fewer\s+than|<=?)\s*(\d+)(?:\s*words?)?$", re.IGNORECASE)),
    ("about", re.compile(r"^(\d+)(?:\s*words?)?$", re.IGNORECASE)),
]


def length_range(kind: str, x: float, y: float | None = None) -> tuple[float, float]:
    """LonGen's target range [a, b]: about x = [0.8x, 1.2x]; above x = [x, 1.5x]; below x = [0.5x, x];
    range x-y = [x, y]."""
    if x <= 0 or (y is not None and y <= 0):
        raise ValueError("a length target must be positive")
    if kind == "about":
        return 0.8 * x, 1.2 * x
    if kind == "above":
        return float(x), 1.5 * x
    if kind == "below":
        return 0.5 * x, float(x)
    if kind == "range":
        if y is None or y < x:
            raise ValueError("a range needs an upper bound at least its lower one")
        return float(x), float(y)
    raise ValueError(f"unknown length kind {kind!r}; one of {', '.join(LENGTH_KINDS)}")


def length_score(n_words: float, a: float, b: float) -> float:
    """LonGen's length score: 1 inside [a, b]; below, max(2n/a - 1, 0); above, max(3 - 2n/b, 0).

    It falls linearly to 0 at half the lower bound and at 1.5 times the upper one."""
    if not 0 < a <= b:
        raise ValueError("need 0 < a <= b")
    if n_words < a:
        return max(2 * n_words / a - 1, 0.0)
    if n_words > b:
        return max(3 - 2 * n_words / b, 0.0)
    return 1.0


def parse_length_target(text: str) -> dict[str, Any]:
    """``"about 300"``, ``"above 200"``, ``"below 400"``, ``"150-600"`` (a bare number is "about") ->
    ``{"target": text, "kind", "a", "b"}``; ValueError otherwise."""
    s = " ".join(str(text).split())
    for kind, pattern in _TARGET_RE:
        m = pattern.match(s)
        if m:
            nums = [int(g) for g in m.groups() if g is not None]
            a, b = length_range(kind, *nums)
            return {"target": s, "kind": kind, "a": a, "b": b}
    raise ValueError(f"'{text}' is not a length target (e.g. 'about 300', 'above 200', 'below 400', '150-600')")


class LengthTarget(click.ParamType):
    name = "TARGET"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        try:
            return parse_length_target(value)["target"]
        except (ValueError, TypeError) as e:
            self.fail(str(e), param, ctx)


def _valid_target(text: str) -> bool:
    try:
        parse_length_target(text)
    except ValueError:
        return False
    return True


def score_against(target: dict[str, Any], n_words: int) -> float:
    return round(length_score(n_words, target["a"], target["b"]), 4)


# -- stages ------------------------------------------------------------------------------------
#: The paper's decoding (``llm_client.py``): temperature 0.7, top-p 0.8, repetition penalty 1.1, and
#: stops at a horizontal rule or two blank lines (where a model starts talking about its answer).
#: Its top-k 20 is left out: not every backend takes it. ``--temperature``, ``--stop``... override.
SL_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.1, "stop": ["---", "\n\n\n"]}


#: A self-instructed request this close (ROUGE-L) to a seed or a sibling is written again: a seed with
#: a word changed is no new instruction (Self-Instruct's filter; the Self-Lengthen code has none).
NEAR_DUPLICATE = 0.7


def _seed(params: dict[str, Any], offset: int) -> int:
    return int(params.get("seed") or 0) + offset


class SelfInstructStage(JudgingStage):
    """Seed instruction -> ``--self-instruct`` new instructions a long answer suits (0: pass through)."""

    kind = "augment"
    templates = ("self_lengthen/self_instruct", "self_lengthen/judge")
    variables = ("examples", "instruction", "mode")

    def __init__(self, method: str, name: str, options: dict[str, Any]):
        super().__init__(method, name, options)
        self.count = int(options["self_instruct"])
        self.attempts = int(options["instruct_attempts"])

    async def _one(self, ctx, child: Record, seeds: list[str], taken: list[str], index: int) -> Record:
        examples = [{"instruction": s} for s in seeds]
        gen = self.sampling(**{**SL_SAMPLING, "stop": ["\nRequest ", "\n\n", "---"]}, max_tokens=256)  # one request, not a list
        judge = self.sampling(temperature=0.0, max_tokens=8)
        tried: list[str] = []
        for attempt in range(self.attempts):
            comp = await ctx.complete("self_lengthen/self_instruct", {"examples": examples},
                                      parse=lambda t: parse_instruction(t, "\n".join(seeds), max_words=499, min_words=4),
                                      retries=0, **{**gen, "seed": _seed(gen, 1000 * index + attempt)})
            if comp.parse_error is not None:
                tried.append(f"instruction_{comp.parse_error.reason}")
                continue
            new = comp.parsed
            if near_duplicate(new, taken, NEAR_DUPLICATE):
                tried.append("near_duplicate")
                continue
            verdict, details = await binary_verdict(ctx, "self_lengthen/judge", {"instruction": new}, "yes", "no", self.judge_mode, judge)
            if verdict is None:
                tried.append("unparseable_verdict")
                continue
            if not verdict:
                tried.append("unsuitable")
                continue
            child.fields["instruction"] = new
            child.meta["self_instruct"] = {"seeds": seeds, "attempts": attempt + 1, "judge": details}
            return child
        return child.drop(self.label, "no_instruction", attempts=tried)

    async def process(self, record: Record, ctx) -> list[Record]:
        if self.count == 0:
            return [record]
        seed = record.fields["instruction"]
        companion = record.fields.get("seed_companion")
        seeds = [seed] + ([companion] if companion else [])
        out: list[Record] = []
        taken = list(seeds)
        for i in range(1, self.count + 1):
            child = record.child(f"~i{i}", seed_instruction=seed)
            child.fields.pop("seed_companion", None)
            child = await self._one(ctx.for_record(child), child, seeds, taken, i)
            if child.alive:
                taken.append(child.fields["instruction"])
            out.append(child)
        return out


class GenerateStage(Stage):
    """The Generator: ``--samples`` initial responses, each re-sampled until it passes :func:`check_response`."""

    kind = "augment"
    templates = ("self_lengthen/generate",)
    variables = ("instruction",)

    def __init__(self, method: str, name: str, options: dict[str, Any]):
        super().__init__(method, name, options)
        self.samples = int(options["samples"])
        self.retries = int(options["generate_retries"])
        self.ngram = int(options["ngram"])
        self.meta_check = bool(options["meta_check"])

    async def _sample(self, ctx, rec: Record, params: dict[str, Any]) -> Record:
        comp = await ctx.complete("self_lengthen/generate", {"instruction": rec.fields["instruction"]},
                                  parse=lambda t: check_response(t, self.ngram, self.meta_check), retries=self.retries, **params)
        if comp.parse_error is not None:
            return rec.drop(self.label, comp.parse_error.reason, detail=comp.parse_error.detail, attempts=self.retries + 1)
        rec.fields.update(response=comp.parsed, initial_response=comp.parsed)
        return rec

    async def process(self, record: Record, ctx) -> list[Record]:
        params = self.sampling(**SL_SAMPLING, max_tokens=1024)
        if self.samples == 1:
            return [await self._sample(ctx, record, {**params, "seed": _seed(params, 0)})]
        recs = [record.child(f"~r{i + 1}") for i in range(self.samples)]
        # each sample with its own seed and lineage; a failed call costs that sample only
        done = await asyncio.gather(*(self._sample(ctx.for_record(r), r, {**params, "seed": _seed(params, i)}) for i, r in enumerate(recs)),
                                    return_exceptions=True)
        return [failed_record(r, self.label, d) if isinstance(d, Exception) else d for r, d in zip(recs, done)]


class ExtendStage(Stage):
    """The Extender: rounds of expand-the-first-half, keep two thirds, continue with the whole draft."""

    kind = "rewrite"
    templates = ("self_lengthen/extend", "self_lengthen/continue")
    variables = ("instruction", "response", "answer")

    def __init__(self, method: str, name: str, options: dict[str, Any]):
        super().__init__(method, name, options)
        self.rounds = int(options["rounds"])
        self.attempts = int(options["extend_attempts"])
        self.min_growth = float(options["min_growth"])
        self.drop_share = float(options["drop_lines"])
        self.ngram = int(options["ngram"])
        self.meta_check = bool(options["meta_check"])
        self.default_target = parse_length_target(options["length_target"])
        self.drop_short = bool(options["drop_short"])
        self.cuts_at_end = self.drop_short  # a later stage waits for the cut (see Stage.cuts_at_end)

    async def _extend(self, ctx, instruction: str, initial: str, attempt: int) -> tuple[str, int, list[dict[str, Any]]]:
        params = self.sampling(**SL_SAMPLING, max_tokens=1536)
        best, best_words = initial, count_words(initial)
        rounds: list[dict[str, Any]] = []
        for r in range(1, self.rounds + 1):
            seed = _seed(params, 1000 * attempt + 10 * r)
            entry: dict[str, Any] = {"attempt": attempt + 1, "round": r, "words_before": best_words}
            rounds.append(entry)
            half = first_half(best)
            expansion = await ctx.complete("self_lengthen/extend", {"instruction": instruction, "response": half},
                                           parse=parse_text, retries=0, accept_truncated=True, **{**params, "seed": seed})
            if expansion.parse_error is not None:
                entry.update(status=f"expand_{expansion.parse_error.reason}", words_after=best_words)
                continue
            prefix = keep_prefix(expansion.parsed)
            entry["prefix_words"] = count_words(prefix)
            cont = await ctx.complete("self_lengthen/continue", {"instruction": instruction, "response": best, "answer": prefix},
                                      parse=lambda t: checked(join_continuation(prefix, t), self.ngram, self.meta_check),
                                      retries=0, **{**params, "seed": seed + 1})
            if cont.parse_error is not None:
                entry.update(status=cont.parse_error.reason, words_after=best_words,
                             words_out=count_words(join_continuation(prefix, cont.text)))
                continue
            text, words = cont.parsed
            entry["words_out"] = words
            if words <= best_words:
                entry.update(status="not_longer", words_after=best_words)
                continue
            best, best_words = text, words
            entry.update(status="extended", words_after=words)
        return best, best_words, rounds

    async def process(self, record: Record, ctx) -> list[Record]:
        instruction, initial = record.fields["instruction"], record.fields["response"]
        try:
            target = parse_length_target(record.fields["length_target"]) if record.fields.get("length_target") else self.default_target
        except ValueError as e:
            return [record.drop(self.label, "bad_length_target", error=str(e))]
        initial_words = count_words(initial)
        rounds: list[dict[str, Any]] = []
        best, best_words = initial, initial_words
        for attempt in range(self.attempts):
            best, best_words, these = await self._extend(ctx, instruction, initial, attempt)
            rounds += these
            if accepted(initial_words, best_words, self.min_growth):
                break
        summary = {"initial_words": initial_words, "extended_words": best_words, "growth": round(best_words / max(initial_words, 1), 4),
                   "rounds": rounds, "length_target": target["target"],
                   "length_score_initial": score_against(target, initial_words), "length_score": score_against(target, best_words)}
        record.meta.update(summary)
        if not accepted(initial_words, best_words, self.min_growth):
            return [record.drop(self.label, "not_extended", initial_words=initial_words, extended_words=best_words,
                                min_growth=self.min_growth, statuses=[r["status"] for r in rounds])]
        # The two records share the unit's lineage steps and round entries (nothing changes them once
        # written), so neither is a deep copy (Record.child): the records are this method's hot path.
        shown, dropped = drop_lines(initial, self.drop_share, random.Random(f"{record.id}|{NAME}.drop_lines"))
        prompt = ctx.prompts.render("self_lengthen/extend", {"instruction": instruction, "response": shown})
        ext_fields = {**record.fields, "instruction": prompt.messages[-1]["content"], "response": best, "initial_response": initial,
                      "base_instruction": instruction}
        if prompt.messages[0]["role"] == "system":
            ext_fields["system"] = prompt.messages[0]["content"]
        ext = Record(id=f"{record.id}~ext", source_id=record.source_id, fields=ext_fields, lineage=list(record.lineage),
                     meta={**record.meta, "role": "extender", "dropped_lines": dropped, "extend_template_hash": prompt.template_hash})
        gen = Record(id=f"{record.id}~gen", source_id=record.source_id, lineage=list(record.lineage), meta={**record.meta, "role": "generator"},
                     fields={**record.fields, "response": best, "initial_response": initial, "base_instruction": instruction})
        return [gen, ext]


    def end_of_run(self, journal) -> dict[str, tuple[str, dict[str, Any]]]:
        """With ``--drop-short``, the paper's length-rank drop (:func:`short_drops`) over the run's accepted
        extensions, by extended words; both records of a dropped extension go (``short_by_rank``)."""
        if not self.drop_short:
            return {}
        groups: dict[tuple[Any, str], list[str]] = {}
        lengths: list[tuple[tuple[Any, str], int]] = []
        for line in journal():
            meta = line.get("meta") or {}
            if line.get("status") != "kept" or meta.get("role") not in ROLES or "extended_words" not in meta:
                continue
            group = (line.get("unit_seq"), line["id"].rsplit("~", 1)[0])
            groups.setdefault(group, []).append(journal_key(line))
            if meta["role"] == "generator":
                lengths.append((group, int(meta["extended_words"])))
        drop = short_drops(lengths, f"{NAME}.drop_short")
        words = dict(lengths)
        return {key: ("short_by_rank", {"extended_words": words[g], "extensions": len(lengths)}) for g in drop for key in groups[g]}


# -- the stats.json section ----------------------------------------------------------------------
def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def length_report(lines: Iterable[dict[str, Any]], label: str = f"{NAME}.extend") -> dict[str, Any]:
    """What ``stats.json`` reports for Self-Lengthen, from journal lines: per round (of every attempt),
    how many ran, were extended and why the rest were not, and mean words before/after; the kept
    extensions' initial and extended words and growth, and the LonGen length score of their initial
    and extended responses (the targets, and how many are inside them). A unit's two records (one per
    role) describe one extension, so the generator record stands for it (the extender record is
    only counted by role); an accepted extension dropped by ``--drop-short`` counts as accepted and
    under ``dropped_short``."""
    per_round: dict[int, dict[str, Any]] = {}
    kept_initial, kept_final, growth, score_i, score_f, inside_i, inside_f = [], [], [], [], [], 0, 0
    roles: dict[str, int] = {}
    extensions = dropped = short = 0
    targets: dict[str, int] = {}
    for line in lines:
        meta = line.get("meta") or {}
        if "rounds" not in meta or not isinstance(meta.get("rounds"), list) or line.get("dropped_at") not in (None, label):
            continue
        kept = line.get("status") == "kept"
        if kept:
            roles[meta.get("role", "?")] = roles.get(meta.get("role", "?"), 0) + 1
        if meta.get("role") == "extender":
            continue
        extensions += 1
        if not kept:
            if line.get("end_of_run"):
                short += 1
            else:
                dropped += 1
        for r in meta["rounds"]:
            st = per_round.setdefault(int(r.get("round", 0)), {"runs": 0, "extended": 0, "not_extended": {}, "_before": [], "_after": [], "_growth": []})
            st["runs"] += 1
            if r.get("status") == "extended":
                st["extended"] += 1
                st["_after"].append(r.get("words_after", 0))
                if r.get("words_before"):
                    st["_growth"].append(r.get("words_after", 0) / r["words_before"])
            else:
                st["not_extended"][r.get("status", "?")] = st["not_extended"].get(r.get("status", "?"), 0) + 1
            st["_before"].append(r.get("words_before", 0))
        if kept:
            kept_initial.append(meta.get("initial_words", 0))
            kept_final.append(meta.get("extended_words", 0))
            growth.append(meta.get("growth", 0))
        if kept and "length_score" in meta:
            score_i.append(meta.get("length_score_initial", 0))
            score_f.append(meta["length_score"])
            inside_i += meta.get("length_score_initial") == 1
            inside_f += meta["length_score"] == 1
            targets[meta.get("length_target", "?")] = targets.get(meta.get("length_target", "?"), 0) + 1
    rounds_out = {}
    for n in sorted(per_round):
        st = per_round[n]
        before, after, ratios = st.pop("_before"), st.pop("_after"), st.pop("_growth")
        rounds_out[str(n)] = {**st, "mean_words_before": _mean(before), "mean_words_after_extended": _mean(after),
                              "mean_growth_extended": _mean(ratios)}
    return {
        "extensions": extensions,
        "accepted": extensions - dropped,
        "not_accepted": dropped,
        "dropped_short": short,
        "records_by_role": roles,
        "rounds": rounds_out,
        "kept_mean_initial_words": _mean(kept_initial),
        "kept_mean_extended_words": _mean(kept_final),
        "kept_mean_growth": _mean(growth),
        "length_targets": targets,
        "mean_length_score_initial": _mean(score_i),
        "mean_length_score_extended": _mean(score_f),
        "inside_target_initial": inside_i,
        "inside_target_extended": inside_f,
    }


@hookimpl
def btkit_run_end(run, stats):
    """Add the ``self_lengthen`` section to ``stats.json`` (runs just before the engine writes it), from the
    journal, so a resumed run reports the whole run; only for a run with the extend stage."""
    labels = [getattr(s, "label", "") for s in getattr(run, "stages", [])]
    extend = f"{NAME}.extend"
    out = getattr(run, "out", None)
    if extend not in labels or out is None or not (Path(out) / "candidates.jsonl").is_file():
        return
    stats[NAME] = length_report(iter_jsonl(Path(out) / "candidates.jsonl"), extend)


# -- the method ----------------------------------------------------------------------------------
class SelfLengthen(Method):
    def required_fields(self, options: dict[str, Any]) -> dict[str, str]:
        return {options["instruction_field"]: "--instruction-field"}

    def prepare(self, rows: Iterable[dict[str, Any]], options: dict[str, Any]) -> Iterator[Record]:
        """Input rows -> one unit per instruction (ids from ``--id-field``, else the line number), with the
        row's ``length_target`` when it has one. Empty instructions, unreadable length targets and exact
        repeats (case and spacing ignored) are dropped with their reason.
        With ``--self-instruct N`` each unit also names a companion seed, another row chosen by its id."""
        field = options["instruction_field"]
        id_field = options.get("id_field") or "id"
        units = self._units(rows, field, id_field)
        if int(options.get("self_instruct") or 0) == 0:
            yield from units
            return
        units = list(units)  # seeds: a few rows; each needs another to pair with
        pool = [u.fields["instruction"] for u in units if u.alive]
        for u in units:
            if u.alive:
                others = [p for p in pool if p != u.fields["instruction"]]
                u.fields["seed_companion"] = random.Random(f"{u.id}|{NAME}.companion").choice(others) if others else None
            yield u

    def _units(self, rows: Iterable[dict[str, Any]], field: str, id_field: str) -> Iterator[Record]:
        seen: dict[str, str] = {}
        ids: set[str] = set()
        for n, row in enumerate(rows, start=1):
            rid = str(row.get(id_field) or f"line{n}")
            if rid in ids:
                rid = f"{rid}@line{n}"
            ids.add(rid)
            instruction = str(row[field]).strip()
            fields: dict[str, Any] = {"instruction": instruction}
            if isinstance(row.get("length_target"), str) and row["length_target"].strip():
                fields["length_target"] = row["length_target"].strip()
            rec = Record(id=rid, source_id=rid, fields=fields)
            key = " ".join(instruction.casefold().split())
            if not key:
                rec.drop(f"{NAME}.prepare", "empty_instruction")
            elif "length_target" in fields and not _valid_target(fields["length_target"]):
                rec.drop(f"{NAME}.prepare", "bad_length_target", length_target=fields["length_target"])
            elif key in seen:
                rec.drop(f"{NAME}.prepare", "duplicate", duplicate_of=seen[key])
            else:
                seen[key] = rid
            yield rec

    def to_output(self, record: Record) -> dict[str, Any]:
        out = super().to_output(record)
        f = record.fields
        out["meta"].update({k: f[k] for k in ("base_instruction", "initial_response", "seed_instruction") if k in f})
        return out


METHOD = SelfLengthen(
    stage_classes={"self_instruct": SelfInstructStage, "generate": GenerateStage, "extend": ExtendStage},
    name=NAME,
    description="Self-Lengthen: a Generator writes an initial response, an Extender grows it over rounds (expand the first half, "
                "keep two thirds, continue with the whole draft in view); writes generator and extender training pairs.",
    paper="Quan et al. 2024, Language Models can Self-Lengthen to Generate Long Texts, arXiv:2410.23933",
    stages=[
        StageInfo("self_instruct", "augment", ("instruction",), ("instruction",),
                  "with --self-instruct N: N new instructions from each seed (two seeds shown), 4-499 words, kept when the "
                  "suitability judge says a long answer suits them; 0: the input instructions as given, no call"),
        StageInfo("generate", "augment", ("instruction",), ("response", "initial_response"),
                  "the Generator's initial response, re-sampled until it ends in punctuation and repeats no 10-gram"),
        StageInfo("extend", "rewrite", ("instruction", "response"), ("instruction", "response", "initial_response", "base_instruction"),
                  "up to 3 rounds: expand the first half, keep 2/3, continue with the whole response; kept when > 1.2x the words; "
                  "a generator pair and an extender pair (meta.role)"),
    ],
    default_stages=("self_instruct", "generate", "extend"),
    unit_fields=("instruction",),
    prompts_dir=PROMPTS,
    cli_options=[
        click.Option(["--instruction-field"], default="instruction", show_default=True, help="Input field holding the instruction (or seed instruction)."),
        click.Option(["--self-instruct"], type=click.IntRange(0, 1000), default=0, show_default=True,
                     help="Write this many new instructions from each input instruction, used as a seed (0: use the input instructions as given)."),
        click.Option(["--instruct-attempts"], type=click.IntRange(1, 100), default=10, show_default=True,
                     help="Attempts per self-instructed instruction (write + judge) before it is dropped."),
        judge_mode_option(LABEL_JUDGE_MODES, "How the suitability judge of self-instructed instructions reads its verdict: rubric parses "
                          "a yes/no reply; logprob compares P(yes)/P(no) in one forward pass; auto: logprob when the backend can."),
        click.Option(["--samples"], type=click.IntRange(1, 16), default=1, show_default=True, help="Initial responses per instruction (the paper: 2)."),
        click.Option(["--generate-retries"], type=click.IntRange(0, 100), default=5, show_default=True,
                     help="Re-sample an initial response that fails the checks this many times (the paper: up to 20 attempts)."),
        click.Option(["--ngram"], type=click.IntRange(2, 100), default=DEFAULT_NGRAM, show_default=True,
                     help="Reject a response in which a run of this many tokens occurs twice."),
        click.Option(["--meta-check/--no-meta-check"], default=True, show_default=True,
                     help="Reject a response with revised/revision/response/version/paragraph in its first 2 or last 3 lines."),
        click.Option(["--rounds"], type=click.IntRange(1, 10), default=3, show_default=True, help="Extension rounds per attempt."),
        click.Option(["--extend-attempts"], type=click.IntRange(1, 20), default=2, show_default=True,
                     help="Whole extensions tried from the initial response, with new seeds, until one is accepted (the paper: up to 20)."),
        click.Option(["--min-growth"], type=FiniteFloatRange(1.0, 100.0), default=1.2, show_default=True,
                     help="Accept an extension with more than this many times the initial response's words."),
        click.Option(["--drop-lines"], type=SHARE, default=0.2, show_default=True,
                     help="Share of the initial response's lines dropped (at random, seeded) in the extender pair's prompt."),
        click.Option(["--drop-short/--no-drop-short"], default=False, show_default=True,
                     help="At the end of the run, drop accepted extensions by length rank as the paper does (the shortest fifth always, "
                          "about 40 % in all; seeded)."),
        click.Option(["--length-target"], type=LengthTarget(), default="150-600", show_default=True,
                     help="Word-count target the LonGen length score is reported against: 'about N', 'above N', 'below N' or 'A-B' "
                          "(a row's length_target field overrides it)."),
    ],
)


@hookimpl
def btkit_register_methods(register):
    register(METHOD)
