"""Curate modes pmi and ifd, thresholds and keep-top-P%, through whole ``btkit run humpback`` runs.

Scripted runs give each document a known conditional and unconditional logprob list, so the
expected scores are exact; one run on the embedded model checks the same on real likelihoods.
"""

from __future__ import annotations

import json
import math

import pytest

from btkit.backends import CHAT, NEXT_TOKEN_LOGPROBS

from conftest import EXAMPLES, read_jsonl, words, write_jsonl

#: Per document: how much the instruction raises the response's mean logprob (= its PMI).
GAINS = [0.5, -0.3, 1.2, 0.1, 0.8]
UNCOND = -2.0


def instruction_for(i: int) -> str:
    return f"What does list number {i} say about the subject?"


def doc_index(text: str) -> int:
    for i in range(len(GAINS)):
        if words(1, i * 100) in text:
            return i
    raise AssertionError(f"unexpected text {text[:40]!r}")


def augment_reply(messages, params):
    return instruction_for(doc_index(messages[-1]["content"]))


def continuation_logprobs(messages, continuation):
    """Unconditional: UNCOND per token; conditional: UNCOND + GAINS[i] when the instruction is the document's own."""
    n = len(continuation.split())
    if messages is None:
        return [UNCOND] * n
    i = doc_index(continuation)
    own = messages[-1]["content"] == instruction_for(i)
    return [UNCOND + (GAINS[i] if own else -1.0)] * n


def corpus(tmp_path, n=len(GAINS)):
    return write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": words(60, i * 100)} for i in range(n)])


def test_pmi_mode_scores_with_known_logprobs_and_keeps_positive(cli, scripted, tmp_path):
    backend, spec = scripted(default=augment_reply, continuation_logprobs=continuation_logprobs)
    out = tmp_path / "out"
    r = cli("run", "humpback", corpus(tmp_path), "-o", out, "--model", spec, "--judge-mode", "pmi", "-q")
    assert r.exit_code == 0, r.output
    data = read_jsonl(out / "data.jsonl")
    assert sorted(d["meta"]["source_id"] for d in data) == ["d0", "d2", "d3", "d4"]  # default threshold 0: PMI >= 0
    for d in data:
        i = int(d["meta"]["source_id"][1:])
        meta = d["meta"]
        assert meta["curate_mode"] == "pmi" and meta["score"] == pytest.approx(GAINS[i])
        assert meta["cond_logprob"] == pytest.approx(UNCOND + GAINS[i]) and meta["uncond_logprob"] == pytest.approx(UNCOND)
        assert meta["cond_tokens"] == meta["uncond_tokens"] == 60
        assert meta["ifd"] == pytest.approx((-(UNCOND + GAINS[i])) / -UNCOND)
        assert d["system"] == "Answer with knowledge from web search."
        assert [s["kind"] for s in meta["lineage"]] == ["chat", "score_continuation", "score_continuation"]
    cands = {c["id"]: c for c in read_jsonl(out / "candidates.jsonl")}
    assert cands["d1#0"]["reason"] == "below_threshold" and cands["d1#0"]["meta"]["score"] == pytest.approx(-0.3)
    # the conditional prompt is the instruction alone as the user message; the unconditional has none
    calls = [h for h in backend.history if h["kind"] == "score_continuation"]
    assert {json.dumps(h["messages"]) for h in calls if h["messages"] is not None} == {
        json.dumps([{"role": "user", "content": instruction_for(i)}]) for i in range(len(GAINS))}
    assert sum(h["messages"] is None for h in calls) == len(GAINS)


def test_ifd_mode_score_is_one_minus_ifd_and_threshold_applies(cli, scripted, tmp_path):
    backend, spec = scripted(default=augment_reply, continuation_logprobs=continuation_logprobs)
    out = tmp_path / "out"
    r = cli("run", "humpback", corpus(tmp_path), "-o", out, "--model", spec, "--judge-mode", "ifd", "--score-threshold", "0.3", "-q")
    assert r.exit_code == 0, r.output
    expected = {f"d{i}": 1 - (-(UNCOND + g)) / -UNCOND for i, g in enumerate(GAINS)}  # 1 - L(r|i)/L(r)
    cands = {c["source_id"]: c for c in read_jsonl(out / "candidates.jsonl")}
    for sid, value in expected.items():
        assert cands[sid]["meta"]["score"] == pytest.approx(value)
        assert cands[sid]["status"] == ("kept" if value >= 0.3 else "dropped")
    assert sorted(d["meta"]["source_id"] for d in read_jsonl(out / "data.jsonl")) == ["d2", "d4"]


