"""Humpback on a scripted backend: segmentation, augment parsing, curation threshold, tagging, lineage."""

from __future__ import annotations

import json
import math

import pytest

from btkit.methods import ParseError
from btkit.kit.seeds import pick_examples
from btkit_plugins.methods.humpback import AUGMENTED_SYSTEM, SEED_SYSTEM
from btkit.kit.instructions import parse_instruction
from btkit.kit.segment import segment_corpus, segments

from conftest import read_jsonl, words, write_jsonl


# -- segmentation ---------------------------------------------------------------------------
def test_segments_pack_paragraphs_and_split_at_headers():
    text = "# Title\n\n" + words(30) + "\n\n" + words(30, 100) + "\n## Next\n" + words(500, 200)
    segs = segments(text, max_words=100)
    assert segs[0] == words(30) + "\n\n" + words(30, 100)
    assert all(len(s.split()) <= 100 for s in segs)
    assert sum(len(s.split()) for s in segs) == 560  # nothing lost but the headers


def test_length_filter_and_dedup_are_recorded_not_silent():
    rows = [{"id": "a", "text": words(50)}, {"id": "b", "text": "Too short."}, {"id": "c", "text": words(50).upper()}]
    recs = list(segment_corpus(rows, {"min_words": 30, "max_words": 400}))
    assert [(r.id, r.reason) for r in recs] == [("a#0", None), ("b#0", "too_short"), ("c#0", "duplicate")]


def test_missing_id_uses_line_number():
    recs = list(segment_corpus([{"text": words(40)}, {"text": words(40, 7)}], {}))
    assert [r.source_id for r in recs] == ["line1", "line2"]


def test_few_shot_choice_is_deterministic_per_segment():
    seed = [{"instruction": str(i), "response": str(i)} for i in range(10)]
    assert pick_examples(seed, "doc#1", 3) == pick_examples(seed, "doc#1", 3)
    assert len(pick_examples(seed, "doc#1", 3)) == 3
    assert pick_examples([], "x", 3) == []


# -- instruction parsing ------------------------------------------------------------------------
DOC = "The apt command installs packages and resolves dependencies for you. " * 3


@pytest.mark.parametrize("reply,expected", [
    ("How do I install packages with apt?", "How do I install packages with apt?"),
    ("Request: How do I install packages with apt?", "How do I install packages with apt?"),
    ("**Instruction:** Explain what apt does.", "Explain what apt does."),
    ('"How does apt resolve dependencies?"', "How does apt resolve dependencies?"),
    ("```\nExplain what apt does.\n```", "Explain what apt does."),
    ("How do I install packages?\n\nAnswer: You use apt.", "How do I install packages?"),
])
def test_instruction_parser_cleans(reply, expected):
    assert parse_instruction(reply, DOC) == expected


@pytest.mark.parametrize("reply,reason", [
    ("", "empty_reply"), (None, "empty_reply"), ("   \n ", "empty_reply"),
    ("I'm sorry, but I can't help with that.", "refusal"),
    ("Explain.", "too_short"),
    (" ".join(["word"] * 400), "too_long"),
    ("The apt command installs packages and resolves dependencies for you.", "copied_document"),
])
def test_instruction_parser_refuses(reply, reason):
    with pytest.raises(ParseError) as e:
        parse_instruction(reply, DOC)
    assert e.value.reason == reason


# -- whole runs on a scripted backend -----------------------------------------------------------
def lp(score_probs):
    return {d: math.log(p) for d, p in score_probs.items()}


def by_document(table):
    """A reply function: picks the reply by which document (word offset) the prompt holds.

    Units run concurrently, so scripted replies are keyed by content, not by call order."""
    def reply(messages, *rest):
        content = messages[-1]["content"]
        is_judge = "Score: <rating>" in content
        for marker, (aug, judge) in table.items():
            if marker in content:
                return judge if is_judge else aug
        raise AssertionError("unexpected prompt")
    return reply


