"""LINGUIST: annotated utterances for intent classification and slot tagging (Rosenbaum et al. 2022, arXiv 2209.09900).

Input is an *intent spec*, one intent per JSONL line (``btkit linguist-spec intents.yaml`` checks a
YAML spec and writes that JSONL)::

    {"intent": "play_song", "language": "en", "description": "start playing music",
     "slots": ["song", "artist"],                      # or {"song": "a song title", ...}
     "examples": ["play [song: blue in green] by [artist: miles davis]", ...],
     "values": {"artist": ["nina simone", "fela kuti"]}}    # optional catalogue, per slot

Examples mark slots as ``[slot_name: value]``. ``prepare`` makes ``--requests`` work units per
intent; each (seeded by ``--draw-seed``, intent and request number, so a run is reproducible and
resumable) shows ``--shots`` of the examples and *includes* 1..``--max-include`` of the slots: a
catalogue value the utterance must contain, or the wildcard ``*`` (the model invents a value; always
for a slot without a catalogue, else with probability ``--wildcard-share``).

The prompt (``prompts/linguist/generate.j2``) numbers the intent's slots and shows the examples in
LINGUIST's numbered-bracket form, ``play [1 blue in green ] by [2 miles davis ]``; the model writes
``--per-request`` utterances in the same form, one per line. Each line becomes a record, kept or
dropped with its reason:

- structure (the line does not parse): ``unbalanced_brackets``, ``bad_slot_marker`` (a bracket that
  is not ``[N value ]``), ``empty_value``, ``no_text``, ``not_an_utterance`` (a heading such as
  "Here are five utterances:", a line with one of the prompt's ``<tags>``, a line with no letter
  or digit),
  ``truncated_line`` (the line the ``max_tokens`` cut ended in);
- labels (parsed, but not what was asked): ``unknown_slot`` (a number the prompt did not list),
  ``placeholder_value`` (``*``, the slot's own name or ``<...>`` left as the value),
  ``unrequested_slot`` and ``missing_slot`` (``--slot-check exact``: exactly the included slots;
  ``known``: any numbered slot, at least one when the prompt included one),
  ``missing_value`` (a catalogue value not used as written, case and spaces aside);
- ``copied_example`` (an example of the spec) and ``duplicate`` (the same text, case, spaces and
  final punctuation aside, earlier in the unit or, decided once every unit is done, in the run).

A kept record is ``text``, ``intent``, ``language``, ``spans`` (``start``/``end`` character offsets
into ``text``, ``slot``, ``value``), ``tokens`` with one BIO tag each in ``tags`` (``B-slot``,
``I-slot``, ``O``), and ``annotated`` (the spec's ``[slot: value]`` form, usable as a new example).
Tokens are the text's maximal runs of non-space characters, cut also where a span starts or ends
(``[1 adele ]'s`` gives ``adele`` and ``'s``), so every span is a whole number of tokens.

Per intent (requests, failed requests, generated lines, parsed, label-valid, kept, the label-valid
share and drops by reason) goes to ``stats.json`` under ``linguist``.
"""

from __future__ import annotations

import bisect
import copy
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import click

from btkit.errors import BtkitError, InputError
from btkit.hookspecs import hookimpl
from btkit.methods import Method, ParseError, Stage, StageInfo
from btkit.options import SHARE, SHOTS
from btkit.records import Record, journal_key

from ._prompts import PROMPTS

LABEL = "linguist.generate"
SLOT_NAME_RE = re.compile(r"[^\W\d][\w.\-]*")
#: Line reasons by what failed: the structure (the line is not parsed) or the labels (parsed, not what was asked).
STRUCTURE_REASONS = frozenset({"unbalanced_brackets", "bad_slot_marker", "empty_value", "no_text", "not_an_utterance", "truncated_line"})
LABEL_REASONS = frozenset({"unknown_slot", "placeholder_value", "unrequested_slot", "missing_slot", "missing_value"})
LANGUAGES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "pt": "Portuguese", "nl": "Dutch",
             "pl": "Polish", "sv": "Swedish", "tr": "Turkish", "ru": "Russian", "ja": "Japanese", "zh": "Chinese", "ko": "Korean",
             "hi": "Hindi", "ar": "Arabic"}