def test_keep_top_keeps_the_top_scoring_pairs_and_resume_agrees(cli, scripted, tmp_path):
    backend, spec = scripted(default=augment_reply, continuation_logprobs=continuation_logprobs)
    out = tmp_path / "out"
    args = ("run", "humpback", corpus(tmp_path), "-o", out, "--model", spec, "--judge-mode", "pmi", "--keep-top", "40", "-q")
    assert cli(*args).exit_code == 0
    data = read_jsonl(out / "data.jsonl")
    assert sorted(d["meta"]["source_id"] for d in data) == ["d2", "d4"]  # 40% of 5 = the 2 best PMIs (1.2, 0.8)
    cands = read_jsonl(out / "candidates.jsonl")
    dropped = {c["source_id"]: c for c in cands if c["status"] == "dropped"}
    assert {k: c["reason"] for k, c in dropped.items()} == {"d0": "below_keep_top", "d1": "below_keep_top", "d3": "below_keep_top"}
    assert dropped["d0"]["meta"]["drop_details"]["cutoff"] == pytest.approx(0.8)
    stats = json.loads((out / "stats.json").read_text())
    curate = stats["stages"]["humpback.curate"]
    # the cut is a whole-run decision: the 5 pairs left the stage as it streamed, 3 were cut at the end
    assert stats["kept"] == 2 and curate["dropped"] == {} and curate["dropped_at_end"] == {"below_keep_top": 3}
    assert curate["in"] == curate["out"] == 5
    calls = len(backend.history)
    assert cli(*args).exit_code == 0  # resuming a finished run decides the same, with no model call
    assert read_jsonl(out / "data.jsonl") == data and len(backend.history) == calls


def test_keep_top_keeps_ties_at_the_cutoff(cli, scripted, tmp_path):
    def flat(messages, continuation):  # every pair scores the same
        return [-1.0] * 3 if messages else [-2.0] * 3

    backend, spec = scripted(default=augment_reply, continuation_logprobs=flat)
    out = tmp_path / "out"
    assert cli("run", "humpback", corpus(tmp_path, 4), "-o", out, "--model", spec, "--judge-mode", "pmi", "--keep-top", "25", "-q").exit_code == 0
    assert len(read_jsonl(out / "data.jsonl")) == 4


def test_unconditional_is_scored_once_per_response(cli, scripted, tmp_path):
    """Three instructions per segment share one response: P(response) is computed once (engine cache)."""
    def reply(messages, params):
        return f"{augment_reply(messages, params)} Variant {params.get('seed', 0)}."

    backend, spec = scripted(default=reply, continuation_logprobs=lambda m, c: [-1.5] * 4 if m else [-2.0] * 4)
    out = tmp_path / "out"
    r = cli("run", "humpback", corpus(tmp_path, 2), "-o", out, "--model", spec, "--judge-mode", "pmi", "--candidates", "3", "--concurrency", "1", "-q")
    assert r.exit_code == 0, r.output
    calls = [h for h in backend.history if h["kind"] == "score_continuation"]
    assert sum(h["messages"] is not None for h in calls) == 6
    assert sum(h["messages"] is None for h in calls) == 2
    assert len(read_jsonl(out / "data.jsonl")) == 6


def test_pipeline_stage_option_selects_the_mode(cli, scripted, tmp_path):
    backend, spec = scripted(default=augment_reply, continuation_logprobs=continuation_logprobs)
    pipe = tmp_path / "p.yaml"
    pipe.write_text(
        f"input: {corpus(tmp_path)}\noutput: {tmp_path / 'out'}\nmodel: {spec}\n"
        "stages:\n  - use: humpback.augment\n  - use: humpback.curate\n    judge_mode: pmi\n    keep_top: 60\n",
        encoding="utf-8",
    )
    r = cli("run", pipe, "-q")
    assert r.exit_code == 0, r.output
    assert sorted(d["meta"]["source_id"] for d in read_jsonl(tmp_path / "out" / "data.jsonl")) == ["d0", "d2", "d4"]