def test_run_keeps_by_threshold_and_tags_system(cli, scripted, tmp_path):
    replies = ["What does the first list hold?", "What does the second list hold?", "Sorry, I cannot do that."]
    table = {words(1, 0): (replies[0], lp({"5": 0.7, "4": 0.2, "1": 0.1})),
             words(1, 100): (replies[1], lp({"4": 0.6, "5": 0.3, "1": 0.1})),
             words(1, 200): (replies[2], None)}
    backend, spec = scripted(default=by_document(table), logprobs=lambda m, p, c: by_document(table)(m))
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": words(60, i * 100)} for i in range(3)])
    out = tmp_path / "out"
    r = cli("run", "humpback", corpus, "-o", out, "--model", spec, "-q")
    assert r.exit_code == 0, r.output
    data = read_jsonl(out / "data.jsonl")
    assert len(data) == 1
    row = data[0]
    assert set(row) == {"instruction", "response", "system", "meta"}
    assert row["instruction"] == "What does the first list hold?" and row["response"] == words(60, 0)
    assert row["system"] == AUGMENTED_SYSTEM
    meta = row["meta"]
    assert meta["score"] == 5 and meta["source_id"] == "d0" and meta["method"] == "humpback"
    steps = meta["lineage"]
    assert [s["stage"] for s in steps] == ["humpback.augment", "humpback.curate"]
    assert steps[0]["template"] == "humpback/augment" and len(steps[0]["template_hash"]) == 16
    assert steps[0]["raw"] == replies[0] and steps[0]["parsed"] == {"instruction": replies[0]}
    assert steps[0]["model"] == spec
    cands = {c["id"]: c for c in read_jsonl(out / "candidates.jsonl")}
    assert cands["d1#0"]["reason"] == "below_threshold" and cands["d1#0"]["meta"]["score"] == 4
    assert cands["d2#0"]["reason"] == "instruction_refusal"
    assert cands["d2#0"]["lineage"][0]["raw"] == "Sorry, I cannot do that."
    stats = json.loads((out / "stats.json").read_text())
    assert stats["status"] == "complete" and stats["kept"] == 1 and stats["dropped"] == 2
    assert stats["stages"]["humpback.augment"]["dropped"] == {"instruction_refusal": 1}
    assert stats["stages"]["humpback.curate"]["dropped"] == {"below_threshold": 1}
    assert stats["parse_failures"] == 1
    assert stats["tokens_in"] > 0 and stats["wall_time_s"] >= 0


def test_threshold_four_keeps_a4(cli, scripted, tmp_path):
    backend, spec = scripted(default="What is in the list?", logprobs={"4": -0.2, "5": -2.0})
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d", "text": words(60)}])
    assert cli("run", "humpback", corpus, "-o", tmp_path / "a5", "--model", spec, "-q").exit_code == 0
    assert read_jsonl(tmp_path / "a5" / "data.jsonl") == []
    assert cli("run", "humpback", corpus, "-o", tmp_path / "a4", "--model", spec, "--threshold", "4", "-q").exit_code == 0
    assert len(read_jsonl(tmp_path / "a4" / "data.jsonl")) == 1


def test_rubric_mode_parses_or_counts_failures(cli, scripted, tmp_path):
    table = {words(1, 0): ("What is list one?", "Good and complete.\nScore: 5"),
             words(1, 100): ("What is list two?", "Seems fine to me overall."),
             words(1, 200): ("What is list three?", "Score: 91")}
    backend, spec = scripted(default=by_document(table))
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": words(60, i * 100)} for i in range(3)])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec, "--judge-mode", "rubric", "--concurrency", "1", "-q")
    assert r.exit_code == 0, r.output
    cands = {c["id"]: c for c in read_jsonl(tmp_path / "out" / "candidates.jsonl")}
    assert cands["d0#0"]["status"] == "kept"
    assert cands["d1#0"]["reason"] == "unparseable_score" and cands["d1#0"]["meta"]["score_error"] == "no_score"
    assert cands["d2#0"]["meta"]["score_error"] == "out_of_range"
    assert cands["d1#0"]["lineage"][-1]["raw"] == "Seems fine to me overall."
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    curate = stats["stages"]["humpback.curate"]
    assert curate["parse_failures"] == {"no_score": 1, "out_of_range": 1} and curate["parse_failures_total"] == 2
    assert curate["calls"] == 3 and curate["in"] == 3 and curate["out"] == 1
    assert curate["dropped"] == {"unparseable_score": 2}
    # each failure is recorded on its candidate's curate step with its reason; the kept one has none
    for cid, error in (("d0#0", None), ("d1#0", "no_score"), ("d2#0", "out_of_range")):
        step = [s for s in cands[cid]["lineage"] if s["stage"] == "humpback.curate"]
        assert len(step) == 1 and step[0]["template"] == "humpback/curate", cands[cid]["lineage"]
        assert step[0].get("parse_error") == error
    # exactly one judge call per candidate (found by the instruction it judges, not by the prompt's wording),
    # each greedy, each asking for reasoning then the score
    questions = [aug for aug, _ in table.values()]
    assert [h["kind"] for h in backend.history] == ["chat"] * 6
    judged = [[q for q in questions if q in h["messages"][-1]["content"]] for h in backend.history]
    curate_calls = [h for h, qs in zip(backend.history, judged) if qs]
    assert sorted(q for qs in judged for q in qs) == sorted(questions)
    assert len(curate_calls) == 3
    for call in curate_calls:
        assert call["params"]["temperature"] == 0.0
        assert call["messages"][-1]["content"].rstrip().endswith('write "Score: <rating>" in the last line.')


