"""AIR: golden prompts, the score and constraint parsers, the refinement loop (added, duplicate, None,
unparseable, merge fallback) with every round kept, and a real-model run."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from btkit.methods import ParseError
from btkit.prompts import PromptLibrary
from btkit_plugins.methods.air import parse_constraint, parse_points

from conftest import EXAMPLES, read_jsonl, words, write_jsonl

DOC = "To list hidden files, run ls -a.\n\n1. Open a terminal.\n2. Type ls -a and press Enter.\n\nNames that start with a dot are hidden."


CASES = {
    "augment": ("air/augment", {"text": DOC}),
    "score_rubric": ("air/score", {"instruction": "How do I list hidden files in Linux?", "mode": "rubric"}),
    "score_logprob": ("air/score", {"instruction": "How do I list hidden files in Linux?", "mode": "logprob"}),
    "answer": ("air/answer", {"instruction": "How do I list hidden files in Linux?"}),
    "judge": ("air/judge", {"instruction": "How do I list hidden files in Linux?", "document": DOC,
                            "answer": "Use the ls command.", "constraints": []}),
    "judge_with_constraints": ("air/judge", {"instruction": "How do I list hidden files in Linux? Give numbered steps.", "document": DOC,
                                             "answer": "1. Open a terminal. 2. Run ls.", "constraints": ["Present the procedure as numbered steps."]}),
    "merge": ("air/merge", {"instruction": "How do I list hidden files in Linux?", "constraint": "Present the procedure as short numbered steps."}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_air_prompts(registry, golden, case):
    name, variables = CASES[case]
    golden(f"air/{case}.txt", PromptLibrary(registry.prompt_roots()).render(name, variables))


@pytest.mark.parametrize("reply,score", [
    ("1. yes\n2. yes\n3. yes\n4. yes\n5. no\nScore: 4", 4),
    ("All five criteria hold.\n**Score:** 5", 5),
    ("It points at an attachment and is unclear.\nScore: 0", 0),
    ("Score: 0/5", 0),
    ("3", 3),
])
def test_additive_score_parser(reply, score):
    assert parse_points(reply) == score


@pytest.mark.parametrize("reply,reason", [
    ("", "empty_reply"), ("Looks fine.", "no_score"), ("Score: 7", "out_of_range"), ("Score: 4.5", "not_integer"),
    ("Score: 3-4", "range"), ("Score: 4\nScore: 0", "ambiguous_score"), ("Score: 0\nScore: 4", "ambiguous_score"),
])
def test_additive_score_parser_refuses(reply, reason):
    with pytest.raises(ParseError) as e:
        parse_points(reply)
    assert e.value.reason == reason


@pytest.mark.parametrize("reply,expected", [
    ("Analysis: The answer gives no steps.\nConstraint: Present the procedure as short numbered steps a beginner can follow.",
     "Present the procedure as short numbered steps a beginner can follow."),
    ("**Analysis**: misses the dot rule.\n**Selected Type**: Inclusion\n**Constraint**: Explain that names starting with a dot are hidden.",
     "Explain that names starting with a dot are hidden."),
    ("Analysis: The answer covers everything.\nConstraint: None", None),
    ("Constraint: None.", None),
    ("None", None),
    ('Constraint: "Mention the -a flag of ls explicitly in the answer."', "Mention the -a flag of ls explicitly in the answer."),
])
def test_constraint_parser(reply, expected):
    assert parse_constraint(reply) == expected


@pytest.mark.parametrize("reply,reason", [
    ("", "empty_reply"),
    ("Analysis: the answer is short.\nIt should use steps.", "no_constraint_line"),
    ("Constraint: Steps.", "too_short"),
    ("Constraint: " + "very " * 50 + "long", "too_long"),
])
def test_constraint_parser_refuses(reply, reason):
    with pytest.raises(ParseError) as e:
        parse_constraint(reply)
    assert e.value.reason == reason


# -- the refinement loop on a scripted backend ----------------------------------------------------
C1 = "Present the procedure as short numbered steps a beginner can follow."
C1_DUP = "Present the procedure as short numbered steps that a beginner can follow."
C2 = "Explain that file names starting with a dot are hidden by default."
INITIAL = "How do I list hidden files in Linux?"


def air_script(judgments, merge=lambda ins, c: f"{ins} {c}"):
    """Judge replies consumed in order (one document per run), everything else by prompt shape."""
    judgments = list(judgments)

    def reply(messages, params):
        content = messages[-1]["content"]
        if "write a single instruction that would lead" in content:
            return INITIAL
        if "single most important requirement" in content:
            return judgments.pop(0)
        if "Merge the constraint into the instruction" in content:
            ins = content.split("<<<INSTRUCTION ")[1].split("\n", 1)[1].split("\nINSTRUCTION ")[0]
            con = content.split("<<<CONSTRAINT ")[1].split("\n", 1)[1].split("\nCONSTRAINT ")[0]
            return merge(ins, con)
        if messages[0]["content"] == "You are a helpful assistant.":
            return f"Answer number {params.get('seed')}: use ls."
        raise AssertionError(f"unexpected prompt: {content[:200]}")
    return reply


def run_air(cli, scripted, tmp_path, judgments, *extra, merge=None, score=4):
    kw = {"merge": merge} if merge else {}
    backend, spec = scripted(default=air_script(judgments, **kw), logprobs={str(score): -0.05, "1": -4.0})
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "doc", "text": DOC + " " + words(30)}])
    out = tmp_path / "out"
    r = cli("run", "air", corpus, "-o", out, "--model", spec, "-q", *extra)
    assert r.exit_code == 0, r.output
    return backend, out


def test_rounds_add_skip_duplicates_and_stop_at_none(cli, scripted, tmp_path):
    judgments = [f"Analysis: no steps.\nConstraint: {C1}", f"Analysis: same.\nConstraint: {C1_DUP}",
                 f"Analysis: no dot rule.\nConstraint: {C2}", "Analysis: complete.\nConstraint: None"]
    backend, out = run_air(cli, scripted, tmp_path, judgments)
    [row] = read_jsonl(out / "data.jsonl")
    assert row["instruction"] == f"{INITIAL} {C1} {C2}"
    segment = read_jsonl(out / "candidates.jsonl")[0]["fields"]["text"]
    assert row["response"] == segment and segment.startswith("To list hidden files")  # the response stays the document
    meta = row["meta"]
    assert meta["initial_instruction"] == INITIAL and meta["constraints"] == [C1, C2]
    assert [r["status"] for r in meta["rounds"]] == ["added", "duplicate", "added", "none"]
    assert meta["rounds"][1]["duplicate_of"] == C1 and meta["rounds"][1]["rouge_l"] > 0.6
    assert [r["instruction"] for r in meta["rounds"]] == [INITIAL, f"{INITIAL} {C1}", f"{INITIAL} {C1}", f"{INITIAL} {C1} {C2}"]
    assert [r["answer"] for r in meta["rounds"]] == [f"Answer number {i}: use ls." for i in (1, 2, 3, 4)]  # a seed per round
    assert meta["rounds"][0]["merge"] == "llm"
    assert meta["score"] == 4 and meta["score_mode"] == "logprob"
    judge_calls = [h for h in backend.history if h["kind"] == "chat" and "single most important requirement" in h["messages"][-1]["content"]]
    assert C1 in judge_calls[2]["messages"][-1]["content"]  # the judge sees the constraints already added
    assert all(h["params"]["temperature"] == 0.0 for h in judge_calls)


def test_rounds_are_capped(cli, scripted, tmp_path):
    judgments = [f"Constraint: {C1}", f"Constraint: {C2}", "Constraint: Keep the whole answer under sixty words in total length."]
    backend, out = run_air(cli, scripted, tmp_path, judgments, "--rounds", "2")
    [row] = read_jsonl(out / "data.jsonl")
    assert [r["status"] for r in row["meta"]["rounds"]] == ["added", "added"] and row["meta"]["constraints"] == [C1, C2]


def test_no_constraint_added_is_dropped_with_reason(cli, scripted, tmp_path):
    judgments = ["I cannot tell.\nMaybe more detail?", "Constraint: None"]
    backend, out = run_air(cli, scripted, tmp_path, judgments)
    [cand] = read_jsonl(out / "candidates.jsonl")
    assert cand["reason"] == "too_few_constraints" and cand["dropped_at"] == "air.refine"
    assert cand["meta"]["drop_details"]["statuses"] == ["unparseable_judgment", "none"]
    assert [r.get("error") for r in cand["fields"]["rounds"]] == ["no_constraint_line", None]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["stages"]["air.refine"]["parse_failures"] == {"no_constraint_line": 1}


def test_failed_merge_falls_back_to_appending(cli, scripted, tmp_path):
    judgments = [f"Constraint: {C1}", "Constraint: None"]
    backend, out = run_air(cli, scripted, tmp_path, judgments, merge=lambda ins, c: "Sorry, I cannot merge these.")
    [row] = read_jsonl(out / "data.jsonl")
    assert row["instruction"] == f"{INITIAL} {C1}"
    assert row["meta"]["rounds"][0]["merge"] == "append_fallback" and row["meta"]["rounds"][0]["merge_error"] == "refusal"


def test_low_score_is_dropped_before_refinement(cli, scripted, tmp_path):
    backend, out = run_air(cli, scripted, tmp_path, [], score=3)
    [cand] = read_jsonl(out / "candidates.jsonl")
    assert cand["reason"] == "below_threshold" and cand["dropped_at"] == "air.score" and cand["meta"]["drop_details"] == {"score": 3}
    assert len(backend.history) == 2  # augment and score only


def test_score_zero_is_a_score_not_a_failure(cli, scripted, tmp_path):
    def reply(messages, params):
        content = messages[-1]["content"]
        return INITIAL if "write a single instruction" in content else "Needs an attachment.\nScore: 0"

    backend, spec = scripted(default=reply)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "doc", "text": DOC + " " + words(30)}])
    r = cli("run", "air", corpus, "-o", tmp_path / "out", "--model", spec, "--judge-mode", "rubric", "-q")
    assert r.exit_code == 0, r.output
    [cand] = read_jsonl(tmp_path / "out" / "candidates.jsonl")
    assert cand["reason"] == "below_threshold" and cand["meta"]["score"] == 0


def score_script(score_replies):
    """Augment gives INITIAL; the rubric scorer's replies are consumed in order; refinement finds nothing."""
    score_replies = list(score_replies)

    def reply(messages, params):
        content = messages[-1]["content"]
        if "write a single instruction" in content:
            return INITIAL
        if "add one point for each criterion" in content:
            return score_replies.pop(0)
        if "single most important requirement" in content:
            return "Analysis: complete.\nConstraint: None"
        if messages[0]["content"] == "You are a helpful assistant.":
            return "Use ls -a."
        raise AssertionError(f"unexpected prompt: {content[:200]}")
    return reply