def test_backend_without_likelihoods_stops_the_run_before_any_call(cli, scripted, tmp_path):
    backend, spec = scripted(default=augment_reply)
    backend.capabilities = frozenset({CHAT, NEXT_TOKEN_LOGPROBS})
    r = cli("run", "humpback", corpus(tmp_path), "-o", tmp_path / "out", "--model", spec, "--judge-mode", "pmi", "-q")
    assert r.exit_code == 2
    assert "cannot do 'score_continuation'" in r.output and "--judge-mode pmi" in r.output and "llamacpp:" in r.output
    assert backend.history == []


def test_unknown_mode_and_bad_keep_top_are_refused(cli, scripted, tmp_path):
    backend, spec = scripted(default=augment_reply)
    r = cli("run", "humpback", corpus(tmp_path), "-o", tmp_path / "o", "--model", spec, "--judge-mode", "pmx")
    assert r.exit_code == 2 and "pmx" in r.output
    r = cli("run", "humpback", corpus(tmp_path), "-o", tmp_path / "o", "--model", spec, "--keep-top", "0")
    assert r.exit_code == 2 and "keep-top" in r.output


@pytest.mark.model
def test_pmi_run_on_the_embedded_model_keeps_the_top_scoring_pairs(cli, tmp_path):
    out = tmp_path / "out"
    r = cli("run", "humpback", EXAMPLES / "corpus.jsonl", "-o", out, "--limit", "4", "--judge-mode", "pmi",
            "--keep-top", "50", "--max-tokens", "48", "-q")
    assert r.exit_code == 0, r.output
    scored = [c for c in read_jsonl(out / "candidates.jsonl") if c["meta"].get("curate_mode") == "pmi"]
    assert len(scored) >= 2
    for c in scored:
        m = c["meta"]
        assert m["score"] == pytest.approx(m["cond_logprob"] - m["uncond_logprob"], abs=1e-5)
        assert m["cond_tokens"] == m["uncond_tokens"] > 0 and m["cond_logprob"] < 0 and m["uncond_logprob"] < 0
    ranked = sorted(scored, key=lambda c: c["meta"]["score"], reverse=True)
    top = math.ceil(len(scored) / 2)
    data = read_jsonl(out / "data.jsonl")
    assert sorted(d["meta"]["id"] for d in data) == sorted(c["id"] for c in ranked[:top])
    assert min(d["meta"]["score"] for d in data) > max(c["meta"]["score"] for c in ranked[top:])


def test_pmi_prompt_is_the_instruction_alone_as_the_user_message(registry):
    from btkit.prompts import PromptLibrary

    prompt = PromptLibrary(registry.prompt_roots()).render("humpback/pmi", {"instruction": "How do I pin a package version?"})
    assert prompt.messages == [{"role": "user", "content": "How do I pin a package version?"}]
    assert prompt.assistant_prefix == ""


# -- rubric judge replies go through the engine's parse-retry policy ---------------------------------
def rubric_judge(judge_replies):
    """Augment by document; the judge's replies are consumed in order (one document per run)."""
    judge_replies = list(judge_replies)

    def reply(messages, params):
        if "Score:" in messages[-1]["content"]:
            return judge_replies.pop(0)
        return augment_reply(messages, params)
    return reply


def judge_calls(backend):
    return [h for h in backend.history if h["kind"] == "chat" and "Score:" in h["messages"][-1]["content"]]


