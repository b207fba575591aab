"""Hostile model output: every reply ends as a parsed result or a counted, recorded failure, never a
crash. The JSON extractor any method can use, the rubric score parser, Humpback's stages end to end,
and the parse-retry policy (off by default, recorded in lineage when used)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from btkit.backends import Completion
from btkit.hookspecs import hookimpl
from btkit.methods import Method, ParseError, Stage, StageInfo
from btkit.parsing import extract_json
from btkit.records import Record
from btkit.kit.judges import parse_score

from conftest import read_jsonl, write_jsonl, words

# -- extract_json ------------------------------------------------------------------------------
SCHEMA = {"instruction": str, "score": int}

PARSED = [
    ('{"instruction": "Explain tides.", "score": 4}', {"instruction": "Explain tides.", "score": 4}),
    ('```json\n{"instruction": "Explain tides.", "score": 4}\n```', {"instruction": "Explain tides.", "score": 4}),
    ('Sure! Here is the JSON you asked for:\n\n{"instruction": "Explain tides.", "score": 4}\n\nLet me know if you need more.',
     {"instruction": "Explain tides.", "score": 4}),
    ('\ufeff{"instruction": "Explain tides.", "score": "4"}', {"instruction": "Explain tides.", "score": 4}),  # quoted number
    ('{"instruction": "Explain tides.", "score": 4.0}', {"instruction": "Explain tides.", "score": 4}),
    # the same object twice (a model repeating itself) is one answer
    ('{"instruction": "Explain tides.", "score": 4}\n{"instruction": "Explain tides.", "score": 4}', {"instruction": "Explain tides.", "score": 4}),
    # an echoed example without the keys, then the answer
    ('Format: {"example": true}\nAnswer: {"instruction": "Explain tides.", "score": 4}', {"instruction": "Explain tides.", "score": 4}),
    ('{"instruction": "Use {braces} and \\"quotes\\"", "score": 2, "extra": {"nested": [1, {"x": 2}]}}',
     {"instruction": 'Use {braces} and "quotes"', "score": 2, "extra": {"nested": [1, {"x": 2}]}}),
    ("{\"instruction\": \"caf\u00e9 \ufffd ok\", \"score\": 1}", {"instruction": "caf\u00e9 \ufffd ok", "score": 1}),
]

REFUSED = [
    ("", "empty_reply"),
    (None, "empty_reply"),
    ("   \n\t ", "empty_reply"),
    ("I'm sorry, I can't help with that.", "no_json"),
    ("The instruction is: explain tides. Score 4.", "no_json"),
    ('{"instruction": "Explain tides.", "score": 4', "incomplete_json"),  # cut at max tokens
    ('{"instruction": "Explain ti', "incomplete_json"),
    ('{"instruction": "Explain tides."}', "missing_key"),
    ('{"instruction": ["Explain", "tides"], "score": 4}', "wrong_type"),
    ('{"instruction": "Explain tides.", "score": "four"}', "wrong_type"),
    ('{"instruction": "Explain tides.", "score": 4.5}', "wrong_type"),
    ('{"instruction": "Explain tides.", "score": true}', "wrong_type"),
    ('{"instruction": "Explain tides.", "score": null}', "wrong_type"),
    ('{"instruction": "A", "score": 4}\n{"instruction": "B", "score": 2}', "ambiguous_json"),
    ('["not", "an", "object"]', "no_json"),
    ("{'instruction': 'single quotes', 'score': 4}", "no_json"),  # not JSON: never "repaired"
    ('{"instruction": "trailing comma", "score": 4,}', "no_json"),
]


@pytest.mark.parametrize("reply,expected", PARSED)
def test_extract_json_parses(reply, expected):
    assert extract_json(reply, SCHEMA) == expected


@pytest.mark.parametrize("reply,reason", REFUSED)
def test_extract_json_refuses_to_guess(reply, reason):
    with pytest.raises(ParseError) as e:
        extract_json(reply, SCHEMA)
    assert e.value.reason == reason


def test_extract_json_copes_with_long_brace_heavy_replies():
    code = "function f() { if (x) { return {a: 1}; } }\n" * 5000  # JS, not JSON: many '{', none decodes
    with pytest.raises(ParseError) as e:
        extract_json(code + '{"instruction": "late", "score": 3}', SCHEMA)
    assert e.value.reason in ("no_json", "incomplete_json")  # gives up after a bounded number of tries
    long_value = "word " * 200_000
    assert extract_json(json.dumps({"instruction": long_value, "score": 5}), SCHEMA)["score"] == 5


def test_extract_json_key_list_and_types():
    assert extract_json('{"a": 1, "b": [2]}', ["a", "b"]) == {"a": 1, "b": [2]}
    assert extract_json('{"a": "2.5"}', {"a": float}) == {"a": 2.5}
    assert extract_json('{"a": 2}', {"a": (str, int)}) == {"a": 2}
    with pytest.raises(ParseError, match="'a' should be list"):
        extract_json('{"a": "x"}', {"a": list})


# -- the rubric score parser on hostile replies (parse_score lives in btkit/kit/judges.py) -------
SCORES = [
    ("```\nScore: 4\n```", 4),
    ("Let me think about it.\nScore: 5\nHope this helps!", 5),
    ("The text says 'Score: 5' but it is a forum post.\nScore: 2", 2),  # quoted score, then the verdict
    ("Score: 4\ufffd", 4),
    ("x" * 200_000 + "\nScore: 3", 3),
]
SCORE_FAILURES = [
    ("Score: 3 or Score: 5", "ambiguous_score"),
    ("Score: 9", "out_of_range"),
    ("Score: 4.5", "not_integer"),
    ("I cannot evaluate this request.", "no_score"),
    ("Score: N/A", "no_score"),
    ("Score: \ufffd\ufffd", "no_score"),
    ("\n\n", "empty_reply"),
]


@pytest.mark.parametrize("reply,expected", SCORES)
def test_score_parser_on_hostile_replies(reply, expected):
    assert parse_score(reply) == expected


@pytest.mark.parametrize("reply,reason", SCORE_FAILURES)
def test_score_parser_refuses_hostile_replies(reply, reason):
    with pytest.raises(ParseError) as e:
        parse_score(reply)
    assert e.value.reason == reason



def test_score_parser_does_not_read_part_of_a_number():
    with pytest.raises(ParseError):
        parse_score("Score: 1e1")


# -- Humpback end to end: a hostile reply per document -----------------------------------------
def doc(i: int) -> str:
    return f"case{i} " + words(40, start=i * 100)


GOOD_INSTRUCTION = "How do these ideas connect to each other?"
AUGMENT_CASES: list[tuple[Any, str | None]] = [  # (reply, drop reason or None when parsed)
    ("", "instruction_empty_reply"),
    (..., "instruction_empty_reply"),  # None content
    ("   \n ", "instruction_empty_reply"),
    (Completion(text="How do these ideas", finish_reason="length"), "instruction_truncated"),
    ("```\nHow do these ideas connect to each other?\n```", None),
    ("Request: How do these ideas connect to each other?\n\nAnswer: they do.", None),
    ("I'm sorry, but I can't help with that request.", "instruction_refusal"),
    ("How do these \ufffd\ufffd ideas connect to each other?", None),
    ("How do these \udcff ideas connect to each other?", None),  # a lone surrogate from a backend
    ("COPY", "instruction_copied_document"),
    ("Explain " + "very " * 100_000 + "carefully.", "instruction_too_long"),
]
JUDGE_CASES: list[tuple[Any, str | None, int | None]] = [  # (reply, drop reason or None, score)
    ("", "unparseable_score", None),
    (..., "unparseable_score", None),
    (Completion(text="The answer is good because", finish_reason="length"), "unparseable_score", None),
    ("```\nScore: 4\n```", None, 4),
    ("Let me think.\nScore: 5\nHope this helps!", None, 5),
    ("Score: 3 or Score: 5", "unparseable_score", None),
    ("Score: 9", "unparseable_score", None),
    ("I cannot evaluate this.", "unparseable_score", None),
    ("Score: 4\ufffd", None, 4),
    ("\udcffScore: 5", None, 5),
    ("y" * 200_000 + "\nScore: 2", "below_threshold", 2),
]


def _case(messages: list[dict[str, str]]) -> int:
    text = messages[-1]["content"]
    return int(text.split("case", 1)[1].split()[0])


def test_hostile_augment_replies_end_parsed_or_counted(cli, scripted, tmp_path):
    def reply(messages, params):
        i = _case(messages)
        if "Score:" in messages[-1]["content"]:
            return "Fine.\nScore: 5"
        r = AUGMENT_CASES[i][0]
        return doc(i) if r == "COPY" else r

    backend, spec = scripted(default=reply)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": doc(i)} for i in range(len(AUGMENT_CASES))])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec, "--judge-mode", "rubric", "--threshold", "4", "-q")
    assert r.exit_code == 0, r.output
    by_id = {l["source_id"]: l for l in read_jsonl(tmp_path / "out" / "candidates.jsonl")}
    for i, (_, reason) in enumerate(AUGMENT_CASES):
        line = by_id[f"d{i}"]
        assert line["reason"] == reason, (i, line["reason"], line["lineage"][0].get("raw", "")[:80])
        if reason is None:
            assert " ".join(line["fields"]["instruction"].split()) == GOOD_INSTRUCTION
        else:  # recorded with the raw reply, never guessed
            assert line["lineage"][0]["kind"] == "chat" and "parse_error" in line["lineage"][0]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    expected_drops: dict[str, int] = {}
    for _, reason in AUGMENT_CASES:
        if reason:
            expected_drops[f"humpback.augment:{reason}"] = expected_drops.get(f"humpback.augment:{reason}", 0) + 1
    assert stats["dropped_by_reason"] == expected_drops
    assert stats["stages"]["humpback.augment"]["parse_failures"] == {
        "empty_reply": 3, "truncated": 1, "refusal": 1, "copied_document": 1, "too_long": 1}
    assert stats["parse_failures"] == 7 and stats["kept"] == 4


def test_hostile_judge_replies_end_parsed_or_counted(cli, scripted, tmp_path):
    def reply(messages, params):
        i = _case(messages)
        if "Score:" in messages[-1]["content"]:
            return JUDGE_CASES[i][0]
        return GOOD_INSTRUCTION

    backend, spec = scripted(default=reply)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": doc(i)} for i in range(len(JUDGE_CASES))])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec, "--judge-mode", "rubric", "--threshold", "4", "-q")
    assert r.exit_code == 0, r.output
    by_id = {l["source_id"]: l for l in read_jsonl(tmp_path / "out" / "candidates.jsonl")}
    for i, (_, reason, score) in enumerate(JUDGE_CASES):
        line = by_id[f"d{i}"]
        assert line["reason"] == reason, (i, line["reason"], line["meta"].get("score_error"))
        assert line["meta"].get("score") == score
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["dropped_by_reason"] == {"humpback.curate:unparseable_score": 6, "humpback.curate:below_threshold": 1}
    assert stats["stages"]["humpback.curate"]["parse_failures"] == {
        "empty_reply": 2, "truncated": 1, "ambiguous_score": 1, "out_of_range": 1, "no_score": 1}
    assert stats["kept"] == 4
    # every output line is strict JSON (no NaN), valid UTF-8
    for name in ("candidates.jsonl", "data.jsonl"):
        for raw in (tmp_path / "out" / name).read_bytes().splitlines():
            json.loads(raw.decode("utf-8"), parse_constant=lambda c: pytest.fail(f"{name} holds {c}"))



def test_a_content_filtered_instruction_is_not_kept(cli, scripted, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": doc(0)}])
    backend, spec = scripted(default=lambda m, p: "Fine.\nScore: 5" if "Score:" in m[-1]["content"] else
                             Completion(text=GOOD_INSTRUCTION, finish_reason="content_filter"))
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec, "--judge-mode", "rubric", "-q")
    assert r.exit_code == 0, r.output
    assert read_jsonl(tmp_path / "out" / "data.jsonl") == []


def test_broken_logprobs_are_a_counted_failure(cli, scripted, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": doc(0)}])
    backend, spec = scripted(default=GOOD_INSTRUCTION, logprobs={d: -math.inf for d in "12345"})
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec, "--judge-mode", "logprob", "-q")
    assert r.exit_code == 0, r.output
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["dropped_by_reason"] == {"humpback.curate:unparseable_score": 1}



@pytest.mark.parametrize("bad", [math.inf, 2.0])
def test_logprobs_above_zero_are_not_a_score(cli, scripted, tmp_path, bad):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": doc(0)}])
    backend, spec = scripted(default=GOOD_INSTRUCTION, logprobs={"1": -3.0, "2": -3.0, "3": -3.0, "4": -3.0, "5": bad})
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec, "--judge-mode", "logprob", "--threshold", "1", "-q")
    assert r.exit_code == 0, r.output
    [cand] = read_jsonl(tmp_path / "out" / "candidates.jsonl")
    assert cand["reason"] == "unparseable_score" and cand["meta"]["score_error"] == "invalid_logprobs"


def test_nan_logprobs_are_not_a_score(cli, scripted, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": doc(0)}])
    backend, spec = scripted(default=GOOD_INSTRUCTION, logprobs={d: math.nan for d in "12345"})
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec, "--judge-mode", "logprob", "--threshold", "1", "-q")
    assert r.exit_code == 0, r.output
    assert read_jsonl(tmp_path / "out" / "data.jsonl") == []


# -- the parse-retry policy, through a method that opts in ---------------------------------------
class AskStage(Stage):
    kind = "augment"
    templates = ("retrier/ask",)
    variables = ("text",)

    async def process(self, record: Record, ctx) -> list[Record]:
        comp = await ctx.complete("retrier/ask", {"text": record.fields["text"]},
                                  parse=lambda t: extract_json(t, {"instruction": str}), temperature=0.0, max_tokens=64)
        if comp.parse_error is not None:
            return [record.drop(self.label, f"instruction_{comp.parse_error.reason}")]
        record.fields.update(instruction=comp.parsed["instruction"], response=record.fields["text"])
        return [record]


class Retrier(Method):
    def prepare(self, rows, options):
        for i, row in enumerate(rows):
            yield Record(id=f"r{i}", source_id=f"r{i}", fields={"text": row["text"]})

    def build_stage(self, name, options):
        return AskStage(self.name, name, options)


class RetrierPlugin:
    def __init__(self, prompts: Path):
        self.method = Retrier(name="retrier", description="test method for parse retries", stages=[StageInfo("ask", "augment", ("text",), ("instruction",))],
                              default_stages=("ask",), prompts_dir=prompts)  # --parse-retries is a common run option

    @hookimpl
    def btkit_register_methods(self, register):
        register(self.method)


@pytest.fixture
def retrier(registry, tmp_path):
    prompts = tmp_path / "prompts"
    (prompts / "retrier").mkdir(parents=True)
    (prompts / "retrier" / "ask.j2").write_text('Reply with JSON {"instruction": ...} for: {{ text | delimit("DOC") }}')
    registry.register(RetrierPlugin(prompts), name="retrier")
    yield
    registry.unregister("retrier")


def test_parse_retries_are_off_by_default(cli, scripted, retrier, tmp_path):
    backend, spec = scripted(replies=["not json at all"], default='{"instruction": "What is it?"}')
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "some text"}])
    r = cli("run", "retrier", corpus, "-o", tmp_path / "out", "--model", spec, "-q")
    assert r.exit_code == 0, r.output
    assert len(backend.history) == 1
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["dropped_by_reason"] == {"retrier.ask:instruction_no_json": 1}
    assert stats["parse_retries"] == 0 and stats["parse_failures"] == 1


def test_parse_retries_resample_with_another_seed_and_are_recorded(cli, scripted, retrier, tmp_path):
    backend, spec = scripted(replies=["not json at all", '{"instruction": 42}'], default='{"instruction": "What is it?"}')
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "some text"}])
    r = cli("run", "retrier", corpus, "-o", tmp_path / "out", "--model", spec, "-q", "--parse-retries", "3")
    assert r.exit_code == 0, r.output
    assert len(backend.history) == 3
    seeds = [h["params"].get("seed") for h in backend.history]
    assert seeds[0] is None and len(set(seeds)) == 3  # each retry another seed: another request, another cache key
    temps = [h["params"]["temperature"] for h in backend.history]
    assert temps == [0.0, 0.7, 0.7]  # a greedy request is re-sampled, not repeated
    out = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert out[0]["instruction"] == "What is it?"
    lineage = out[0]["meta"]["lineage"]
    assert [s.get("attempt") for s in lineage] == [None, 1, 2]
    assert [s.get("parse_error") for s in lineage] == ["no_json", "wrong_type", None]
    assert lineage[1]["retry_of"] == lineage[0]["step"] and lineage[2]["retry_of"] == lineage[1]["step"]
    assert lineage[2]["parsed"] == {"instruction": "What is it?"}
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["parse_retries"] == 2 and stats["stages"]["retrier.ask"]["parse_retries_recovered"] == 1
    assert stats["parse_failures_by_reason"] == {"no_json": 1, "wrong_type": 1}

    # Re-running makes no call: every attempt, failed ones included, is in the cache.
    n = len(backend.history)
    r = cli("run", "retrier", corpus, "-o", tmp_path / "again", "--model", spec, "-q", "--parse-retries", "3")
    assert r.exit_code == 0 and len(backend.history) == n
    assert read_jsonl(tmp_path / "again" / "data.jsonl")[0]["instruction"] == "What is it?"


def test_parse_retries_give_up_after_k_and_count_each_failure(cli, scripted, retrier, tmp_path):
    backend, spec = scripted(default="still not json")
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "some text"}])
    r = cli("run", "retrier", corpus, "-o", tmp_path / "out", "--model", spec, "-q", "--parse-retries", "2")
    assert r.exit_code == 0, r.output
    assert len(backend.history) == 3
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["dropped_by_reason"] == {"retrier.ask:instruction_no_json": 1}
    assert stats["parse_failures"] == 3 and stats["parse_retries"] == 2


def test_a_stage_that_returns_nothing_is_recorded_not_lost(cli, scripted, registry, tmp_path):
    class Vanish(Stage):
        async def process(self, record, ctx):
            return []

    class VanishMethod(Method):
        def prepare(self, rows, options):
            for i, row in enumerate(rows):
                yield Record(id=f"v{i}", source_id=f"v{i}", fields={"text": row["text"]})

        def build_stage(self, name, options):
            return Vanish(self.name, name, options)

    class Plugin:
        @hookimpl
        def btkit_register_methods(self, register):
            register(VanishMethod(name="vanish", description="d", stages=[StageInfo("s", "augment", (), ())], default_stages=("s",)))

    registry.register(Plugin(), name="vanish")
    try:
        _, spec = scripted(default="x")
        corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "a"}, {"text": "b"}])
        r = cli("run", "vanish", corpus, "-o", tmp_path / "out", "--model", spec, "-q")
        assert r.exit_code == 0, r.output
        stats = json.loads((tmp_path / "out" / "stats.json").read_text())
        assert stats["units"] == 2 and stats["dropped_by_reason"] == {"vanish.s:no_output": 2}
    finally:
        registry.unregister("vanish")


def test_humpback_augment_retries_an_unparseable_instruction_when_asked(cli, scripted, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": doc(0)}])
    replies = ["", GOOD_INSTRUCTION]  # the first instruction is empty, the retry is fine
    backend, spec = scripted(default=lambda m, p: "Fine.\nScore: 5" if "Score:" in m[-1]["content"] else replies.pop(0))
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec, "--judge-mode", "rubric", "--parse-retries", "1", "-q")
    assert r.exit_code == 0, r.output
    out = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert [d["instruction"] for d in out] == [GOOD_INSTRUCTION]
    assert [s.get("attempt") for s in out[0]["meta"]["lineage"]] == [None, 1, None]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["parse_retries"] == 1