def run_score_only(cli, spec, tmp_path, *extra):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "doc", "text": DOC + " " + words(30)}])
    out = tmp_path / "out"
    r = cli("run", "air", corpus, "-o", out, "--model", spec, "--judge-mode", "rubric", "--threshold", "4",
            "--rounds", "1", "--min-constraints", "0", "-q", *extra)
    assert r.exit_code == 0, r.output
    return out


def test_unparseable_score_is_resampled_with_parse_retries(cli, scripted, tmp_path):
    backend, spec = scripted(default=score_script(["All criteria hold, it is great.", "1. yes\n2. yes\n3. yes\n4. yes\n5. no\nScore: 4"]))
    out = run_score_only(cli, spec, tmp_path, "--parse-retries", "1")
    [row] = read_jsonl(out / "data.jsonl")
    assert row["meta"]["score"] == 4 and row["meta"]["score_mode"] == "rubric"  # the retry's score
    steps = [s for s in row["meta"]["lineage"] if s["stage"] == "air.score"]
    assert [(s.get("attempt"), s.get("parse_error")) for s in steps] == [(None, "no_score"), (1, None)]
    assert steps[1]["parsed"] == {"score": 4} and steps[1]["retry_of"] == steps[0]["step"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["parse_retries"] == 1 and stats["stages"]["air.score"]["parse_retries_recovered"] == 1
    assert stats["stages"]["air.score"]["parse_failures"] == {"no_score": 1}


def test_unparseable_score_is_not_retried_by_default(cli, scripted, tmp_path):
    backend, spec = scripted(default=score_script(["All criteria hold, it is great.", "Score: 5"]))
    out = run_score_only(cli, spec, tmp_path)
    [cand] = read_jsonl(out / "candidates.jsonl")
    assert cand["reason"] == "unparseable_score" and cand["dropped_at"] == "air.score" and cand["meta"]["score_error"] == "no_score"
    assert sum("add one point" in h["messages"][-1]["content"] for h in backend.history) == 1
    stats = json.loads((out / "stats.json").read_text())
    assert stats["parse_retries"] == 0 and stats["stages"]["air.score"]["parse_failures"] == {"no_score": 1}


def test_content_filtered_score_reply_keeps_its_reason(cli, scripted, tmp_path):
    from btkit.backends import Completion

    backend, spec = scripted(default=score_script([Completion(text="Score: 5", finish_reason="content_filter")]))
    out = run_score_only(cli, spec, tmp_path)
    [cand] = read_jsonl(out / "candidates.jsonl")
    assert cand["meta"]["score_error"] == "content_filter" and cand["meta"].get("score") is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, 3.0])