def test_unparseable_rubric_reply_is_resampled_with_parse_retries(cli, scripted, tmp_path):
    backend, spec = scripted(default=rubric_judge(["It reads well, I like it.", "Clear and complete.\nScore: 5"]))
    out = tmp_path / "out"
    r = cli("run", "humpback", corpus(tmp_path, 1), "-o", out, "--model", spec, "--judge-mode", "rubric", "--parse-retries", "1", "-q")
    assert r.exit_code == 0, r.output
    [row] = read_jsonl(out / "data.jsonl")
    assert row["meta"]["score"] == 5 and row["meta"]["curate_mode"] == "rubric"  # the retry's score
    curate = [s for s in row["meta"]["lineage"] if s["stage"] == "humpback.curate"]
    assert [s.get("attempt") for s in curate] == [None, 1]
    assert curate[0]["parse_error"] == "no_score" and curate[0]["raw"] == "It reads well, I like it." and "parsed" not in curate[0]
    assert curate[1]["retry_of"] == curate[0]["step"] and curate[1]["parsed"] == {"score": 5}
    calls = judge_calls(backend)
    assert len(calls) == 2
    assert calls[0]["params"]["temperature"] == 0.0 and calls[1]["params"]["temperature"] == 0.7  # greedy is re-sampled
    assert calls[0]["params"].get("seed") != calls[1]["params"]["seed"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["parse_retries"] == 1 and stats["stages"]["humpback.curate"]["parse_retries_recovered"] == 1
    assert stats["stages"]["humpback.curate"]["parse_failures"] == {"no_score": 1}
    assert stats["kept"] == 1 and stats["dropped_by_reason"] == {}


def test_unparseable_rubric_reply_is_not_retried_by_default(cli, scripted, tmp_path):
    backend, spec = scripted(default=rubric_judge(["It reads well, I like it.", "Clear and complete.\nScore: 5"]))
    out = tmp_path / "out"
    r = cli("run", "humpback", corpus(tmp_path, 1), "-o", out, "--model", spec, "--judge-mode", "rubric", "-q")
    assert r.exit_code == 0, r.output
    assert len(judge_calls(backend)) == 1
    [cand] = read_jsonl(out / "candidates.jsonl")
    assert cand["reason"] == "unparseable_score" and cand["meta"]["score_error"] == "no_score"
    assert cand["lineage"][-1]["parse_error"] == "no_score" and "attempt" not in cand["lineage"][-1]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["parse_retries"] == 0 and stats["parse_failures"] == 1
    assert stats["dropped_by_reason"] == {"humpback.curate:unparseable_score": 1}


def test_rubric_retries_give_up_and_keep_the_real_reasons(cli, scripted, tmp_path):
    from btkit.backends import Completion

    filtered = Completion(text="Score: 5", finish_reason="content_filter")
    cut = Completion(text="The answer covers", finish_reason="length")
    backend, spec = scripted(default=rubric_judge([filtered, cut, "Score: 3-4"]))
    out = tmp_path / "out"
    r = cli("run", "humpback", corpus(tmp_path, 1), "-o", out, "--model", spec, "--judge-mode", "rubric", "--parse-retries", "2", "-q")
    assert r.exit_code == 0, r.output
    [cand] = read_jsonl(out / "candidates.jsonl")
    assert cand["reason"] == "unparseable_score" and cand["meta"]["score_error"] == "range"  # the last attempt's reason
    assert [s.get("parse_error") for s in cand["lineage"] if s["stage"] == "humpback.curate"] == ["content_filter", "truncated", "range"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["stages"]["humpback.curate"]["parse_failures"] == {"content_filter": 1, "truncated": 1, "range": 1}
    assert stats["parse_retries"] == 2 and stats["stages"]["humpback.curate"]["parse_retries_recovered"] == 0


def test_content_filtered_judge_reply_is_not_an_empty_reply(cli, scripted, tmp_path):
    from btkit.backends import Completion

    backend, spec = scripted(default=rubric_judge([Completion(text="Score: 5", finish_reason="content_filter")]))
    out = tmp_path / "out"
    r = cli("run", "humpback", corpus(tmp_path, 1), "-o", out, "--model", spec, "--judge-mode", "rubric", "-q")
    assert r.exit_code == 0, r.output
    [cand] = read_jsonl(out / "candidates.jsonl")
    assert cand["meta"]["score_error"] == "content_filter" and cand["lineage"][-1]["parse_error"] == "content_filter"
