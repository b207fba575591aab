"""CRAB: constraint back-translation (Qi et al. 2024, arXiv 2410.24175; code THU-KEG/Crab).

Input is existing (instruction, response) pairs: any JSONL whose field names are given with
``--instruction-field``/``--response-field``, btkit's own ``data.jsonl`` included. No new response
is written: constraints that the response *already satisfies* are added to the instruction.

- ``constrain``: rule-based constraints computed from the response by code (:mod:`.rules`: word
  count, forbidden punctuation, keywords, sentences per paragraph, words per sentence, characters
  per word), plus LLM-written constraints by the paper's ten types, returned as one JSON object;
  near-duplicates (ROUGE-L > 0.6, :mod:`.text`) are removed.
- ``verify``: rule constraints are re-checked by code on the current response; each LLM constraint
  is checked by the model (satisfied and valid? yes/no). Failures are removed and listed.
- ``compose``: a *forward* example (instruction + 6-8 constraints -> the response) and a *reverse*
  example (instruction + response -> 3-6 constraints), the paper's counts, rendered through the
  ``crab/forward`` and ``crab/reverse`` templates so their wording is the user's to change.
"""

from __future__ import annotations

import asyncio
import random
import re
from typing import Any, Iterable, Iterator

import click

from btkit.backends import JSON_SCHEMA
from btkit.dedup import SeenSet
from btkit.hookspecs import hookimpl
from btkit.methods import Method, ParseError, Stage, StageInfo
from btkit.options import SHARE
from btkit.parsing import extract_json
from btkit.records import Record

from .._prompts import PROMPTS
from . import rules
from btkit.kit.text import near_duplicate
from btkit.kit.judges import LABEL_JUDGE_MODES, JudgingStage, deprecated_alias, judge_mode_option
from btkit.kit.verdict import binary_verdict

#: The paper's ten LLM-written constraint types (four global, six local), with what each asks for.
LLM_TYPES: dict[str, str] = {
    "writing_style": "the tone, formality, sentiment or register of the answer",
    "semantic_elements": "the main theme, focus or key points the answer must convey",
    "morphological": "words, phrases or formatting the answer must avoid",
    "multilingual": "the language or languages the answer is written in",
    "hierarchical_instructions": "the order or priority in which the answer handles its parts",
    "special_output_format": "a format the answer follows, such as code, a table, JSON or HTML",
    "paragraphs": "the number of paragraphs or sections and how they are separated",
    "specific_sentence": "an exact phrase the answer must begin or end with",
    "key_formatting": "how titles or key terms are styled, such as bold, italics or capital letters",
    "item_listing": "how list items are marked, such as bullets, numbers or hyphens",
}
_NULLS = {"", "null", "none", "n/a", "na", "not applicable", "nil"}
_KEY_ALIASES = {"multi_lingual": "multilingual", "item_listing_details": "item_listing", "desired_writing_style": "writing_style",
                "paragraph": "paragraphs", "style": "writing_style", "output_format": "special_output_format"}
#: The prompt asks for 10-20 word constraints (the paper's wording); the parser accepts 3-40. The
#: paper's pipeline (THU-KEG/Crab) keeps every non-NULL value the model returns and filters only by
#: ROUGE-L and the LLM check, so the 10-20 words are guidance, not a filter; a precise 8-word
#: constraint ("Use a numbered list for the installation steps.") is as checkable as a 14-word one,
#: and the verify stage judges whether it holds. The bounds refuse only what is not a constraint
#: sentence: a fragment ("Two.") or a paragraph pasted into a value. Each refusal is kept in
#: ``meta.llm_constraints_rejected`` with its reason (``too_short``/``too_long``).
MIN_CONSTRAINT_WORDS, MAX_CONSTRAINT_WORDS = 3, 40


def constraints_schema() -> dict[str, Any]:
    """The JSON schema of the constrain stage's reply: every type, a sentence or null.

    Sent as the ``json_schema`` param when the backend can do guided decoding, so the server can
    only return this object (strict mode: all keys required, no others). The parser still checks
    the reply: a backend may not honour the schema, and lengths and nulls are judged there.
    """
    return {
        "type": "object",
        "properties": {name: {"type": ["string", "null"], "description": desc} for name, desc in LLM_TYPES.items()},
        "required": list(LLM_TYPES),
        "additionalProperties": False,
    }