def test_logprobs_that_are_not_log_probabilities_are_a_counted_failure(cli, scripted, tmp_path, bad):
    lp = {str(d): -2.0 for d in range(6)}
    lp["4"] = bad  # NaN mass used to make 4 (or any digit) look like the argmax
    backend, spec = scripted(default=lambda m, p: INITIAL, logprobs=lp)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "doc", "text": DOC + " " + words(30)}])
    out = tmp_path / "out"
    r = cli("run", "air", corpus, "-o", out, "--model", spec, "--judge-mode", "logprob", "--threshold", "0", "-q")
    assert r.exit_code == 0, r.output
    [cand] = read_jsonl(out / "candidates.jsonl")
    assert cand["status"] == "dropped" and cand["dropped_at"] == "air.score" and cand["reason"] == "unparseable_score"
    assert cand["meta"]["score_error"] == "invalid_logprobs" and "score" not in cand["meta"]
    assert cand["meta"]["drop_details"] == {"error": "invalid_logprobs"}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dropped_by_reason"] == {"air.score:unparseable_score": 1} and stats["kept"] == 0
    assert not any("single most important" in h["messages"][-1]["content"] for h in backend.history if h["kind"] == "chat")


@pytest.mark.model
def test_air_with_embedded_model(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "btkit.cli", "run", "air", str(EXAMPLES / "corpus.jsonl"), "-o", str(out), "--limit", "2",
           "--threshold", "0", "--rounds", "1", "--min-constraints", "0", "--max-tokens", "40",
           # room for the instruction: at 40 tokens every augment reply was cut off and nothing reached scoring
           "-S", "augment.max_tokens=128", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for name in ("data.jsonl", "candidates.jsonl", "stats.json"):
        assert (out / name).is_file()
    cands = read_jsonl(out / "candidates.jsonl")
    assert len({c["source_id"] for c in cands}) == 2
    scored_count = 0
    for c in cands:
        assert (c["status"] == "kept") == (c["reason"] is None)
        if c["status"] == "dropped":
            assert c["dropped_at"].startswith("air.") and c["reason"]
        stages = [s["stage"] for s in c["lineage"]]
        if "air.score" in stages:
            scored_count += 1
            # the embedded model scores by next-token logprobs: a distribution over every point value
            assert set(c["meta"]["score_dist"]) == {"0", "1", "2", "3", "4", "5"}
            # threshold 0 passes every score, so a scored candidate always goes on to refinement
            assert "air.refine" in stages, stages
    assert scored_count >= 1, [(c["id"], c.get("dropped_at"), c["reason"]) for c in cands]
    rows = read_jsonl(out / "data.jsonl")
    assert len(rows) == sum(c["status"] == "kept" for c in cands) >= 1
    for row in rows:
        rounds = row["meta"]["rounds"]
        assert len(rounds) == 1 and {"round", "instruction", "answer", "status"} <= set(rounds[0])
        assert row["meta"]["initial_instruction"] and row["response"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["records"] == len(cands) == stats["kept"] + stats["dropped"]


def test_zero_valued_options_stay_zero_and_defaults_come_from_the_options(registry):
    air = registry.method("air")
    assert air.stage_with_defaults("score", {"threshold": 0}).threshold == 0
    refine = air.stage_with_defaults("refine", {"min_constraints": 0, "dedup_threshold": 0})
    assert (refine.min_constraints, refine.dedup_threshold) == (0, 0.0)
    defaults = air.stage_with_defaults("refine", {})
    assert (defaults.rounds, defaults.min_constraints, defaults.merge) == (5, 1, "llm")
    assert air.stage_with_defaults("score", {}).threshold == 4
