"""Kun: golden prompts, the reference-word filter (English, Chinese, configurable), the good/bad judge,
the post-filters each with its reason, the paper's decoding, and a real-model run."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from btkit.prompts import PromptLibrary
from btkit_plugins.methods.kun import (DEFAULT_REFERENCE_WORDS, KUN_SAMPLING, compile_reference_words, find_reference,
                               postfilter_reason, repetition_ratio)

from conftest import EXAMPLES, read_jsonl, words, write_jsonl

SEED = [{"instruction": "How do I list hidden files?", "response": "Use ls -a: the -a flag includes entries whose names start with a dot."}]
TEXT = "The dpkg tool installs a single .deb file.\n\nThe apt tool resolves dependencies and downloads them."


CASES = {
    "augment": ("kun/augment", {"text": TEXT, "examples": SEED}),
    "judge_rubric": ("kun/judge", {"instruction": "How does apt differ from dpkg?", "mode": "rubric"}),
    "judge_logprob": ("kun/judge", {"instruction": "How does apt differ from dpkg?", "mode": "logprob"}),
    "polish": ("kun/polish", {"instruction": "How does apt differ from dpkg?", "text": TEXT}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_kun_prompts(registry, golden, case):
    name, variables = CASES[case]
    golden(f"kun/{case}.txt", PromptLibrary(registry.prompt_roots()).render(name, variables))


def test_polish_grounds_the_answer_in_the_text(registry):
    p = PromptLibrary(registry.prompt_roots()).render(*CASES["polish"])
    user = p.messages[-1]["content"]
    assert user.startswith("Given:") and TEXT in user and user.rstrip().endswith("How does apt differ from dpkg?")


# -- the reference-word filter ------------------------------------------------------------------
PATTERNS = compile_reference_words(DEFAULT_REFERENCE_WORDS)


@pytest.mark.parametrize("instruction,word", [
    ("Summarize the article about package management.", "summarize"),
    ("According to the passage, what does apt do?", "according to"),
    ("What does the author say about dpkg?", "the author"),
    ("Explain the following text in simple words.", "following text"),
    ("What is discussed in this   Passage?", "this passage"),
    ("Visit the website and describe it.", "the website"),
    ("Write a summary of the main points.", "summary"),  # the paper's bare words
    ("Which website does this come from?", "website"),
    ("Open the link and list what it shows.", "the link"),
    ("根据文章内容，apt 和 dpkg 有什么区别？", "文章"),
    ("请总结这段文字的主要观点。", "这段文字"),
])
def test_instructions_pointing_at_the_text_are_caught(instruction, word):
    assert find_reference(instruction, PATTERNS) is not None
    assert find_reference(instruction, compile_reference_words([word])) == word


@pytest.mark.parametrize("instruction", [
    "How do I edit a text file with vim?",
    "What is the difference between a hard link and a symbolic link?",
    "How does apt resolve package dependencies?",
    "如何在 Debian 上安装软件包？",
    "Write a short context-free grammar for arithmetic.",
])
def test_standalone_instructions_pass(instruction):
    assert find_reference(instruction, PATTERNS) is None


# -- post-filters -------------------------------------------------------------------------------
GOOD = "apt resolves dependencies and downloads them, while dpkg installs a single package file you already have."


@pytest.mark.parametrize("response,reason", [
    ("Use apt.", "too_short"),
    ("As an AI language model, I think apt resolves dependencies for you.", "self_reference"),
    ("作为一个人工智能，我认为 apt 会自动解决依赖关系的问题。", "self_reference"),
    ("According to the text, apt resolves dependencies and downloads them for you.", "refers_to_text"),
    ("根据文章，apt 会自动解决依赖关系并下载所需的软件包。", "refers_to_text"),
    ("I'm sorry, but I cannot explain how apt works in detail here.", "apology"),
    ("抱歉，我无法回答这个关于软件包管理的问题，请换个问题。", "apology"),
    ("apt resolves dependencies. " * 12, "repetitive"),
])
def test_postfilter_reasons(response, reason):
    found = postfilter_reason(response)
    assert found is not None and found[0] == reason


def test_postfilter_keeps_a_good_answer_and_thresholds_are_settings():
    assert postfilter_reason(GOOD) is None
    assert postfilter_reason("Use apt here.", min_chars=5) is None
    assert repetition_ratio(GOOD) == 0.0
    assert repetition_ratio("a b c d " * 10) > 0.8


# -- whole runs on a scripted backend ---------------------------------------------------------------
def kun_reply(table):
    """Replies keyed by which document (word offset) the prompt holds; units run concurrently."""
    def reply(messages, params):
        content = messages[-1]["content"]
        for marker, (instruction, verdict, answer) in table.items():
            if marker in content or instruction in content:
                if content.startswith("Given:"):
                    return answer
                if "Reply with one word: good or bad" in content:
                    return verdict
                return instruction
        raise AssertionError(f"unexpected prompt: {content[:200]}")
    return reply


def test_run_counts_every_drop_by_reason(cli, scripted, tmp_path):
    table = {
        words(1, 0): ("How does apt differ from dpkg when installing packages?", "good", GOOD),
        words(1, 100): ("Summarize the article in three sentences.", "good", GOOD),
        words(1, 200): ("Do the thing with it now?", "bad", GOOD),
        words(1, 300): ("What does apt install by default on Debian?", "good", "As an AI, I cannot know what your apt installs by default."),
        words(1, 400): ("Which tool resolves package dependencies on Debian?", "good", "It is apt. " * 10),
        words(1, 500): ("Which command lists the files of an installed package?", "Hmm, hard to say.", GOOD),
    }
    backend, spec = scripted(default=kun_reply(table))
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": words(60, i * 100)} for i in range(6)])
    out = tmp_path / "out"
    r = cli("run", "kun", corpus, "-o", out, "--model", spec, "--judge-mode", "rubric", "-q")
    assert r.exit_code == 0, r.output
    [row] = read_jsonl(out / "data.jsonl")
    assert row["instruction"] == "How does apt differ from dpkg when installing packages?"
    assert row["response"] == GOOD and row["meta"]["original_response"] == words(60, 0)
    assert [s["stage"] for s in row["meta"]["lineage"]] == ["kun.augment", "kun.judge", "kun.polish"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dropped_by_reason"] == {
        "kun.filter:refers_to_text": 1, "kun.judge:judged_bad": 1, "kun.judge:unparseable_verdict": 1,
        "kun.postfilter:self_reference": 1, "kun.postfilter:repetitive": 1,
    }
    cands = {c["id"]: c for c in read_jsonl(out / "candidates.jsonl")}
    assert cands["d1#0"]["meta"]["drop_details"] == {"word": "the article"}
    assert cands["d5#0"]["lineage"][-1]["parse_error"] == "no_verdict"
    generation = [h["params"] for h in backend.history if "Reply with one word" not in h["messages"][-1]["content"]]
    assert generation and all(p["temperature"] == 0.5 and p["top_p"] == 0.95 and p["repetition_penalty"] == 1.2 for p in generation)
    assert KUN_SAMPLING == {"temperature": 0.5, "top_p": 0.95, "repetition_penalty": 1.2}


def test_bare_paper_words_trade_standalone_requests_for_recall():
    """What the comment on REFERENCE_WORDS_EN says: bare "website"/"summary" drop some standalone requests."""
    assert find_reference("How do I build a personal website with HTML?", PATTERNS) == "website"
    assert find_reference("How do I build a personal website with HTML?", compile_reference_words(["according to"])) is None


def test_default_list_drops_text_pointing_instructions_and_a_custom_list_replaces_it(cli, scripted, tmp_path):
    table = {
        words(1, 0): ("Summarize the article in three sentences.", "good", GOOD),
        words(1, 100): ("How do I build a personal website with HTML?", "good", GOOD),
        words(1, 200): ("Describe the diagram in detail for a student.", "good", GOOD),
    }
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": words(60, i * 100)} for i in range(3)])

    def run(out, *extra):
        backend, spec = scripted(default=kun_reply(table), logprobs={"good": -0.1, "bad": -3.0})
        r = cli("run", "kun", corpus, "-o", out, "--model", spec, "-q", *extra)
        assert r.exit_code == 0, r.output
        return {c["source_id"]: c for c in read_jsonl(out / "candidates.jsonl")}

    default = run(tmp_path / "default")
    assert {k: (c["reason"], c["meta"].get("drop_details")) for k, c in default.items()} == {
        "d0": ("refers_to_text", {"word": "the article"}), "d1": ("refers_to_text", {"word": "website"}), "d2": (None, None)}
    custom = run(tmp_path / "custom", "--reference-words", "diagram, according to")
    assert {k: (c["reason"], c["meta"].get("drop_details")) for k, c in custom.items()} == {
        "d0": (None, None), "d1": (None, None), "d2": ("refers_to_text", {"word": "diagram"})}
    stats = json.loads((tmp_path / "custom" / "stats.json").read_text())
    assert stats["dropped_by_reason"] == {"kun.filter:refers_to_text": 1}


def test_reference_words_are_configurable(cli, scripted, tmp_path):
    table = {words(1, 0): ("Summarize the article in three sentences.", "good", GOOD)}
    backend, spec = scripted(default=kun_reply(table), logprobs={"good": -0.1, "bad": -3.0})
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": words(60)}])
    r = cli("run", "kun", corpus, "-o", tmp_path / "out", "--model", spec, "--reference-words", "according to,根据", "-q")
    assert r.exit_code == 0, r.output
    [row] = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert row["meta"]["judge"]["verdict_mode"] == "logprob" and row["meta"]["judge"]["p_good"] > 0.9


def test_unparseable_verdict_is_resampled_with_parse_retries(cli, scripted, tmp_path):
    verdicts = ["Hard to say.", "good"]
    table = {words(1, 0): ("How does apt differ from dpkg when installing packages?", None, GOOD)}

    def reply(messages, params):
        if "Reply with one word: good or bad" in messages[-1]["content"]:
            return verdicts.pop(0)
        return kun_reply(table)(messages, params)

    backend, spec = scripted(default=reply)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": words(60)}])
    r = cli("run", "kun", corpus, "-o", tmp_path / "out", "--model", spec, "--judge-mode", "rubric", "--parse-retries", "1", "-q")
    assert r.exit_code == 0, r.output
    [row] = read_jsonl(tmp_path / "out" / "data.jsonl")
    judged = [s for s in row["meta"]["lineage"] if s["stage"] == "kun.judge"]
    assert [(s.get("attempt"), s.get("parse_error")) for s in judged] == [(None, "no_verdict"), (1, None)]
    assert judged[1]["parsed"] == {"verdict": "good"} and row["meta"]["judge"] == {"verdict_mode": "rubric"}
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["parse_retries"] == 1 and stats["stages"]["kun.judge"]["parse_retries_recovered"] == 1


def test_truncated_or_filtered_verdicts_keep_their_reason(cli, scripted, tmp_path):
    """A verdict cut after its label still counts (the label comes first); cut before it, or filtered, it fails with that reason."""
    from btkit.backends import Completion

    table = {words(1, 0): ("How does apt differ from dpkg when installing packages?", Completion(text="good, because it is",
                                                                                                  finish_reason="length"), GOOD),
             words(1, 100): ("Which tool resolves package dependencies on Debian?", Completion(text="good", finish_reason="content_filter"), GOOD),
             words(1, 200): ("What does apt-get autoremove do on Debian?", Completion(text="The instruction is", finish_reason="length"), GOOD)}
    backend, spec = scripted(default=kun_reply(table))
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": words(60, i * 100)} for i in range(3)])
    r = cli("run", "kun", corpus, "-o", tmp_path / "out", "--model", spec, "--judge-mode", "rubric", "-q")
    assert r.exit_code == 0, r.output
    cands = {c["source_id"]: c for c in read_jsonl(tmp_path / "out" / "candidates.jsonl")}
    judged = next(s for s in cands["d0"]["lineage"] if s["stage"] == "kun.judge")
    assert judged["parsed"] == {"verdict": "good"} and judged["finish_reason"] == "length" and judged["accepted_truncated"]
    assert cands["d0"]["dropped_at"] != "kun.judge"
    assert cands["d1"]["reason"] == "unparseable_verdict" and cands["d1"]["meta"]["judge"]["verdict_error"] == "content_filter"
    assert cands["d2"]["reason"] == "unparseable_verdict" and cands["d2"]["meta"]["judge"]["verdict_error"] == "truncated"
    assert sum(h["kind"] == "chat" for h in backend.history) >= 6  # nothing retried without --parse-retries


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_judge_logprobs_are_a_counted_failure_not_a_bad_verdict(cli, scripted, tmp_path, bad):
    table = {words(1, 0): ("How does apt differ from dpkg when installing packages?", "good", GOOD)}
    backend, spec = scripted(default=kun_reply(table), logprobs={"good": bad, "bad": -3.0})
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": words(60)}])
    r = cli("run", "kun", corpus, "-o", tmp_path / "out", "--model", spec, "--judge-mode", "logprob", "-q")
    assert r.exit_code == 0, r.output
    [cand] = read_jsonl(tmp_path / "out" / "candidates.jsonl")
    assert cand["dropped_at"] == "kun.judge" and cand["reason"] == "unparseable_verdict"  # not "judged_bad"
    assert cand["meta"]["judge"] == {"verdict_mode": "logprob", "verdict_error": "invalid_logprobs"}
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["dropped_by_reason"] == {"kun.judge:unparseable_verdict": 1}


def test_nan_perplexity_does_not_keep_the_text(cli, scripted, tmp_path):
    backend, spec = scripted(default="How are the listed words ordered?", logprobs={"good": -0.1, "bad": -3.0},
                             continuation_logprobs=lambda m, text: [-0.5, math.nan, -0.5])
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": words(60)}])
    r = cli("run", "kun", corpus, "-o", tmp_path / "out", "--model", spec, "--max-perplexity", "100", "-q")
    assert r.exit_code == 0, r.output
    [cand] = read_jsonl(tmp_path / "out" / "candidates.jsonl")
    assert cand["dropped_at"] == "kun.perplexity" and cand["reason"] == "invalid_logprobs"


@pytest.mark.model
def test_kun_with_embedded_model(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "btkit.cli", "run", "kun", str(EXAMPLES / "corpus.jsonl"), "-o", str(out), "--limit", "2",
           "--shots", "1", "--max-tokens", "48", "--max-perplexity", "1000", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for name in ("data.jsonl", "candidates.jsonl", "stats.json"):
        assert (out / name).is_file()
    cands = read_jsonl(out / "candidates.jsonl")
    assert len({c["source_id"] for c in cands}) == 2
    for c in cands:
        assert (c["status"] == "kept") == (c["reason"] is None)
        if c["status"] == "dropped":
            assert c["dropped_at"].split(".")[0] == "kun" and c["reason"]
        judged = [s for s in c["lineage"] if s["stage"] == "kun.judge"]
        if judged:  # the embedded model reads P(good)/P(bad) in one forward pass
            assert judged[0]["kind"] == "next_token_logprobs" and c["meta"]["judge"]["verdict_mode"] == "logprob"
    for row in read_jsonl(out / "data.jsonl"):
        assert len(row["response"]) >= 20 and row["meta"]["original_response"]
    measured = [c["meta"]["perplexity"] for c in cands if "perplexity" in c["meta"]]
    assert len(measured) == 2 and all(1 < p < 1000 for p in measured)  # real text is far more likely than chance
    stats = json.loads((out / "stats.json").read_text())
    assert list(stats["stages"]) == ["kun.perplexity", "kun.augment", "kun.filter", "kun.judge", "kun.polish", "kun.postfilter"]
    assert stats["records"] == len(cands) == stats["kept"] + stats["dropped"]


def test_logprob_judge_on_a_backend_without_logprobs_stops_before_any_call(cli, registry, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": words(60)}])
    r = cli("run", "kun", corpus, "-o", tmp_path / "out", "--model", "echo:What is this list about?", "--judge-mode", "logprob", "-q")
    assert r.exit_code == 2
    assert "cannot do 'next_token_logprobs'" in r.output and "--judge-mode rubric" in r.output
    assert not (tmp_path / "out" / "candidates.jsonl").exists()


def test_perplexity_filter_drops_unlikely_text(cli, scripted, tmp_path):
    def continuation(messages, text):
        assert messages is None  # the text alone, unconditionally
        return [-0.5] * 10 if "alpha0" in text else [-6.0] * 10  # perplexity e^0.5 vs e^6

    backend, spec = scripted(default="How are the listed words ordered?", logprobs={"good": -0.1, "bad": -3.0},
                             continuation_logprobs=continuation)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": words(60)}, {"id": "d1", "text": words(60, 500)}])
    r = cli("run", "kun", corpus, "-o", tmp_path / "out", "--model", spec, "--max-perplexity", "100", "-q")
    assert r.exit_code == 0, r.output
    cands = {c["id"]: c for c in read_jsonl(tmp_path / "out" / "candidates.jsonl")}
    assert cands["d1#0"]["reason"] == "perplexity_too_high" and cands["d1#0"]["dropped_at"] == "kun.perplexity"
    assert cands["d1#0"]["meta"]["drop_details"] == {"perplexity": round(math.exp(6), 3), "max_perplexity": 100.0}
    assert cands["d0#0"]["meta"]["perplexity"] == round(math.exp(0.5), 3)


def test_no_perplexity_call_by_default(cli, scripted, tmp_path):
    backend, spec = scripted(default="How are the listed words ordered?", logprobs={"good": -0.1, "bad": -3.0})
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": words(60)}])
    assert cli("run", "kun", corpus, "-o", tmp_path / "out", "--model", spec, "-q").exit_code == 0
    assert not any(h["kind"] == "score_continuation" for h in backend.history)


def test_zero_valued_options_stay_zero_and_defaults_come_from_the_options(registry):
    kun = registry.method("kun")
    post = kun.stage_with_defaults("postfilter", {"min_response_chars": 0, "max_repetition": 0})
    assert (post.min_chars, post.max_repetition) == (0, 0.0)
    assert kun.stage_with_defaults("augment", {"shots": 0}).shots == 0
    defaults = kun.stage_with_defaults("postfilter", {})
    assert (defaults.min_chars, defaults.max_repetition) == (20, 0.3)