# -- parsing ---------------------------------------------------------------------------------
def _type_key(key: str) -> str:
    k = re.sub(r"[^a-z0-9]+", "_", key.lower()).strip("_")
    k = re.sub(r"_?constraints?$", "", k)
    return _KEY_ALIASES.get(k, k)


def parse_llm_constraints(text: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(constraints, rejected) from the model's JSON reply; ParseError when there is no JSON object.

    The object is found by :func:`btkit.parsing.extract_json`: anywhere in the reply (code fence,
    prose with braces around it); where the reply holds several, only those with a key naming a
    constraint type count, and two different such objects are ``ambiguous_json``, never a guess.
    Null values are skipped; unknown types, non-strings and sentences outside 3..40 words are
    returned as rejected with a reason, never guessed into another type (length bounds: see
    :data:`MIN_CONSTRAINT_WORDS`).
    """
    try:
        obj = extract_json(text, prefer=lambda o: any(_type_key(str(k)) in LLM_TYPES for k in o))
    except ParseError as e:
        if e.reason in ("no_json", "incomplete_json"):
            # CRAB's reasons: braces that hold no valid object are invalid_json, no closed brace pair no_json
            start = text.find("{") if text else -1
            if start >= 0 and text.rfind("}") > start:
                raise ParseError("invalid_json", "no valid JSON object between the braces") from None
            raise ParseError("no_json", "no JSON object in the reply") from None
        raise
    found, rejected = [], []
    for key, value in obj.items():
        kind = _type_key(str(key))
        if value is None or (isinstance(value, str) and value.strip().strip(".").lower() in _NULLS):
            continue
        if kind not in LLM_TYPES:
            rejected.append({"type": str(key), "text": value, "reason": "unknown_type"})
            continue
        if not isinstance(value, str):
            rejected.append({"type": kind, "text": value, "reason": "not_a_sentence"})
            continue
        sentence = " ".join(value.split())
        n = len(sentence.split())
        if not MIN_CONSTRAINT_WORDS <= n <= MAX_CONSTRAINT_WORDS:
            rejected.append({"type": kind, "text": sentence, "reason": "too_short" if n < MIN_CONSTRAINT_WORDS else "too_long"})
            continue
        found.append({"type": kind, "source": "llm", "text": sentence, "verified_by": "llm"})
    return found, rejected


def dedup_constraints(constraints: list[dict[str, Any]], threshold: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Keep constraints in order, removing any whose ROUGE-L with a kept one exceeds ``threshold``."""
    kept: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    for c in constraints:
        dup = near_duplicate(c["text"], [k["text"] for k in kept], threshold)
        if dup:
            removed.append({**c, "removed": "near_duplicate", "duplicate_of": dup[0], "rouge_l": round(dup[1], 3)})
        else:
            kept.append(c)
    return kept, removed


# -- options ---------------------------------------------------------------------------------
class CountRange(click.ParamType):
    """``6-8`` (or ``6``, or a two-item list in a pipeline file) -> (6, 8)."""

    name = "MIN-MAX"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[int, int]:
        try:
            if isinstance(value, (list, tuple)) and len(value) == 2:
                lo, hi = int(value[0]), int(value[1])
            elif isinstance(value, int):
                lo = hi = value
            else:
                parts = str(value).split("-")
                if len(parts) not in (1, 2):
                    raise ValueError
                lo, hi = int(parts[0]), int(parts[-1])
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a count range like 6-8", param, ctx)
        if not 1 <= lo <= hi:
            self.fail(f"{value!r}: need 1 <= MIN <= MAX", param, ctx)
        return lo, hi


# -- stages ----------------------------------------------------------------------------------
class ConstrainStage(Stage):
    """(instruction, response) -> constraints the response satisfies (rule-based + LLM-written)."""

    kind = "constrain"
    templates = ("crab/constrain",)
    variables = ("instruction", "response", "types")

    def __init__(self, method: str, name: str, options: dict[str, Any]):
        super().__init__(method, name, options)
        self.use_llm = options["llm_constraints"] is not False
        self.dedup_threshold = float(options["dedup_threshold"])

    async def process(self, record: Record, ctx) -> list[Record]:
        response = record.fields["response"]
        found = rules.rule_constraints(response, random.Random(f"{record.id}|crab.rules"))
        if self.use_llm:
            variables = {"instruction": record.fields["instruction"], "response": response,
                         "types": [{"name": k, "description": v} for k, v in LLM_TYPES.items()]}
            params = self.sampling(temperature=0.2, top_p=0.9, max_tokens=600)
            if ctx.backend().supports(JSON_SCHEMA):  # guided decoding: the server returns the object or nothing
                params.update(json_schema=constraints_schema(), json_schema_name="crab_constraints")
            comp = await ctx.complete("crab/constrain", variables, parse=parse_llm_constraints, **params)
            if comp.parse_error is not None:  # the rule constraints still stand
                record.meta["llm_constraints_error"] = comp.parse_error.reason
            else:
                llm, rejected = comp.parsed
                if rejected:
                    record.meta["llm_constraints_rejected"] = rejected
                found += llm
        kept, removed = dedup_constraints(found, self.dedup_threshold)
        record.fields["constraints"] = kept
        if removed:
            record.meta["constraints_removed"] = removed
        if not kept:
            return [record.drop(self.label, "no_constraints")]
        return [record]


class VerifyStage(JudgingStage):
    """Re-check rule constraints by code and LLM constraints by the model (a yes/no judge); drop what fails."""

    kind = "curate"
    templates = ("crab/verify",)
    variables = ("instruction", "response", "constraint", "mode")
    judge_modes = LABEL_JUDGE_MODES
    former_flag = "--verify-mode"
    former_key = "verify_mode"

    async def _check(self, record: Record, ctx, c: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        response = record.fields["response"]
        if c["source"] == "rule":
            return ({**c, "verified": True}, None) if rules.check(c, response) else (c, "rule_violated")
        variables = {"instruction": record.fields["instruction"], "response": response, "constraint": c["text"]}
        verdict, details = await binary_verdict(ctx, "crab/verify", variables, "Yes", "No", self.judge_mode,
                                                self.sampling(temperature=0.0, max_tokens=8))
        c = {**c, **details}
        if verdict is None:
            return c, "unverifiable"
        return ({**c, "verified": True}, None) if verdict else (c, "llm_rejected")

    async def process(self, record: Record, ctx) -> list[Record]:
        results = await asyncio.gather(*(self._check(record, ctx, c) for c in record.fields.get("constraints", [])))
        kept = [c for c, why in results if why is None]
        removed = [{**c, "removed": why} for c, why in results if why is not None]
        record.fields["constraints"] = kept
        if removed:
            record.meta["constraints_removed"] = record.meta.get("constraints_removed", []) + removed
        if not kept:
            return [record.drop(self.label, "no_verified_constraints", removed=[c["removed"] for c in removed])]
        return [record]


class ComposeStage(Stage):
    """Constraints -> a forward example and a reverse example (the paper's counts by default)."""

    kind = "constrain"
    templates = ("crab/forward", "crab/reverse")
    variables = ("instruction", "response", "constraints")

    def __init__(self, method: str, name: str, options: dict[str, Any]):
        super().__init__(method, name, options)
        self.forward_range = CountRange().convert(options["forward_constraints"], None, None)
        self.reverse_range = CountRange().convert(options["reverse_constraints"], None, None)
        self.reverse = options["reverse"] is not False

    def _example(self, ctx, record: Record, kind: str, count: tuple[int, int], rng: random.Random) -> Record:
        constraints = record.fields["constraints"]
        # As the paper's code (Forward_data_generate.py): clamp the range to what is available,
        # then draw uniformly; with fewer than the minimum, every constraint is used.
        lo, hi = min(count[0], len(constraints)), min(count[1], len(constraints))
        chosen = rng.sample(constraints, rng.randint(lo, hi))
        instruction, response = record.fields["instruction"], record.fields["response"]
        prompt = ctx.prompts.render(f"crab/{kind}", {"instruction": instruction, "response": response,
                                                         "constraints": [c["text"] for c in chosen]})
        rec = record.child(f"~{kind}")
        rec.fields.update(base_instruction=instruction, base_response=response, constraints=chosen)
        if kind == "forward":
            rec.fields.update(instruction=prompt.messages[-1]["content"], response=response)
        else:
            rec.fields.update(instruction=prompt.messages[-1]["content"],
                              response="\n".join(f"{i}. {c['text']}" for i, c in enumerate(chosen, start=1)))
        if prompt.messages[0]["role"] == "system":
            rec.fields["system"] = prompt.messages[0]["content"]
        rec.meta.update(crab_example=kind, n_constraints=len(chosen))
        return rec

    async def process(self, record: Record, ctx) -> list[Record]:
        rng = random.Random(f"{record.id}|crab.compose")
        out = [self._example(ctx, record, "forward", self.forward_range, rng)]
        if self.reverse:
            out.append(self._example(ctx, record, "reverse", self.reverse_range, rng))
        return out


# -- method ----------------------------------------------------------------------------------
class Crab(Method):
    def required_fields(self, options: dict[str, Any]) -> dict[str, str]:
        return {options["instruction_field"]: "--instruction-field", options["response_field"]: "--response-field"}

    def prepare(self, rows: Iterable[dict[str, Any]], options: dict[str, Any]) -> Iterator[Record]:
        """Input pairs -> records; ids from the id field, btkit's meta.id, or the line number."""
        ifield, rfield = options["instruction_field"], options["response_field"]
        id_field = options.get("id_field") or "id"
        with SeenSet() as seen:  # ids stay unique in flat memory
            for n, row in enumerate(rows, start=1):
                meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
                rid = str(row.get(id_field) or meta.get("id") or f"line{n}")
                if not seen.add(rid):
                    rid = f"{rid}@line{n}"
                    seen.add(rid)
                fields = {"instruction": row[ifield].strip(), "response": row[rfield].strip()}
                if isinstance(row.get("system"), str) and row["system"]:
                    fields["system"] = row["system"]
                rec = Record(id=rid, source_id=str(meta.get("source_id") or rid), fields=fields)
                if not fields["instruction"] or not fields["response"]:
                    rec.drop("crab.prepare", "empty_pair", empty=[k for k in ("instruction", "response") if not fields[k]])
                yield rec

    def to_output(self, record: Record) -> dict[str, Any]:
        out = super().to_output(record)
        out["meta"]["constraints"] = record.fields.get("constraints", [])
        return out


def _verify_mode_options() -> list[click.Option]:
    judge_mode = judge_mode_option(LABEL_JUDGE_MODES, "How the verify stage reads the model's Yes/No check: logprob compares "
                                   "P(Yes)/P(No) in one forward pass; rubric parses a Yes/No reply; auto: logprob when the backend can.")
    return [judge_mode, deprecated_alias(judge_mode, "--verify-mode")]


METHOD = Crab(
    stage_classes={"constrain": ConstrainStage, "verify": VerifyStage, "compose": ComposeStage},
    name="crab",
    description="CRAB: constraint back-translation; adds constraints an existing response already satisfies (rule-based, verified by code; LLM-written, verified by the model).",
    paper="Qi et al. 2024, Constraint Back-translation Improves Complex Instruction Following of Large Language Models, arXiv:2410.24175",
    stages=[
        StageInfo("constrain", "constrain", ("instruction", "response"), ("constraints",),
                  "rule constraints computed from the response + LLM constraints of ten types (JSON); ROUGE-L > 0.6 duplicates removed"),
        StageInfo("verify", "curate", ("instruction", "response", "constraints"), ("constraints",),
                  "rule constraints re-checked by code, LLM constraints by a yes/no model check; drop records left with none"),
        StageInfo("compose", "constrain", ("instruction", "response", "constraints"),
                  ("instruction", "response", "constraints", "base_instruction", "base_response"),
                  "forward example (instruction + 6-8 constraints -> response) and reverse example (-> 3-6 constraints)"),
    ],
    default_stages=("constrain", "verify", "compose"),
    unit_fields=("instruction", "response"),  # prepare reads pairs (--instruction-field/--response-field)
    prompts_dir=PROMPTS,
    cli_options=[
        click.Option(["--instruction-field"], default="instruction", show_default=True, help="Input field holding the instruction."),
        click.Option(["--response-field"], default="response", show_default=True, help="Input field holding the response."),
        click.Option(["--forward-constraints"], type=CountRange(), default="6-8", show_default=True, help="Constraints per forward example (capped at those found)."),
        click.Option(["--reverse-constraints"], type=CountRange(), default="3-6", show_default=True, help="Constraints per reverse example."),
        click.Option(["--reverse/--no-reverse"], default=True, show_default=True, help="Also write reverse examples (instruction + response -> constraints)."),
        click.Option(["--llm-constraints/--no-llm-constraints"], default=True, show_default=True, help="Ask the model for constraints of the ten LLM types (off: rule-based only, no model calls)."),
        *_verify_mode_options(),
        click.Option(["--dedup-threshold"], type=SHARE, default=0.6, show_default=True, help="Remove a constraint whose ROUGE-L with an earlier one exceeds this."),
    ],
)


@hookimpl
def btkit_register_methods(register):
    register(METHOD)