class Span(NamedTuple):
    """A slot value in an utterance: ``text[start:end] == value``."""

    start: int
    end: int
    slot: str
    value: str


# -- the two markings: spec ``[slot: value]`` and prompt ``[N value ]`` ----------------------------------
_NUMBERED = re.compile(r"\s*(\d{1,4})(?:\s+(.*?))?\s*", re.DOTALL)
_NAMED = re.compile(r"\s*([^\s:\[\]]+)\s*:(.*)", re.DOTALL)
_SPACES = re.compile(r"\s+")


def _scan(line: str, slot_of: Callable[[str], tuple[str, str]]) -> tuple[str, list[Span]]:
    """Text and spans of a marked line; ``slot_of(inside)`` reads one bracket's inside as (slot, value)."""
    pieces: list[tuple[str, str | None]] = []
    pos = 0
    while True:
        opening, closing = line.find("[", pos), line.find("]", pos)
        if opening < 0 or 0 <= closing < opening:
            if closing >= 0:
                raise ParseError("unbalanced_brackets", f"']' without '[' at character {closing + 1}")
            pieces.append((line[pos:], None))
            break
        if closing < 0:
            raise ParseError("unbalanced_brackets", f"'[' at character {opening + 1} is never closed")
        nested = line.find("[", opening + 1, closing)
        if nested >= 0:
            raise ParseError("unbalanced_brackets", f"'[' at character {nested + 1} inside another bracket")
        slot, value = slot_of(line[opening + 1:closing])
        value = " ".join(value.split())
        if not value:
            raise ParseError("empty_value", f"no value in {line[opening:closing + 1]!r}")
        pieces.append((line[pos:opening], None))
        pieces.append((value, slot))
        pos = closing + 1
    text_parts, spans, at = [], [], 0
    last = len(pieces) - 1
    for i, (piece, slot) in enumerate(pieces):
        if slot is None:
            piece = _SPACES.sub(" ", piece)
            if i == 0:
                piece = piece.lstrip()
            if i == last:
                piece = piece.rstrip()
        else:
            spans.append(Span(at, at + len(piece), slot, piece))
        text_parts.append(piece)
        at += len(piece)
    text = "".join(text_parts)
    if not text.strip():
        raise ParseError("no_text")
    return text, spans


def parse_numbered(line: str, numbering: dict[int, str]) -> tuple[str, list[Span]]:
    """``play [1 despacito ] by [2 luis fonsi ]`` -> (text, spans), slot numbers named by ``numbering``."""
    def slot_of(inside: str) -> tuple[str, str]:
        m = _NUMBERED.fullmatch(inside)
        if not m:
            raise ParseError("bad_slot_marker", f"[{inside}] is not [number value ]")
        number, value = int(m.group(1)), m.group(2) or ""
        if not value.strip():
            raise ParseError("empty_value", f"no value in [{inside}]")
        if number not in numbering:
            raise ParseError("unknown_slot", f"slot {number} is not one of {sorted(numbering)}")
        return numbering[number], value
    return _scan(line, slot_of)


def parse_named(line: str, slots: Iterable[str]) -> tuple[str, list[Span]]:
    """The spec's ``play [song: despacito] by [artist: luis fonsi]`` -> (text, spans); unknown names are errors."""
    known = set(slots)

    def slot_of(inside: str) -> tuple[str, str]:
        m = _NAMED.fullmatch(inside)
        if not m:
            raise ParseError("bad_slot_marker", f"[{inside}] is not [slot: value]")
        if m.group(1) not in known:
            raise ParseError("unknown_slot", f"'{m.group(1)}' is not a slot of this intent ({', '.join(sorted(known)) or 'none'})")
        return m.group(1), m.group(2)
    return _scan(line, slot_of)