def test_seed_pairs_are_the_reversed_few_shot_examples(cli, scripted, tmp_path):
    backend, spec = scripted(default="What is in the list?", logprobs={"5": -0.1})
    seed = write_jsonl(tmp_path / "seed.jsonl", [{"instruction": f"Seed question {i}?", "response": f"Seed answer {i}."} for i in range(5)])
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d", "text": words(60)}])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec, "--seed", seed, "--shots", "2", "--mix-seed", "-q")
    assert r.exit_code == 0, r.output
    msgs = backend.history[0]["messages"]
    assistants = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert len(assistants) == 2 and all(a.startswith("Seed question") for a in assistants)
    data = read_jsonl(tmp_path / "out" / "data.jsonl")
    seeds = [d for d in data if d["meta"].get("source") == "seed"]
    assert len(seeds) == 5 and all(d["system"] == SEED_SYSTEM for d in seeds)
    assert [d["system"] for d in data if d["meta"].get("source") != "seed"] == [AUGMENTED_SYSTEM]


def test_backend_failure_is_recorded_not_fatal(cli, scripted, tmp_path):
    from btkit.errors import BackendError

    def reply(messages, params):
        if words(1, 0) in messages[-1]["content"]:
            return BackendError("server exploded", raw="<html>502</html>")
        return "What is list two?"

    backend, spec = scripted(default=reply, logprobs={"5": -0.1})
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": words(60, i * 100)} for i in range(2)])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec, "--concurrency", "1", "-q")
    assert r.exit_code == 0, r.output
    failures = read_jsonl(tmp_path / "out" / "failures.jsonl")
    assert failures == [{"id": "d0#0", "stage": "humpback.augment", "reason": "backend_error", "error": "server exploded", "raw": "<html>502</html>"}]
    assert len(read_jsonl(tmp_path / "out" / "data.jsonl")) == 1
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["backend_failures"] == 1


def test_candidates_per_segment_get_distinct_seeds(cli, scripted, tmp_path):
    backend, spec = scripted(replies=["What is one?", "What is two?"], logprobs={"5": -0.1})
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d", "text": words(60)}])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec, "--candidates", "2", "-q")
    assert r.exit_code == 0, r.output
    seeds = [h["params"].get("seed") for h in backend.history if h["kind"] == "chat"]
    assert seeds == [0, 1]
    assert {d["instruction"] for d in read_jsonl(tmp_path / "out" / "data.jsonl")} == {"What is one?", "What is two?"}


# -- --candidates N: one n=N request where the backend can, else N requests; failures per candidate --
def augment_steps(cand):
    return [s for s in cand["lineage"] if s["stage"] == "humpback.augment"]


