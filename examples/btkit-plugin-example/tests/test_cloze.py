"""The cloze: backend: its rule, its spec, its capabilities, and the quiz method run through it."""

from __future__ import annotations

import asyncio

import pytest

from btkit.backends import CHAT, NEXT_TOKEN_LOGPROBS
from btkit.errors import BtkitError, CapabilityError
from btkit.testing import read_jsonl, write_jsonl
from btkit_example_plugin.cloze import cloze_question

BEES = "Bees dance. Honey bees communicate the direction of flowers with a waggle dance. They also smell."


def test_the_rule_blanks_the_longest_word_of_the_first_sentence_that_has_one():
    assert cloze_question(BEES) == 'Which word fills the blank: "Honey bees ____ the direction of flowers with a waggle dance"?'
    assert cloze_question(BEES, min_length=12) is None  # "communicate" has 11 letters
    assert cloze_question(BEES, min_length=5) == 'Which word fills the blank: "Bees ____"?'
    assert cloze_question("Go to it. Be so.") is None


def test_the_backend_is_registered_chat_only_and_checks_its_spec(registry):
    backend = registry.make_backend("cloze:")
    assert backend.capabilities == frozenset({CHAT}) and backend.min_length == 6
    with pytest.raises(CapabilityError, match="backend 'cloze:' cannot do 'next_token_logprobs'"):
        backend.require(NEXT_TOKEN_LOGPROBS, "a logprob judge")
    assert registry.make_backend("cloze:8").identity() != backend.identity()  # the cache keeps their replies apart
    for bad in ("cloze:x", "cloze:0", "cloze:-3"):
        with pytest.raises(BtkitError, match="whole number >= 1"):
            registry.make_backend(bad)


def test_a_reply_longer_than_max_tokens_is_cut_and_says_so(registry):
    backend = registry.make_backend("cloze:")
    messages = [{"role": "user", "content": BEES}]
    full = asyncio.run(backend.chat(messages, {}))
    cut = asyncio.run(backend.chat(messages, {"max_tokens": 3}))
    assert full.finish_reason == "stop" and full.ok
    assert (cut.text, cut.finish_reason, cut.completion_tokens, cut.ok) == ("Which word fills", "length", 3, False)


def test_quiz_runs_end_to_end_on_the_cloze_backend(cli, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "bees", "text": BEES}, {"id": "short", "text": "Go to it. Be so."}])
    r = cli("run", "quiz", corpus, "-o", tmp_path / "out", "--model", "cloze:", "-q")
    assert r.exit_code == 0, r.output
    cands = {c["id"]: c for c in read_jsonl(tmp_path / "out" / "candidates.jsonl")}
    assert cands["bees"]["fields"]["instruction"] == cloze_question(BEES)  # the passage came out of the template's quoting
    assert cands["short"]["reason"] == "not_a_question"  # "I found no word to blank." meets the filter
    assert [p["instruction"] for p in read_jsonl(tmp_path / "out" / "data.jsonl")] == [cloze_question(BEES)]

    r = cli("run", "quiz", corpus, "-o", tmp_path / "cut", "--model", "cloze:", "-S", "ask.max_tokens=3", "-q")
    assert r.exit_code == 0, r.output
    assert {c["reason"] for c in read_jsonl(tmp_path / "cut" / "candidates.jsonl")} == {"question_truncated"}


def test_a_bad_spec_stops_the_run_before_any_call(cli, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "bees", "text": BEES}])
    r = cli("run", "quiz", corpus, "-o", tmp_path / "out", "--model", "cloze:many", "-q")
    assert r.exit_code != 0
    assert "cloze: takes the shortest word length to blank" in r.output
    assert not (tmp_path / "out" / "candidates.jsonl").exists()