def _render(text: str, spans: list[Span], mark: Callable[[Span], str]) -> str:
    out, pos = [], 0
    for s in spans:
        out.append(text[pos:s.start])
        out.append(mark(s))
        pos = s.end
    out.append(text[pos:])
    return "".join(out)


def render_numbered(text: str, spans: list[Span], numbers: dict[str, int]) -> str:
    """The inverse of :func:`parse_numbered`: ``[N value ]`` for each span."""
    return _render(text, spans, lambda s: f"[{numbers[s.slot]} {s.value} ]")


def render_named(text: str, spans: list[Span]) -> str:
    """The inverse of :func:`parse_named`: ``[slot: value]`` for each span."""
    return _render(text, spans, lambda s: f"[{s.slot}: {s.value}]")


# -- tokens and BIO tags ----------------------------------------------------------------------------------
_TOKEN = re.compile(r"\S+")


def token_offsets(text: str, spans: list[Span]) -> list[tuple[int, int]]:
    """Tokens as (start, end): runs of non-space characters, cut also at every span boundary."""
    cuts = sorted({s.start for s in spans} | {s.end for s in spans})
    out = []
    for m in _TOKEN.finditer(text):
        a, b = m.span()
        i = bisect.bisect_right(cuts, a)
        while i < len(cuts) and cuts[i] < b:
            out.append((a, cuts[i]))
            a = cuts[i]
            i += 1
        out.append((a, b))
    return out


def bio_tags(text: str, spans: list[Span]) -> tuple[list[str], list[str]]:
    """(tokens, tags): ``B-slot`` on a span's first token, ``I-slot`` on the rest, ``O`` elsewhere."""
    offsets = token_offsets(text, spans)
    tags = ["O"] * len(offsets)
    starts = [a for a, _ in offsets]
    for s in spans:
        i = bisect.bisect_left(starts, s.start)
        tags[i] = f"B-{s.slot}"
        i += 1
        while i < len(offsets) and offsets[i][1] <= s.end:
            tags[i] = f"I-{s.slot}"
            i += 1
    return [text[a:b] for a, b in offsets], tags


def spans_from_bio(text: str, offsets: list[tuple[int, int]], tags: list[str]) -> list[Span]:
    """The spans a BIO tagging marks (an ``I-`` that continues no span of its slot starts one)."""
    spans: list[Span] = []
    current: list[Any] | None = None
    for (a, b), tag in zip(offsets, tags):
        kind, _, slot = tag.partition("-")
        if kind == "I" and current is not None and current[2] == slot:
            current[1] = b
            continue
        if current is not None:
            spans.append(Span(current[0], current[1], current[2], text[current[0]:current[1]]))
            current = None
        if kind in ("B", "I"):
            current = [a, b, slot]
    if current is not None:
        spans.append(Span(current[0], current[1], current[2], text[current[0]:current[1]]))
    return spans


# -- checking one generated line ---------------------------------------------------------------------------
_LIST_MARK = re.compile(r"^\s*(?:[-*•–]\s+|>\s*|\(?\d{1,3}[.)]\s+)")
_WORDY = re.compile(r"[^\W_]")
_PROMPT_TAG = re.compile(r"</?(?:language|intent|description|slots|include|examples)>", re.IGNORECASE)
_QUOTES = {'"': '"', "“": "”", "'": "'"}
_FINAL = re.compile(r"[\s.!?。！？]+$")


def dedup_key(text: str) -> str:
    """Texts equal but for case, spaces and final punctuation share a key."""
    return "".join(_FINAL.sub("", text).casefold().split())


def norm_value(value: str) -> str:
    return " ".join(value.casefold().split())


def clean_line(line: str) -> str:
    """A reply line without its list marker ("- ", "3. ") and surrounding quotes."""
    line = _LIST_MARK.sub("", line, count=1).strip()
    if len(line) >= 2 and _QUOTES.get(line[0]) == line[-1]:
        line = line[1:-1].strip()
    return line


def split_lines(reply: str | None) -> list[str]:
    """The reply's non-blank lines (the parse of the whole reply): an empty reply is a ParseError."""
    lines = [clean_line(l) for l in (reply or "").splitlines()]
    lines = [l for l in lines if l]
    if not lines:
        raise ParseError("empty_reply")
    return lines