def test_multi_sample_backend_gets_all_candidates_in_one_request(cli, scripted, tmp_path):
    choices = ["What does the first list hold?", "Which words does the list contain?", "How is the list ordered?"]
    backend, spec = scripted(multi_sample=True, default=lambda m, p: list(choices), logprobs={"5": -0.1})
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d", "text": words(60)}])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec, "--candidates", "3", "-q")
    assert r.exit_code == 0, r.output
    chats = [h for h in backend.history if h["kind"] == "chat"]
    assert len(chats) == 1 and chats[0]["params"]["n"] == 3 and chats[0]["params"]["seed"] == 0
    cands = read_jsonl(tmp_path / "out" / "candidates.jsonl")
    assert [c["id"] for c in cands] == ["d#0~0", "d#0~1", "d#0~2"]
    assert [c["fields"]["instruction"] for c in cands] == choices and all(c["status"] == "kept" for c in cands)
    steps = [augment_steps(c) for c in cands]
    assert all(len(s) == 1 for s in steps)
    assert [s[0]["raw"] for s in steps] == choices and [s[0]["choice"] for s in steps] == [0, 1, 2]
    assert {s[0]["request"] for s in steps} == {steps[0][0]["step"]}  # one request, named in each candidate
    assert [s[0]["parsed"]["instruction"] for s in steps] == choices
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["kept"] == 3 and stats["model_calls_this_invocation"] == 1 + 3  # one augment request, three judge calls
    assert stats["stages"]["humpback.augment"]["tokens_out"] == sum(len(c.split()) for c in choices)  # counted once
    assert [d["instruction"] for d in read_jsonl(tmp_path / "out" / "data.jsonl")] == choices
    # the n=3 reply is cached whole: a rerun with another threshold asks nothing again and gets the same candidates
    r = cli("run", "humpback", corpus, "-o", tmp_path / "again", "--model", spec, "--candidates", "3", "--threshold", "4", "-q")
    assert r.exit_code == 0, r.output
    assert len([h for h in backend.history if h["kind"] == "chat"]) == 1
    assert [c["fields"]["instruction"] for c in read_jsonl(tmp_path / "again" / "candidates.jsonl")] == choices


def test_multi_sample_choices_are_parsed_and_counted_one_by_one(cli, scripted, tmp_path):
    choices = ["What does the first list hold?", "Sorry, I cannot do that.",
               {"text": "Which words does the list", "finish_reason": "length"}, "How is the list ordered?"]
    backend, spec = scripted(multi_sample=True, default=lambda m, p: list(choices), logprobs={"5": -0.1})
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d", "text": words(60)}])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec, "--candidates", "4", "-q")
    assert r.exit_code == 0, r.output
    cands = {c["id"]: c for c in read_jsonl(tmp_path / "out" / "candidates.jsonl")}
    assert {i: c["reason"] for i, c in cands.items()} == {"d#0~0": None, "d#0~1": "instruction_refusal", "d#0~2": "instruction_truncated", "d#0~3": None}
    assert augment_steps(cands["d#0~1"])[0]["raw"] == "Sorry, I cannot do that."
    assert augment_steps(cands["d#0~2"])[0]["parse_error"] == "truncated"
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    aug = stats["stages"]["humpback.augment"]
    assert aug["parse_failures"] == {"refusal": 1, "truncated": 1} and aug["dropped"] == {"instruction_refusal": 1, "instruction_truncated": 1}
    assert stats["kept"] == 2 and len(read_jsonl(tmp_path / "out" / "data.jsonl")) == 2


def test_multi_sample_parse_retry_resamples_only_the_failed_choice(cli, scripted, tmp_path):
    from btkit.calls import retry_seed

    def reply(messages, params):
        if params.get("n") == 3:
            return ["What does the first list hold?", "Sorry, I cannot do that.", "How is the list ordered?"]
        return f"Which words come first in the list (seed {params['seed']})?"

    backend, spec = scripted(multi_sample=True, default=reply, logprobs={"5": -0.1})
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d", "text": words(60)}])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec, "--candidates", "3", "--parse-retries", "2", "-q")
    assert r.exit_code == 0, r.output
    chats = [h["params"] for h in backend.history if h["kind"] == "chat"]
    assert len(chats) == 2 and chats[0]["n"] == 3 and "n" not in chats[1] and chats[1]["seed"] == retry_seed(0 + 1, 1)
    cands = {c["id"]: c for c in read_jsonl(tmp_path / "out" / "candidates.jsonl")}
    assert all(c["status"] == "kept" for c in cands.values())
    first, retry = augment_steps(cands["d#0~1"])
    assert first["parse_error"] == "refusal" and retry["attempt"] == 1 and retry["retry_of"] == first["step"]
    assert cands["d#0~1"]["fields"]["instruction"] == f"Which words come first in the list (seed {retry_seed(1, 1)})?"
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["parse_retries"] == 1 and stats["stages"]["humpback.augment"]["parse_retries_recovered"] == 1


