"""LINGUIST: the numbered-bracket parser and its inverse, BIO tags, line checks with each drop reason,
the spec (YAML and JSONL, errors naming file, line and field), the seeded draw of examples and slots,
golden prompts, whole runs on a scripted backend (per-intent report, de-duplication across the run,
resume) and a run on the embedded model."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from btkit.methods import ParseError
from btkit.prompts import PromptLibrary
from btkit_plugins.methods.linguist import (METHOD, GenerateStage, Request, Span, bio_tags, check_intent, check_line, clean_line,
                                            dedup_key, draw_request, intent_report, parse_named, parse_numbered, read_spec,
                                            render_named, render_numbered, spans_from_bio, spec_line, split_lines, token_offsets)

from conftest import EXAMPLES, read_jsonl, write_jsonl

NUMBERING = {1: "song", 2: "artist", 3: "playlist"}
NUMBERS = {v: k for k, v in NUMBERING.items()}


# -- the parser -------------------------------------------------------------------------------------------
def test_numbered_brackets_parse_into_text_and_spans():
    text, spans = parse_numbered("play [1 despacito ] by [2 luis fonsi ]", NUMBERING)
    assert text == "play despacito by luis fonsi"
    assert spans == [Span(5, 14, "song", "despacito"), Span(18, 28, "artist", "luis fonsi")]
    assert all(text[s.start:s.end] == s.value for s in spans)


def test_spaces_are_normalised_and_values_stripped():
    text, spans = parse_numbered("  play   [1   so  what] by [2 miles davis ]  now ", NUMBERING)
    assert text == "play so what by miles davis now"
    assert [s.value for s in spans] == ["so what", "miles davis"]
    assert [text[s.start:s.end] for s in spans] == ["so what", "miles davis"]


@pytest.mark.parametrize("line,reason", [
    ("play [1 despacito by luis fonsi", "unbalanced_brackets"),
    ("play despacito ] by [2 luis fonsi ]", "unbalanced_brackets"),
    ("play [1 [2 despacito ] ]", "unbalanced_brackets"),
    ("play [song despacito ]", "bad_slot_marker"),
    ("play [1despacito ]", "bad_slot_marker"),
    ("play [1 ] by [2 luis fonsi ]", "empty_value"),
    ("play [1] now", "empty_value"),
    ("play [7 despacito ]", "unknown_slot"),
    ("[1 ]", "empty_value"),
])
def test_broken_lines_name_their_reason(line, reason):
    with pytest.raises(ParseError) as e:
        parse_numbered(line, NUMBERING)
    assert e.value.reason == reason


def test_spec_marking_parses_and_names_unknown_slots():
    text, spans = parse_named("play [song: blue in green] by [artist: miles davis]", ["song", "artist"])
    assert text == "play blue in green by miles davis" and [s.slot for s in spans] == ["song", "artist"]
    with pytest.raises(ParseError) as e:
        parse_named("play [genre: jazz]", ["song", "artist"])
    assert e.value.reason == "unknown_slot" and "genre" in e.value.detail


# -- property tests: parse(render(spans)) == spans, BIO round trip ------------------------------------------------
_word = st.text(alphabet="abcdefghijklmnopqrstuvwxyzé'.,?0123456789-", min_size=1, max_size=8)
_phrase = st.lists(_word, min_size=1, max_size=3).map(" ".join)


@st.composite
def annotated(draw):
    """A normalised utterance: words and slot values, separated by spaces or (sometimes) glued on."""
    parts = draw(st.lists(st.tuples(_phrase, st.sampled_from([None, "song", "artist", "playlist"]), st.booleans()), min_size=1, max_size=6))
    text, spans = "", []
    for i, (phrase, slot, glued) in enumerate(parts):
        if i and not (glued and slot is None and parts[i - 1][1] is not None):
            text += " "
        if slot is not None:
            spans.append(Span(len(text), len(text) + len(phrase), slot, phrase))
        text += phrase
    return text, spans


@settings(max_examples=300, deadline=None)
@given(annotated())
def test_parse_of_render_is_identity(utterance):
    text, spans = utterance
    assert parse_numbered(render_numbered(text, spans, NUMBERS), NUMBERING) == (text, spans)
    assert parse_named(render_named(text, spans), NUMBERS) == (text, spans)


@settings(max_examples=300, deadline=None)
@given(annotated())
def test_bio_round_trip(utterance):
    text, spans = utterance
    tokens, tags = bio_tags(text, spans)
    offsets = token_offsets(text, spans)
    assert [text[a:b] for a, b in offsets] == tokens and len(tags) == len(tokens)
    assert all(t and not t.isspace() for t in tokens)
    assert spans_from_bio(text, offsets, tags) == spans
    for tag in tags:
        assert tag == "O" or re.fullmatch(r"[BI]-(song|artist|playlist)", tag)


def test_bio_tags_cut_tokens_at_span_edges():
    text, spans = parse_numbered("play [2 adele ]'s new song on [3 road trip ]", NUMBERING)
    tokens, tags = bio_tags(text, spans)
    assert text == "play adele's new song on road trip"
    assert tokens == ["play", "adele", "'s", "new", "song", "on", "road", "trip"]
    assert tags == ["O", "B-artist", "O", "O", "O", "O", "B-playlist", "I-playlist"]


# -- checking a line against what the prompt asked --------------------------------------------------------
REQ = Request(NUMBERING, [{"slot": "song", "value": None}, {"slot": "artist", "value": "Nina Simone"}], True,
              frozenset({dedup_key("play feeling good by nina simone")}))


@pytest.mark.parametrize("line,reason", [
    ("Here are five new utterances:", "not_an_utterance"),
    ("<intent> play_song </intent>", "not_an_utterance"),
    ("```", "not_an_utterance"),
    ("<include> play [1 sinnerman ] by [2 nina simone ]", "not_an_utterance"),
    ("...", "not_an_utterance"),
    ("play [1 * ] by [2 nina simone ]", "placeholder_value"),
    ("play [1 song ] by [2 nina simone ]", "placeholder_value"),
    ("play [1 <title> ] by [2 nina simone ]", "placeholder_value"),
    ("add [1 sinnerman ] by [2 nina simone ] to [3 focus ]", "unrequested_slot"),
    ("play something by [2 nina simone ]", "missing_slot"),
    ("play [1 sinnerman ] by [2 fela kuti ]", "missing_value"),
    ("play [9 sinnerman ] by [2 nina simone ]", "unknown_slot"),
])
def test_label_checks(line, reason):
    with pytest.raises(ParseError) as e:
        check_line(line, REQ)
    assert e.value.reason == reason


def test_catalogue_values_match_case_and_spaces_aside_and_known_mode_is_looser():
    text, spans = check_line("play [1 sinnerman ] by [2 NINA  simone ]", REQ)
    assert text == "play sinnerman by NINA simone" and spans[1].value == "NINA simone"
    loose = REQ._replace(exact=False)
    assert check_line("add [1 sinnerman ] to [3 focus ]", loose)[1][1].slot == "playlist"
    with pytest.raises(ParseError, match="unknown_slot"):
        check_line("add [1 sinnerman ] to [4 focus ]", loose)
    with pytest.raises(ParseError, match="missing_slot"):
        check_line("I'm ready to help. What's your intent?", loose)
    assert check_line("stop it", loose._replace(include=[])) == ("stop it", [])


def test_reply_lines_lose_list_marks_and_quotes_and_an_empty_reply_fails():
    assert clean_line('  3. "play [1 x ] now"') == "play [1 x ] now"
    assert clean_line("- [1 so what ] by [2 miles davis ]") == "[1 so what ] by [2 miles davis ]"
    assert clean_line("2 cups of flour") == "2 cups of flour"
    assert clean_line("> play [1 x ]") == "play [1 x ]" and clean_line("-5 degrees in [1 oslo ]") == "-5 degrees in [1 oslo ]"
    assert split_lines("- a\n\n  \n2) b\n") == ["a", "b"]
    for reply in ("", "  \n\n", None):
        with pytest.raises(ParseError, match="empty_reply"):
            split_lines(reply)


def test_dedup_key_ignores_case_spaces_and_final_punctuation():
    assert dedup_key("Play  Sinnerman by Nina Simone!") == dedup_key("play sinnerman by nina simone")
    assert dedup_key("play sinnerman") != dedup_key("play sinnerman now")


# -- the spec -------------------------------------------------------------------------------------------------
SPEC_YAML = EXAMPLES / "linguist" / "intents.yaml"


def test_example_spec_is_checked_and_its_jsonl_is_the_yaml_converted(cli, tmp_path):
    intents = read_spec(SPEC_YAML)
    assert 3 <= len(intents) <= 10
    for i in intents:
        assert 5 <= len(i["examples"]) <= 10
    shipped = read_jsonl(EXAMPLES / "linguist" / "intents.jsonl")
    assert shipped == [spec_line(i) for i in intents]
    assert read_spec(EXAMPLES / "linguist" / "intents.jsonl") == intents  # the JSONL reads back to the same intents
    r = cli("linguist-spec", SPEC_YAML, "-o", tmp_path / "s.jsonl")
    assert r.exit_code == 0, r.output
    assert read_jsonl(tmp_path / "s.jsonl") == shipped
    # shared catalogue values reach only the intents that declare the slot
    by_name = {i["intent"]: i for i in intents}
    assert "artist" in by_name["play_song"]["values"] and "artist" not in by_name["install_package"]["values"]


def test_yaml_spec_may_be_a_plain_list_and_language_defaults(tmp_path):
    path = tmp_path / "spec.yml"
    path.write_text("- intent: halt\n  examples: [stopp, 'halt [what: alles] an']\n  slots: [what]\n- intent: go\n  language: fr\n  examples: [vas-y]\n")
    halt, go = read_spec(path, "de")
    assert (halt["language"], go["language"]) == ("de", "fr") and halt["examples"][1] == "halt [what: alles] an"
    assert go["slots"] == [] and go["values"] == {}


def test_language_option_reaches_intents_that_name_none(cli, scripted, tmp_path):
    backend, spec = scripted(default="- halt [1 alles ] an")
    path = write_jsonl(tmp_path / "s.jsonl", [{"intent": "halt", "slots": ["what"], "examples": ["stopp [what: alles]"]}])
    r = cli("run", "linguist", path, "-o", tmp_path / "out", "--model", spec, "--requests", "1", "--language", "de", "-q")
    assert r.exit_code == 0, r.output
    assert "in German, one per line" in backend.history[0]["messages"][-1]["content"]
    [row] = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert row["language"] == "de" and row["spans"] == [{"start": 5, "end": 10, "slot": "what", "value": "alles"}]


@pytest.mark.parametrize("body,line,field,words", [
    ("intents:\n  - intent: a\n    slots: [x]\n    examples: ['go [y: 1]']\n", 2, "examples[0]", "unknown_slot"),
    ("intents:\n  - intent: a\n    slots: [x]\n    examples: ['go [x: 1]']\n  - intent: b\n    slots: [x]\n    examples: ['go [x 1']\n", 5, "examples[0]", "unbalanced"),
    ("intents:\n  - intent: a\n    slots: [x]\n    examples: ['go [x: 1]']\n    values: {z: [1]}\n", 2, "values.z", "not a slot"),
    ("intents:\n  - intent: a\n    slots: ['9x']\n    examples: ['go']\n", 2, "slots[0]", "not a slot name"),
    ("intents:\n  - intent: a\n    slots: [x]\n    examples: []\n", 2, "examples", "non-empty list"),
    ("intents:\n  - intent: a\n    examples: ['go']\n  - intent: a\n    examples: ['stop']\n", 4, "intent", "already defined on line 2"),
    ("intents:\n  - intent: a\n    slots: [x]\n    examples: ['go [x: 1]']\n    values: {x: ['a]b']}\n", 2, "values.x[0]", "'['"),
    ("intents:\n  - intnet: a\n", 2, "intnet", "unknown field"),
])
def test_bad_yaml_spec_is_one_error_naming_file_line_and_field(cli, tmp_path, body, line, field, words):
    path = tmp_path / "spec.yaml"
    path.write_text(body)
    r = cli("linguist-spec", path)
    assert r.exit_code == 2
    message = r.output.strip()
    assert message.count("\n") == 0, message
    assert f"{path}:{line}: field '{field}':" in message and words in message


def test_bad_jsonl_spec_stops_the_run_before_any_call(cli, scripted, tmp_path):
    backend, spec = scripted(default="- play [1 x ]")
    good = {"intent": "play_song", "slots": ["song"], "examples": ["play [song: so what]"]}
    bad = {"intent": "stop", "slots": ["song"], "examples": ["stop [track: it]"]}
    path = write_jsonl(tmp_path / "spec.jsonl", [good, bad])
    r = cli("run", "linguist", path, "-o", tmp_path / "out", "--model", spec, "-q")
    assert r.exit_code == 2
    assert "record 2 (intent 'stop'): field 'examples[0]': unknown_slot" in r.output
    assert backend.history == [] and not (tmp_path / "out").exists()


# -- the draw: examples shown and slots included, reproducible --------------------------------------------------
OPTS = {**METHOD.option_defaults()}


def test_draws_are_seeded_and_respect_the_options():
    intent = check_intent({"intent": "add", "slots": ["song", "artist", "playlist"], "examples": [f"add [song: s{i}]" for i in range(8)],
                           "values": {"playlist": ["focus", "road trip"]}})
    draws = [draw_request(intent, i, OPTS) for i in range(40)]
    assert draws == [draw_request(intent, i, OPTS) for i in range(40)]
    assert draws != [draw_request(intent, i, {**OPTS, "draw_seed": 1}) for i in range(40)]
    for d in draws:
        assert len(d["shown"]) == OPTS["shots"] and len(set(d["shown"])) == len(d["shown"])
        assert 1 <= len(d["include"]) <= OPTS["max_include"]
        for inc in d["include"]:
            assert inc["value"] is None or (inc["slot"] == "playlist" and inc["value"] in ("focus", "road trip"))
    playlist = [inc for d in draws for inc in d["include"] if inc["slot"] == "playlist"]
    assert any(i["value"] is None for i in playlist) and any(i["value"] for i in playlist)  # wildcard share 0.5
    always = [draw_request(intent, i, {**OPTS, "wildcard_share": 0.0}) for i in range(20)]
    assert all(inc["value"] for d in always for inc in d["include"] if inc["slot"] == "playlist")
    none = draw_request(intent, 0, {**OPTS, "max_include": 0, "shots": 0})
    assert none["include"] == [] and none["shown"] == []


# -- golden prompts -------------------------------------------------------------------------------------------
def _unit(**over):
    intent = check_intent({"intent": "add_to_playlist", "description": "add a song to a playlist",
                           "slots": {"song": "a song title", "artist": "", "playlist": "the user's playlist"},
                           "examples": ["add [song: at last] to my [playlist: dinner party] playlist",
                                        "save [song: so what] by [artist: miles davis] to [playlist: focus]"]})
    return {**intent, "shown": [0, 1], "include": [{"slot": "song", "value": None}, {"slot": "playlist", "value": "road trip"}], "n": 5, **over}


CASES = {
    "generate": _unit(),
    "generate_no_slots": {**check_intent({"intent": "stop", "language": "de", "examples": ["stopp", "halt an"]}), "shown": [1, 0],
                          "include": [], "n": 3},
}


@pytest.mark.parametrize("case", sorted(CASES) + ["generate_known"])
def test_golden_linguist_prompts(registry, golden, case):
    stage = GenerateStage("linguist", "generate", {**OPTS, "slot_check": "known" if case.endswith("known") else "exact"})
    case = "generate" if case == "generate_known" else case
    golden(f"linguist/{case if stage.exact else case + '_known'}.txt", PromptLibrary(registry.prompt_roots()).render("linguist/generate", stage.variables_for(CASES[case])))


def test_prompt_numbers_slots_and_shows_examples_in_numbered_form(registry):
    stage = GenerateStage("linguist", "generate", OPTS)
    user = PromptLibrary(registry.prompt_roots()).render("linguist/generate", stage.variables_for(_unit())).messages[-1]["content"]
    assert "[1] song: a song title" in user and "[3] playlist" in user
    assert "- add [1 at last ] to my [3 dinner party ] playlist" in user
    assert "<include> [1 * ] [3 road trip ] </include>" in user
    assert "Write 5 new utterances" in user


# -- whole runs on a scripted backend ----------------------------------------------------------------------------
def fill(numbers_values: list[tuple[int, str]], template: str) -> str:
    return template.format(*[f"[{n} {v} ]" for n, v in numbers_values])


def obedient(messages, params):
    """Replies as asked: the included slots, catalogue values as given, invented ones otherwise; plus a heading,
    a duplicate, a broken line and one without the slots, so every unit exercises drops."""
    user = messages[-1]["content"]
    intent = re.search(r"<intent> (\S+) </intent>", user).group(1)
    include = re.findall(r"\[(\d+) (.+?) \]", re.search(r"<include>(.*)</include>", user).group(1))
    lines = ["Here are the utterances:"]
    for k in range(3):
        parts = [f"[{n} {f'{intent} thing {k}' if v == '*' else v} ]" for n, v in include]
        lines.append(f"- please {' and '.join(parts)} take {k}")
    lines.append(lines[-1].upper())  # the same utterance, shouted: a duplicate
    lines.append("- please [1 unclosed now")
    lines.append("- something without the slots asked for")
    return "\n".join(lines)


def test_run_writes_spans_tags_and_a_per_intent_report(cli, scripted, tmp_path):
    backend, spec = scripted(default=obedient)
    out = tmp_path / "out"
    r = cli("run", "linguist", EXAMPLES / "linguist" / "intents.jsonl", "-o", out, "--model", spec, "--requests", "2", "-q")
    assert r.exit_code == 0, r.output
    data, cands = read_jsonl(out / "data.jsonl"), read_jsonl(out / "candidates.jsonl")
    stats = json.loads((out / "stats.json").read_text())
    intents = [i["intent"] for i in read_spec(SPEC_YAML)]
    assert data and {d["intent"] for d in data} == set(intents)
    for d in data:
        assert_valid_line(d)
        assert "thing" in d["text"] or any(s["value"] for s in d["spans"])
    assert stats["records"] == len(cands) == stats["kept"] + stats["dropped"]
    drops = stats["stages"]["linguist.generate"]["dropped"]
    assert drops["not_an_utterance"] == drops["unbalanced_brackets"] == 10  # one per unit
    assert drops["duplicate"] == drops["missing_slot"] == 10
    report = stats["linguist"]
    assert sorted(report["intents"]) == sorted(intents)
    for name, row in report["intents"].items():
        assert row["requests"] == 2 and row["failed_requests"] == 0
        assert row["generated"] == 14 and row["parsed"] == 10 and row["label_valid"] == 8 and row["kept"] == sum(d["intent"] == name for d in data)
        assert row["label_valid_share"] == round(row["label_valid"] / row["parsed"], 4)
    assert report["totals"]["kept"] == len(data) == stats["kept"]
    keys = [dedup_key(d["text"]) for d in data]
    assert len(keys) == len(set(keys))  # no duplicate survives, within a unit or across the run


def assert_valid_line(d: dict) -> None:
    """What every kept LINGUIST line must satisfy, whatever the model wrote."""
    assert set(d) >= {"text", "intent", "language", "spans", "tokens", "tags", "annotated", "meta"}
    text = d["text"]
    assert text == text.strip() and text
    ends = 0
    for s in d["spans"]:
        assert text[s["start"]:s["end"]] == s["value"] and s["value"].strip() == s["value"] and s["start"] >= ends
        ends = s["end"]
    assert len(d["tokens"]) == len(d["tags"])
    spans = [Span(**s) for s in d["spans"]]
    assert bio_tags(text, spans) == (d["tokens"], d["tags"])
    offsets = token_offsets(text, spans)
    assert spans_from_bio(text, offsets, d["tags"]) == spans
    assert parse_named(d["annotated"], {s.slot for s in spans}) == (text, spans)
    assert d["meta"]["method"] == "linguist" and d["meta"]["lineage"]


def test_failed_and_truncated_replies_are_counted(cli, scripted, tmp_path):
    from btkit.backends import Completion
    from btkit.errors import BackendError

    def reply(messages, params):
        intent = re.search(r"<intent> (\S+) </intent>", messages[-1]["content"]).group(1)
        if intent == "a":
            return ""
        if intent == "b":
            return Completion(text="- play [1 a song ] now\n- play [1 b so", finish_reason="length")
        raise BackendError("boom")

    backend, spec = scripted(default=reply)
    path = write_jsonl(tmp_path / "s.jsonl", [{"intent": name, "slots": ["song"], "examples": ["play [song: so what]"]} for name in "abc"])
    out = tmp_path / "out"
    r = cli("run", "linguist", path, "-o", out, "--model", spec, "--requests", "1", "-q")
    assert r.exit_code == 0, r.output
    stats = json.loads((out / "stats.json").read_text())
    assert stats["stages"]["linguist.generate"]["dropped"] == {"empty_reply": 1, "truncated_line": 1, "backend_error": 1}
    assert stats["stages"]["linguist.generate"]["parse_failures"] == {"empty_reply": 1}
    [kept] = read_jsonl(out / "data.jsonl")
    assert kept["text"] == "play a song now" and kept["tags"] == ["O", "B-song", "I-song", "O"]
    report = stats["linguist"]["intents"]
    assert [(r["requests"], r["failed_requests"], r["generated"], r["parsed"], r["kept"]) for r in report.values()] == [
        (1, 1, 0, 0, 0), (1, 0, 2, 1, 1), (1, 1, 0, 0, 0)]
    assert report["a"]["dropped"] == {"empty_reply": 1} and report["c"]["dropped"] == {"backend_error": 1}
    assert report["b"]["parse_rate"] == 0.5 and report["a"]["parse_rate"] is None


def test_copied_examples_are_dropped_and_a_rerun_resumes_with_the_same_result(cli, scripted, tmp_path):
    lines = "- play [1 so what ]\n- PLAY [1 So What ]!\n- play [1 freddie freeloader ] loud"
    backend, spec = scripted(default=lines)
    path = write_jsonl(tmp_path / "s.jsonl", [{"intent": "play", "slots": ["song"], "examples": ["play [song: so what]"]}])
    out = tmp_path / "out"
    args = ("run", "linguist", path, "-o", out, "--model", spec, "--requests", "2", "-q")
    assert cli(*args).exit_code == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["stages"]["linguist.generate"]["dropped"] == {"copied_example": 4}
    assert stats["stages"]["linguist.generate"]["dropped_at_end"] == {"duplicate": 1}
    [kept] = read_jsonl(out / "data.jsonl")
    assert kept["meta"]["id"] == "play#0~2"
    before = (out / "candidates.jsonl").read_text()
    calls = len(backend.history)
    assert cli(*args).exit_code == 0
    assert (out / "candidates.jsonl").read_text() == before and len(backend.history) == calls


def test_a_run_continued_from_fewer_intents_equals_a_fresh_run(cli, scripted, tmp_path):
    backend, spec = scripted(default=obedient)
    spec_path = EXAMPLES / "linguist" / "intents.jsonl"
    base = ("--model", spec, "--requests", "2", "-q")
    assert cli("run", "linguist", spec_path, "-o", tmp_path / "a", "--limit", "2", *base).exit_code == 0
    assert cli("run", "linguist", spec_path, "-o", tmp_path / "a", *base).exit_code == 0  # continues with the other intents
    assert cli("run", "linguist", spec_path, "-o", tmp_path / "b", "--no-cache", *base).exit_code == 0

    def shape(out):
        return [(d["meta"]["id"], d["text"], d["spans"], d["tags"]) for d in read_jsonl(out / "data.jsonl")]

    assert shape(tmp_path / "a") == shape(tmp_path / "b") and shape(tmp_path / "a")
    a, b = (json.loads((tmp_path / x / "stats.json").read_text()) for x in "ab")
    assert a["linguist"] == b["linguist"]
    assert a["stages"]["linguist.generate"]["dropped_at_end"] == b["stages"]["linguist.generate"]["dropped_at_end"] == {"duplicate": 6}


def test_declared_fields_are_there_when_the_stage_runs(cli, scripted, registry, tmp_path):
    from btkit.hookspecs import hookimpl

    class Spy:
        def __init__(self):
            self.before, self.after = [], []

        @hookimpl
        def btkit_before_stage(self, record, stage, run):
            self.before.append(set(record.fields))

        @hookimpl
        def btkit_after_stage(self, record, stage, run):
            self.after.append(set(record.fields))

    spy = Spy()
    registry.register(spy, name="linguist-field-spy")
    backend, spec = scripted(default=obedient)
    r = cli("run", "linguist", EXAMPLES / "linguist" / "intents.jsonl", "-o", tmp_path / "out", "--model", spec, "--requests", "1", "-q")
    assert r.exit_code == 0, r.output
    [info] = METHOD.stages
    assert len(spy.before) == 5 and spy.after
    for fields in spy.before:
        assert set(info.inputs) <= fields and set(METHOD.unit_fields) == fields
    for fields in spy.after:  # the after-stage hook sees the live records: every one has the declared outputs
        assert set(info.outputs) <= fields


def test_pipeline_file_checks(cli):
    r = cli("run", str(EXAMPLES / "pipelines" / "linguist.yaml"), "--check")
    assert r.exit_code == 0, r.output
    assert "linguist.generate" in r.output


def test_report_counts_stages_from_journal_lines():
    lines = [
        {"unit": "a#0", "status": "dropped", "dropped_at": "linguist.generate", "reason": "backend_error", "fields": {"intent": "a", "examples": []}},
        {"unit": "a#1", "status": "kept", "fields": {"intent": "a", "annotated": "x", "spans": []}},
        {"unit": "a#1", "status": "dropped", "dropped_at": "linguist.generate", "reason": "unbalanced_brackets", "fields": {"intent": "a", "annotated": "x["}},
        {"unit": "a#1", "status": "dropped", "dropped_at": "linguist.generate", "reason": "missing_slot", "fields": {"intent": "a", "annotated": "y"}},
        {"unit": "a#1", "status": "dropped", "dropped_at": "linguist.generate", "reason": "duplicate", "fields": {"intent": "a", "annotated": "x"}},
    ]
    assert intent_report(lines)["a"] == {"requests": 2, "failed_requests": 1, "generated": 4, "parsed": 3, "label_valid": 2, "kept": 1,
                                         "dropped": {"backend_error": 1, "duplicate": 1, "missing_slot": 1, "unbalanced_brackets": 1},
                                         "parse_rate": 0.75, "label_valid_share": 0.6667}


def test_benchmark_runs_and_reports_cpu_per_record_outside_model_calls():
    """benchmarks/bench_linguist.py (issue 13's < 1 ms per record) on a few hundred lines, so it cannot rot."""
    bench = EXAMPLES.parent / "benchmarks" / "bench_linguist.py"
    proc = subprocess.run([sys.executable, str(bench), "--records", "300", "--requests", "6"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout[:proc.stdout.rindex("}") + 1])
    assert figures["records"] == 300 and 0 < figures["kept"] < 300 and figures["outside_calls"] > 0
    assert {"unbalanced_brackets", "missing_slot", "unknown_slot", "not_an_utterance"} <= set(figures["drops"])
    assert "ms CPU per record outside model calls over 300 records" in proc.stdout


# -- the embedded model ---------------------------------------------------------------------------------------------
@pytest.mark.model
def test_linguist_with_embedded_model(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "btkit.cli", "run", "linguist", str(EXAMPLES / "linguist" / "intents.jsonl"), "-o", str(out),
           "--limit", "2", "--requests", "1", "--per-request", "3", "--shots", "3", "--max-tokens", "96", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for name in ("data.jsonl", "candidates.jsonl", "stats.json"):
        assert (out / name).is_file()
    cands = read_jsonl(out / "candidates.jsonl")
    assert {c["source_id"] for c in cands} == {"play_song", "add_to_playlist"}
    for c in cands:
        assert (c["status"] == "kept") == (c["reason"] is None)
        if c["status"] == "dropped":
            assert c["dropped_at"] == "linguist.generate" and c["reason"]
    for d in read_jsonl(out / "data.jsonl"):
        assert_valid_line(d)
    stats = json.loads((out / "stats.json").read_text())
    assert list(stats["stages"]) == ["linguist.generate"] and stats["records"] == len(cands)
    report = stats["linguist"]
    assert report["totals"]["requests"] == 2 and report["totals"]["kept"] == stats["kept"]