class Request(NamedTuple):
    """What one unit asked for, read from its fields."""

    numbering: dict[int, str]
    include: list[dict[str, Any]]
    exact: bool
    example_keys: frozenset


def request_of(fields: dict[str, Any], exact: bool) -> Request:
    keys = set()
    for ex in fields["examples"]:
        keys.add(dedup_key(parse_named(ex, fields["slots"])[0]))
    return Request({i + 1: s for i, s in enumerate(fields["slots"])}, fields["include"], exact, frozenset(keys))


def _is_placeholder(value: str, slot: str) -> bool:
    v = value.strip()
    return v in ("*", "...", "…") or v.casefold() in (slot.casefold(), slot.replace("_", " ").casefold()) or (v[:1] in "<{" and v[-1:] in ">}")


def check_line(line: str, request: Request) -> tuple[str, list[Span]]:
    """(text, spans) of a line that gives what ``request`` asked, else a ParseError naming why not."""
    if not _WORDY.search(line) or _PROMPT_TAG.search(line) or ("[" not in line and (line.endswith(":") or line.startswith("<"))):
        raise ParseError("not_an_utterance", line[:80])
    text, spans = parse_numbered(line, request.numbering)
    for s in spans:
        if _is_placeholder(s.value, s.slot):
            raise ParseError("placeholder_value", f"{s.slot}: {s.value!r}")
    if not request.exact:
        if request.include and not spans:
            raise ParseError("missing_slot", "no slot at all")
    else:
        wanted = {inc["slot"] for inc in request.include}
        for s in spans:
            if s.slot not in wanted:
                raise ParseError("unrequested_slot", s.slot)
        for inc in request.include:
            values = {norm_value(s.value) for s in spans if s.slot == inc["slot"]}
            if not values:
                raise ParseError("missing_slot", inc["slot"])
            if inc["value"] is not None and norm_value(inc["value"]) not in values:
                raise ParseError("missing_value", f"{inc['slot']}: {inc['value']!r}")
    return text, spans