def test_without_multi_sample_each_candidate_is_its_own_seeded_request(cli, scripted, tmp_path):
    backend, spec = scripted(default=lambda m, p: f"What is item number {p['seed']} here?", logprobs={"5": -0.1})
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d", "text": words(60)}])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec, "--candidates", "3", "-q")
    assert r.exit_code == 0, r.output
    chats = [h["params"] for h in backend.history if h["kind"] == "chat"]
    assert [p["seed"] for p in chats] == [0, 1, 2] and all("n" not in p for p in chats)
    cands = read_jsonl(tmp_path / "out" / "candidates.jsonl")
    assert [c["fields"]["instruction"] for c in cands] == [f"What is item number {i} here?" for i in range(3)]


def test_one_failed_candidate_request_keeps_its_siblings(cli, scripted, tmp_path):
    from btkit.errors import BackendError

    def reply(messages, params):
        if params["seed"] == 1:
            return BackendError("server exploded", raw="<html>502</html>")
        return f"What is item number {params['seed']} here?"

    backend, spec = scripted(default=reply, logprobs={"5": -0.1})
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d", "text": words(60)}])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec, "--candidates", "3", "-q")
    assert r.exit_code == 0, r.output
    assert len([h for h in backend.history if h["kind"] == "chat"]) == 3
    cands = {c["id"]: c for c in read_jsonl(tmp_path / "out" / "candidates.jsonl")}
    assert {i: c["status"] for i, c in cands.items()} == {"d#0~0": "kept", "d#0~1": "dropped", "d#0~2": "kept"}
    assert cands["d#0~1"]["reason"] == "backend_error" and cands["d#0~1"]["dropped_at"] == "humpback.augment"
    assert [d["instruction"] for d in read_jsonl(tmp_path / "out" / "data.jsonl")] == ["What is item number 0 here?", "What is item number 2 here?"]
    assert read_jsonl(tmp_path / "out" / "failures.jsonl") == [
        {"id": "d#0~1", "stage": "humpback.augment", "reason": "backend_error", "error": "server exploded", "raw": "<html>502</html>"}]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["backend_failures"] == 1 and stats["kept"] == 2 and stats["records"] == 3
    assert stats["stages"]["humpback.augment"]["dropped"] == {"backend_error": 1}


def test_multi_sample_request_that_fails_or_comes_back_short_is_recorded_per_candidate(cli, scripted, tmp_path):
    from btkit.errors import BackendError

    def reply(messages, params):
        if words(1, 0) in messages[-1]["content"]:
            return BackendError("server exploded", raw="<html>502</html>")
        return ["What does the second list hold?", "How is the second list ordered?"]  # 2 of the 3 asked for

    backend, spec = scripted(multi_sample=True, default=reply, logprobs={"5": -0.1})
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": words(60, i * 100)} for i in range(2)])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec, "--candidates", "3", "-q")
    assert r.exit_code == 0, r.output
    cands = {c["id"]: c for c in read_jsonl(tmp_path / "out" / "candidates.jsonl")}
    assert {i: c["reason"] for i, c in cands.items()} == {
        "d0#0~0": "backend_error", "d0#0~1": "backend_error", "d0#0~2": "backend_error",
        "d1#0~0": None, "d1#0~1": None, "d1#0~2": "backend_error"}
    assert cands["d0#0~2"]["meta"]["drop_details"]["error"] == "server exploded"
    assert "returned 2 of the 3 choices" in cands["d1#0~2"]["meta"]["drop_details"]["error"]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["backend_failures"] == 4 and stats["kept"] == 2
    assert len(read_jsonl(tmp_path / "out" / "failures.jsonl")) == 4
