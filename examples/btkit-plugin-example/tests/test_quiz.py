"""The quiz method: its template, its parser, its filter, driven by a scripted backend."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from btkit.backends import Completion
from btkit.methods import ParseError
from btkit.testing import read_jsonl, write_jsonl
from btkit_example_plugin.quiz import parse_question

PASSAGE = "Honey bees communicate the direction of flowers with a waggle dance. " * 3


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "corpus.jsonl", [{"id": "bees", "text": PASSAGE}, {"id": "more", "text": PASSAGE + "They also smell."}])


@pytest.mark.parametrize("reply, question", [
    ("What does the waggle dance tell?", "What does the waggle dance tell?"),
    ("\n  Question: Why do bees dance?\nBecause...", "Why do bees dance?"),
    ('"Where are the flowers?"', "Where are the flowers?"),
])
def test_the_parser_takes_the_first_line_without_label_or_quotes(reply, question):
    assert parse_question(reply) == question


@pytest.mark.parametrize("reply", [None, "", "  \n\n", 'Question: ""'])
def test_an_empty_reply_is_a_parse_error(reply):
    with pytest.raises(ParseError) as e:
        parse_question(reply)
    assert e.value.reason == "empty_reply"


def test_questions_are_kept_and_non_questions_dropped_by_the_filter(cli, scripted, corpus, tmp_path):
    backend, spec = scripted(replies=["Question: What does the waggle dance tell other bees?", "Bees dance."])
    r = cli("run", "quiz", corpus, "-o", tmp_path / "out", "--model", spec, "-q")
    assert r.exit_code == 0, r.output
    prompt = backend.history[0]["messages"]
    assert prompt[0]["role"] == "system" and "quiz questions" in prompt[0]["content"]
    assert "Write one quiz question" in prompt[-1]["content"] and PASSAGE.strip() in prompt[-1]["content"]
    cands = read_jsonl(tmp_path / "out" / "candidates.jsonl")
    assert [(c["id"], c["status"], c.get("reason")) for c in cands] == [("bees", "kept", None), ("more", "dropped", "not_a_question")]
    assert cands[1]["dropped_at"] == "quiz.ask"
    pair = read_jsonl(tmp_path / "out" / "data.jsonl")[0]
    assert pair["instruction"] == "What does the waggle dance tell other bees?" and pair["response"] == PASSAGE
    step = pair["meta"]["lineage"][0]
    assert step["template"] == "quiz/ask" and step["parsed"] == "What does the waggle dance tell other bees?"
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["dropped_by_reason"] == {"quiz.ask:not_a_question": 1}


def test_an_unparseable_reply_is_dropped_with_its_reason_or_resampled(cli, scripted, corpus, tmp_path):
    _, spec = scripted(default="")
    r = cli("run", "quiz", corpus, "-o", tmp_path / "out", "--model", spec, "-q")
    assert r.exit_code == 0, r.output
    cands = read_jsonl(tmp_path / "out" / "candidates.jsonl")
    assert [c["reason"] for c in cands] == ["question_empty_reply", "question_empty_reply"]

    asked: Counter[str] = Counter()

    def empty_first(messages, params):
        """Each passage's first reply is empty, the re-sample a question (calls may come in any order)."""
        doc = "more" if "They also smell" in messages[-1]["content"] else "bees"
        asked[doc] += 1
        return "" if asked[doc] == 1 else f"What about the {doc}?"

    _, spec = scripted(default=empty_first)
    r = cli("run", "quiz", corpus, "-o", tmp_path / "retried", "--model", spec, "--parse-retries", "1", "-q")
    assert r.exit_code == 0, r.output
    pairs = read_jsonl(tmp_path / "retried" / "data.jsonl")
    assert [p["instruction"] for p in pairs] == ["What about the bees?", "What about the more?"]
    for pair in pairs:  # both attempts are in the lineage
        assert [step.get("parse_error") for step in pair["meta"]["lineage"]] == ["empty_reply", None]


def test_a_reply_cut_at_max_tokens_is_never_a_question(cli, scripted, corpus, tmp_path):
    cut = Completion(text="What does the waggle", finish_reason="length")
    _, spec = scripted(replies=[cut, cut])
    r = cli("run", "quiz", corpus, "-o", tmp_path / "out", "--model", spec, "-q")
    assert r.exit_code == 0, r.output
    assert {c["reason"] for c in read_jsonl(tmp_path / "out" / "candidates.jsonl")} == {"question_truncated"}