# -- the spec ----------------------------------------------------------------------------------------------
class SpecError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _strings(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise SpecError(field, "expected a non-empty list of strings")
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v.strip():
            raise SpecError(f"{field}[{i}]", f"expected a non-empty string, got {v!r}")
    return [" ".join(v.split()) for v in value]


def check_intent(obj: Any, default_language: str = "en") -> dict[str, Any]:
    """One intent of a spec, checked and normalised; raises :class:`SpecError` naming the field."""
    if not isinstance(obj, dict):
        raise SpecError("", f"expected a mapping of intent fields, got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"intent", "slots", "examples", "values", "language", "description"})
    if unknown:
        raise SpecError(unknown[0], "unknown field; an intent has intent, slots, examples, values, language, description")
    name = obj.get("intent")
    if not isinstance(name, str) or not name.strip() or "\n" in name:
        raise SpecError("intent", f"expected the intent's name (one line of text), got {name!r}")
    raw_slots = obj.get("slots") or []
    if isinstance(raw_slots, dict):
        slots, about = list(raw_slots), {k: " ".join(str(v or "").split()) for k, v in raw_slots.items()}
    elif isinstance(raw_slots, list):
        slots, about = list(raw_slots), {}
    else:
        raise SpecError("slots", "expected a list of slot names or a mapping of slot name to description")
    for i, s in enumerate(slots):
        if not isinstance(s, str) or not SLOT_NAME_RE.fullmatch(s):
            raise SpecError(f"slots[{i}]", f"{s!r} is not a slot name (a letter, then letters, digits, '_', '.', '-')")
    if len(set(slots)) != len(slots):
        raise SpecError("slots", "a slot is named twice")
    examples = _strings(obj.get("examples"), "examples")
    for i, ex in enumerate(examples):
        try:
            parse_named(ex, slots)
        except ParseError as e:
            raise SpecError(f"examples[{i}]", f"{e.reason}: {e.detail} (mark slots as [slot: value])") from None
    values = obj.get("values") or {}
    if not isinstance(values, dict):
        raise SpecError("values", "expected a mapping of slot name to a list of values")
    catalogue = {}
    for slot, vals in values.items():
        if slot not in slots:
            raise SpecError(f"values.{slot}", f"not a slot of this intent ({', '.join(slots) or 'none'})")
        catalogue[slot] = _strings(vals, f"values.{slot}")
        for i, v in enumerate(catalogue[slot]):
            if "[" in v or "]" in v:
                raise SpecError(f"values.{slot}[{i}]", "a value may not hold '[' or ']'")
    language = obj.get("language", default_language)
    if not isinstance(language, str) or not language.strip():
        raise SpecError("language", f"expected a language code such as 'en', got {language!r}")
    description = obj.get("description") or ""
    if not isinstance(description, str):
        raise SpecError("description", "expected text")
    return {"intent": name.strip(), "language": language.strip(), "description": " ".join(description.split()),
            "slots": slots, "slot_descriptions": about, "examples": examples, "values": catalogue}


def read_spec(path: str | Path, default_language: str = "en") -> list[dict[str, Any]]:
    """A YAML (a list of intents, or ``intents:`` with optional ``language:`` and shared ``values:``) or
    JSONL spec, checked; errors are :class:`btkit.errors.InputError` naming file, line and field."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "file not found")
    text = path.read_text(encoding="utf-8")
    items: list[tuple[int | None, Any]] = []
    shared_values: dict[str, Any] = {}
    if path.suffix in (".jsonl", ".json"):
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((n, json.loads(line)))
                except ValueError as e:
                    raise InputError(str(path), f"not valid JSON ({e})", n) from None
    else:
        try:
            data, root = yaml.safe_load(text), yaml.compose(text)
        except yaml.YAMLError as e:
            raise InputError(str(path), f"not valid YAML ({e})".replace("\n", " ")) from None
        seq = root
        if isinstance(data, dict):
            default_language = data.get("language", default_language)
            shared_values = data.get("values") or {}
            if not isinstance(shared_values, dict):
                raise InputError(str(path), "expected a mapping of slot name to a list of values", None, "values")
            seq = next((v for k, v in root.value if k.value == "intents"), None)
            data = data.get("intents")
        if not isinstance(data, list) or not data:
            raise InputError(str(path), "expected a list of intents (or a mapping with 'intents:')", None, "intents")
        items = [(node.start_mark.line + 1, obj) for node, obj in zip(seq.value, data)]
    out, seen = [], {}
    for n, obj in items:
        if isinstance(obj, dict) and shared_values:
            own = obj.get("values") or {}
            slots = obj.get("slots") or []
            obj = {**obj, "values": {**{k: v for k, v in shared_values.items() if k in slots}, **(own if isinstance(own, dict) else {})}}
            if not obj["values"]:
                del obj["values"]
        try:
            intent = check_intent(obj, default_language)
        except SpecError as e:
            raise InputError(str(path), str(e), n, e.field or None) from None
        if intent["intent"] in seen:
            raise InputError(str(path), f"intent '{intent['intent']}' is already defined on line {seen[intent['intent']]}", n, "intent")
        seen[intent["intent"]] = n
        out.append(intent)
    return out


def spec_line(intent: dict[str, Any]) -> dict[str, Any]:
    """A checked intent as a JSONL spec line (what :func:`check_intent` reads back to the same intent)."""
    about = intent.get("slot_descriptions") or {}
    line = {"intent": intent["intent"], "language": intent["language"]}
    if intent.get("description"):
        line["description"] = intent["description"]
    line["slots"] = {s: about.get(s, "") for s in intent["slots"]} if any(about.values()) else list(intent["slots"])
    line["examples"] = intent["examples"]
    if intent.get("values"):
        line["values"] = intent["values"]
    return line


def draw_request(intent: dict[str, Any], index: int, options: dict[str, Any]) -> dict[str, Any]:
    """Unit ``index`` of an intent: the examples it shows and the slots it includes, drawn reproducibly."""
    rng = random.Random(f"{options['draw_seed']}:{intent['intent']}:{index}")
    examples = intent["examples"]
    shown = rng.sample(range(len(examples)), min(int(options["shots"]), len(examples)))
    slots = intent["slots"]
    k = min(int(options["max_include"]), len(slots))
    chosen = sorted(rng.sample(range(len(slots)), rng.randint(1, k))) if k else []
    include = []
    for i in chosen:
        values = intent["values"].get(slots[i])
        wildcard = not values or rng.random() < float(options["wildcard_share"])
        include.append({"slot": slots[i], "value": None if wildcard else rng.choice(values)})
    return {**intent, "shown": shown, "include": include, "n": int(options["per_request"])}


# -- the stage ---------------------------------------------------------------------------------------------
class GenerateStage(Stage):
    """One prompt per unit; each line of the reply becomes a record, kept or dropped with its reason."""

    kind = "augment"
    templates = ("linguist/generate",)
    variables = ("intent", "description", "language", "slots", "utterances", "include", "n", "exact")
    cuts_at_end = True  # duplicates across units are dropped once the whole run is in view

    def __init__(self, method: str, name: str, options: dict[str, Any]):
        super().__init__(method, name, options)
        self.exact = options["slot_check"] == "exact"

    def variables_for(self, f: dict[str, Any]) -> dict[str, Any]:
        numbers = {s: i + 1 for i, s in enumerate(f["slots"])}
        shown = [render_numbered(*parse_named(f["examples"][i], f["slots"]), numbers) for i in f["shown"]]
        about = f.get("slot_descriptions") or {}
        return {"intent": f["intent"], "description": f.get("description", ""), "language": LANGUAGES.get(f["language"], f["language"]),
                "slots": [{"number": numbers[s], "name": s, "description": about.get(s, "")} for s in f["slots"]],
                "utterances": shown, "include": [{"number": numbers[i["slot"]], "name": i["slot"], "value": i["value"]} for i in f["include"]],
                "n": f["n"], "exact": self.exact}

    async def process(self, record: Record, ctx) -> list[Record]:
        f = record.fields
        comp = await ctx.complete("linguist/generate", self.variables_for(f), parse=split_lines, accept_truncated=True,
                                  **self.sampling(temperature=0.8, top_p=0.95, max_tokens=32 * int(f["n"]) + 32))
        if comp.parse_error is not None:
            return [record.drop(self.label, comp.parse_error.reason, detail=comp.parse_error.detail)]
        return self.records_from_lines(record, comp.parsed, comp.finish_reason == "length")

    def records_from_lines(self, record: Record, lines: list[str], truncated: bool) -> list[Record]:
        """One record per reply line (the last one dropped when the reply was cut at ``max_tokens``)."""
        f = record.fields
        request = request_of(f, self.exact)
        seen: dict[str, str] = {}
        out = []
        for j, line in enumerate(lines):
            kid = Record(id=f"{record.id}~{j}", source_id=record.source_id, lineage=copy.deepcopy(record.lineage),
                         fields={"intent": f["intent"], "language": f["language"], "annotated": line},
                         meta={"include": f["include"], "line": j})
            out.append(kid)
            if truncated and j == len(lines) - 1:
                kid.drop(self.label, "truncated_line")
                continue
            try:
                text, spans = check_line(line, request)
            except ParseError as e:
                kid.drop(self.label, e.reason, detail=e.detail)
                continue
            tokens, tags = bio_tags(text, spans)
            kid.fields.update(text=text, spans=[s._asdict() for s in spans], tokens=tokens, tags=tags,
                              annotated=render_named(text, spans))
            key = dedup_key(text)
            if key in request.example_keys:
                kid.drop(self.label, "copied_example")
            elif key in seen:
                kid.drop(self.label, "duplicate", first=seen[key])
            else:
                seen[key] = kid.id
        return out

    def end_of_run(self, journal: Callable[[], Iterator[dict[str, Any]]]) -> dict[str, tuple[str, dict[str, Any]]]:
        """Drop a kept utterance whose text an earlier unit of the run already gave (journal order)."""
        first: dict[str, str] = {}
        drops = {}
        for line in journal():
            fields = line.get("fields") or {}
            if line.get("status") != "kept" or "spans" not in fields or "intent" not in fields:
                continue
            key = dedup_key(fields.get("text", ""))
            if key in first:
                drops[journal_key(line)] = ("duplicate", {"first": first[key]})
            else:
                first[key] = line["id"]
        return drops


# -- the per-intent report -------------------------------------------------------------------------------
def intent_report(journal_lines: Iterable[dict[str, Any]], label: str = LABEL) -> dict[str, Any]:
    """Per intent: requests, failed requests, generated lines, parsed, label-valid, kept, shares, drops by reason."""
    per: dict[str, dict[str, Any]] = {}
    units: dict[str, set] = {}
    for line in journal_lines:
        fields = line.get("fields") or {}
        intent = fields.get("intent")
        if intent is None or (line.get("status") == "dropped" and line.get("dropped_at") not in (label, None) and "annotated" not in fields):
            continue
        r = per.setdefault(intent, {"requests": 0, "failed_requests": 0, "generated": 0, "parsed": 0, "label_valid": 0, "kept": 0,
                                    "dropped": Counter()})
        units.setdefault(intent, set()).add(line.get("unit"))
        reason = line.get("reason")
        if "annotated" not in fields:  # the unit itself: its call failed or its reply was empty
            r["failed_requests"] += 1
            r["dropped"][reason] += 1
            continue
        r["generated"] += 1
        if reason in STRUCTURE_REASONS and line.get("dropped_at") == label:
            r["dropped"][reason] += 1
            continue
        r["parsed"] += 1
        if reason in LABEL_REASONS and line.get("dropped_at") == label:
            r["dropped"][reason] += 1
            continue
        r["label_valid"] += 1
        if line.get("status") == "kept":
            r["kept"] += 1
        else:
            r["dropped"][reason] += 1
    for intent, r in per.items():
        r["requests"] = len(units[intent])
        r["parse_rate"] = round(r["parsed"] / r["generated"], 4) if r["generated"] else None
        r["label_valid_share"] = round(r["label_valid"] / r["parsed"], 4) if r["parsed"] else None
        r["dropped"] = dict(sorted(r["dropped"].items()))
    return dict(sorted(per.items()))


class Linguist(Method):
    def required_fields(self, options: dict[str, Any]) -> dict[str, str]:
        return {}  # an intent line is checked by check_intent, field by field

    def prepare(self, rows: Iterable[dict[str, Any]], options: dict[str, Any]) -> Iterator[Record]:
        names: dict[str, int] = {}
        for n, row in enumerate(rows, 1):
            try:
                intent = check_intent(row, str(options["language"]))
            except SpecError as e:
                name = row.get("intent") if isinstance(row, dict) else None
                which = f" (intent '{name}')" if isinstance(name, str) else ""
                field = f" field '{e.field}':" if e.field else ""
                raise BtkitError(f"intent spec, record {n}{which}:{field} {e}") from None
            if intent["intent"] in names:
                raise BtkitError(f"intent spec, record {n}: field 'intent': '{intent['intent']}' is already defined by record {names[intent['intent']]}")
            names[intent["intent"]] = n
            for i in range(int(options["requests"])):
                yield Record(id=f"{intent['intent']}#{i}", source_id=intent["intent"], fields=draw_request(intent, i, options))

    def to_output(self, record: Record) -> dict[str, Any]:
        f = record.fields
        return {"text": f["text"], "intent": f["intent"], "language": f["language"], "spans": f["spans"], "tokens": f["tokens"],
                "tags": f["tags"], "annotated": f["annotated"],
                "meta": {"id": record.id, "source_id": record.source_id, "method": self.name,
                         **{k: v for k, v in record.meta.items() if k != "drop_details"}, "lineage": record.lineage}}


METHOD = Linguist(
    stage_classes={"generate": GenerateStage},
    name="linguist",
    description="LINGUIST: utterances annotated with intent and slots from an intent spec (numbered-bracket prompt, "
                "wildcard and catalogue values), parsed into spans and BIO tags, label-checked and de-duplicated.",
    paper="Rosenbaum et al. 2022, LINGUIST: Language Model Instruction Tuning to Generate Annotated Utterances for Intent "
          "Classification and Slot Tagging, arXiv:2209.09900",
    stages=[StageInfo("generate", "augment", ("intent", "language", "slots", "examples", "shown", "include", "n"),
                      ("text", "spans", "tokens", "tags", "annotated"),
                      "write utterances with slots as [N value ]; parse, check labels, drop copies and duplicates (per intent report in stats.json)")],
    default_stages=("generate",),
    prompts_dir=PROMPTS,
    unit_fields=("intent", "language", "description", "slots", "slot_descriptions", "examples", "values", "shown", "include", "n"),
    cli_options=[
        click.Option(["--requests"], type=click.IntRange(1), default=4, show_default=True, help="Prompts per intent (work units)."),
        click.Option(["--per-request"], type=click.IntRange(1, 50), default=5, show_default=True, help="Utterances asked for in each prompt."),
        click.Option(["--shots"], type=SHOTS, default=5, show_default=True, help="Spec examples shown in each prompt (0: none)."),
        click.Option(["--max-include"], type=click.IntRange(0), default=2, show_default=True,
                     help="Each prompt includes 1..N of the intent's slots (0: utterances without slots)."),
        click.Option(["--wildcard-share"], type=SHARE, default=0.5, show_default=True,
                     help="For an included slot with catalogue values: the chance it is a wildcard (* : the model invents a value) "
                          "instead of a catalogue value the utterance must contain. Slots without values are always wildcards."),
        click.Option(["--slot-check"], type=click.Choice(["exact", "known"]), default="exact", show_default=True,
                     help="exact: an utterance has exactly the included slots, with the catalogue values asked for; "
                          "known: any slot the prompt numbers, included or not, but at least one when a slot was included."),
        click.Option(["--language"], default="en", show_default=True, help="Language code of intents whose spec names none."),
        click.Option(["--draw-seed"], type=int, default=0, show_default=True, help="Seed of the examples and slots each prompt shows."),
    ],
)


@hookimpl
def btkit_register_methods(register):
    register(METHOD)


@hookimpl
def btkit_run_end(run, stats):
    """Add the per-intent report to ``stats`` as ``linguist`` (the engine writes ``stats.json`` after this hook)."""
    labels = [s.label for s in run.stages if s.method == "linguist" and s.name == "generate"]
    if not labels:
        return
    out = Path(run.config.out_dir)

    def lines() -> Iterator[dict[str, Any]]:
        with open(out / "candidates.jsonl", encoding="utf-8") as fh:
            for raw in fh:
                if raw.strip():
                    yield json.loads(raw)

    per_intent = intent_report(lines(), labels[0])
    totals = Counter()
    for r in per_intent.values():
        totals.update({k: r[k] for k in ("requests", "failed_requests", "generated", "parsed", "label_valid", "kept")})
    stats["linguist"] = {"intents": per_intent, "totals": {
        **totals, "label_valid_share": round(totals["label_valid"] / totals["parsed"], 4) if totals["parsed"] else None}}


@click.command("linguist-spec")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="JSONL to write (default: stdout).")
@click.option("--language", default="en", show_default=True, help="Language of intents that name none.")
def linguist_spec(spec: Path, out: Path | None, language: str) -> None:
    """Check a LINGUIST intent spec (YAML or JSONL) and write it as the JSONL `btkit run linguist` reads."""
    intents = read_spec(spec, language)
    text = "".join(json.dumps(spec_line(i), ensure_ascii=False) + "\n" for i in intents)
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
        click.echo(f"{len(intents)} intents, {sum(len(i['examples']) for i in intents)} examples -> {out}", err=True)


@hookimpl
def btkit_register_commands(cli):
    cli.add_command(linguist_spec)
