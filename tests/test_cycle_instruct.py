"""Cycle-Instruct: ROUGE-L on known cases, the stages on a scripted backend (fields, the answer generator
never sees the segment, the likelihood gain), a pipeline file with a model per stage (lineage), the
training-row helpers the loop uses, and a run on the embedded model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from btkit_plugins.methods.cycle_instruct import (ANSWER_TEMPLATE, QUESTION_TEMPLATE, answer_prompt, answer_training_pair,
                                                  longest_shared_run, question_prompt, question_training_pair, rouge_l)

from conftest import EXAMPLES, read_jsonl, words, write_jsonl

QUESTION = "What do the Greek letter names in the list stand for?"


# -- ROUGE-L -----------------------------------------------------------------------------------------
def test_rouge_l_identical_is_one_and_disjoint_is_zero():
    assert rouge_l("The cat sat on the mat.", "The cat sat on the mat.") == 1.0
    assert rouge_l("The CAT sat, on the mat!", "the cat sat on the mat") == 1.0  # lower-cased word tokens, punctuation ignored
    assert rouge_l("the cat sat on the mat", "dogs bark loudly") == 0.0
    assert rouge_l("", "anything") == 0.0 and rouge_l("anything", "") == 0.0 and rouge_l("", "") == 0.0


def test_rouge_l_hand_computed_partials():
    # LCS(the cat sat on the mat, the cat lay on a mat) = the cat on mat: 4 of 6 each way, F1 = 2/3
    assert rouge_l("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(2 / 3)
    # a candidate that is half of the reference, in order: precision 1, recall 1/2, F1 = 2/3
    assert rouge_l("a b c d e f", "a c f") == pytest.approx(2 / 3)
    # order matters (a subsequence, not a bag): LCS(a b c d, d c b a) = 1, P = R = 1/4
    assert rouge_l("a b c d", "d c b a") == pytest.approx(0.25)
    # reference 5 tokens, candidate 3, LCS 2 (b d): P 2/3, R 2/5, F1 = 2PR/(P+R) = 0.5
    assert rouge_l("a b c d e", "b x d") == pytest.approx(0.5)


def test_longest_shared_run_counts_consecutive_words_only():
    assert longest_shared_run("What does the Unix design give Debian?", "The powerful design of Debian comes from Unix.") == 1
    assert longest_shared_run("Why: the powerful design of Debian?", "The powerful design of Debian comes from Unix.") == 5
    assert longest_shared_run("", "anything") == 0


def test_a_question_that_copies_a_long_run_of_its_segment_is_dropped(cli, scripted, tmp_path):
    segment = words(60)
    copied = "What does this mean: " + " ".join(segment.split()[10:23]) + "?"  # 13 consecutive words of the segment
    backend, spec = scripted(default=lambda m, p: copied if m[0]["role"] == "system" else "An answer.")
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": segment}])
    assert cli("run", "cycle_instruct", corpus, "-o", tmp_path / "out", "--model", spec, "-q").exit_code == 0
    [cand] = read_jsonl(tmp_path / "out" / "candidates.jsonl")
    assert (cand["dropped_at"], cand["reason"]) == ("cycle_instruct.question", "question_copies_segment")
    assert cand["lineage"][0]["raw"] == copied and [h["messages"][0]["role"] for h in backend.history] == ["system"]  # no answer call
    for limit, status in (("13", "kept"), ("0", "kept"), ("12", "dropped")):
        out = tmp_path / f"out{limit}"
        assert cli("run", "cycle_instruct", corpus, "-o", out, "--model", spec, "--max-copied-words", limit, "-q").exit_code == 0
        assert read_jsonl(out / "candidates.jsonl")[0]["status"] == status, limit


# -- the training rows the loop builds are the prompts the stages send ----------------------------
def test_training_pairs_are_the_stage_prompts():
    segment = words(40)
    q = question_prompt(segment)
    assert q.template == QUESTION_TEMPLATE and [m["role"] for m in q.messages] == ["system", "user"]
    assert segment in q.messages[-1]["content"] and "<<<ANSWER " in q.messages[-1]["content"]  # quoted as data
    row = question_training_pair(segment, QUESTION)
    assert row == {"system": q.messages[0]["content"], "instruction": q.messages[-1]["content"], "response": QUESTION}
    a = answer_prompt(QUESTION)
    assert a.template == ANSWER_TEMPLATE and a.messages == [{"role": "user", "content": QUESTION}] and a.assistant_prefix == ""
    assert answer_training_pair(QUESTION, segment) == {"instruction": QUESTION, "response": segment, "system": ""}
    # model-written text cannot open a chat turn in a training row either
    assert "<|im_start|>" not in answer_training_pair("Why? <|im_start|>system", segment)["instruction"]


# -- the stages on a scripted backend -----------------------------------------------------------------
def scripted_generators(segments: dict[str, str]):
    """One reply function for both generators: a question for a question prompt (picked by the
    segment it quotes), else the first half of that question's segment as the answer."""
    questions = {sid: f"{QUESTION} (list {sid})" for sid in segments}

    def reply(messages, params):
        content = messages[-1]["content"]
        if messages[0]["role"] == "system" and "Write the question" in content:
            for sid, text in segments.items():
                if text in content:
                    return text if sid == "copy" else questions[sid]
            raise AssertionError("a question prompt without a known segment")
        sid = next(s for s, q in questions.items() if q == content)
        half = segments[sid].split()[: len(segments[sid].split()) // 2]
        return " ".join(half) if sid != "empty" else "  "

    return reply, questions


def test_question_then_answer_fields_and_the_answer_never_sees_the_segment(cli, scripted, tmp_path):
    segments = {"d0": words(60, 0), "d1": words(60, 100), "copy": words(60, 200), "empty": words(60, 300)}
    reply, questions = scripted_generators(segments)
    backend, spec = scripted(default=reply)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": sid, "text": text} for sid, text in segments.items()] + [{"id": "short", "text": "Too short."}])
    out = tmp_path / "out"
    r = cli("run", "cycle_instruct", corpus, "-o", out, "--model", spec, "-q")
    assert r.exit_code == 0, r.output

    cands = {c["source_id"]: c for c in read_jsonl(out / "candidates.jsonl")}
    assert (cands["short"]["dropped_at"], cands["short"]["reason"]) == ("cycle_instruct.segment", "too_short")
    assert (cands["copy"]["dropped_at"], cands["copy"]["reason"]) == ("cycle_instruct.question", "question_copied_document")
    assert (cands["empty"]["dropped_at"], cands["empty"]["reason"]) == ("cycle_instruct.answer", "answer_empty_reply")
    for sid in ("d0", "d1"):
        f = cands[sid]["fields"]
        assert f["instruction"] == questions[sid] and f["response"] == f["segment"] == segments[sid] == f["text"]
        assert f["reconstruction"] == " ".join(segments[sid].split()[:30])
        assert cands[sid]["meta"]["rouge_l"] == pytest.approx(2 / 3)  # precision 1, recall 1/2
        steps = cands[sid]["lineage"]
        assert [(s["stage"], s["template"]) for s in steps] == [("cycle_instruct.question", QUESTION_TEMPLATE),
                                                                 ("cycle_instruct.answer", ANSWER_TEMPLATE)]

    data = {row["meta"]["source_id"]: row for row in read_jsonl(out / "data.jsonl")}
    assert set(data) == {"d0", "d1"}
    row = data["d0"]
    assert (row["instruction"], row["response"]) == (questions["d0"], segments["d0"])
    assert row["meta"]["reconstruction"] == cands["d0"]["fields"]["reconstruction"] and row["meta"]["rouge_l"] == pytest.approx(2 / 3)
    assert row["meta"]["method"] == "cycle_instruct" and "segment" not in row["meta"]  # the response is the segment

    # what each generator was sent: the question generator the quoted segment (zero-shot: no example
    # turns), the answer generator the question alone as one plain user turn, never any of the segment
    chats = [h for h in backend.history if h["kind"] == "chat"]
    asked = [h for h in chats if h["messages"][0]["role"] == "system"]
    answered = [h for h in chats if h["messages"][0]["role"] != "system"]
    assert len(asked) == 4 and len(answered) == 3
    for h in asked:
        assert [m["role"] for m in h["messages"]] == ["system", "user"]
        assert h["params"]["temperature"] == 0.7 and h["params"]["max_tokens"] == 128
    for h in answered:
        assert [m["role"] for m in h["messages"]] == ["user"] and h["messages"][0]["content"] in questions.values()
        sent = " ".join(m["content"] for m in h["messages"])
        assert not any(w in sent.split() for text in segments.values() for w in text.split()), sent
        assert h["params"]["temperature"] == 0.0 and h["params"]["max_tokens"] == 512
    # and exactly the prompts the loop's training rows use
    assert asked[0]["messages"] == question_prompt(next(t for t in segments.values() if t in asked[0]["messages"][-1]["content"])).messages
    assert answered[0]["messages"] == answer_prompt(answered[0]["messages"][0]["content"]).messages

    stats = json.loads((out / "stats.json").read_text())
    assert list(stats["stages"]) == ["cycle_instruct.question", "cycle_instruct.answer"]  # score is not a default stage
    assert stats["kept"] == 2 and stats["dropped"] == 3


def test_a_reconstruction_cut_at_max_tokens_is_kept_and_marked(cli, scripted, tmp_path):
    from btkit.backends import Completion

    def reply(messages, params):
        if messages[0]["role"] == "system":
            return QUESTION
        return Completion(text="alpha0 beta0 gamma0", finish_reason="length")

    backend, spec = scripted(default=reply)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": words(60)}])
    assert cli("run", "cycle_instruct", corpus, "-o", tmp_path / "out", "--model", spec, "-q").exit_code == 0
    [row] = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert row["meta"]["reconstruction"] == "alpha0 beta0 gamma0" and row["meta"]["reconstruction_truncated"] is True
    assert row["meta"]["rouge_l"] == pytest.approx(2 * 1 * (3 / 60) / (1 + 3 / 60))


# -- a pipeline file: a model per stage, the likelihood gain ---------------------------------------
def pipeline(tmp_path, question_model: str, answer_model: str, score_extra: str = "") -> Path:
    write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": words(60, 100 * i)} for i in range(3)])
    path = tmp_path / "p.yaml"
    path.write_text(f"""input: c.jsonl
output: out
model: {question_model}
stages:
  - use: cycle_instruct.question
  - use: cycle_instruct.answer
    model: {answer_model}
  - use: cycle_instruct.score
    model: {answer_model}
{score_extra}""")
    return path


def continuation(messages, text):
    """Per-token logprobs: -1 per word after a question, -2 after the empty user turn (pmi +1);
    the segment of d2 is made less likely with its question (pmi -1)."""
    n = len(text.split())
    if messages is None or messages[-1]["content"] == "":
        return [-2.0] * n
    return [-3.0 if "list d2" in messages[-1]["content"] else -1.0] * n


def test_each_stage_uses_its_own_model_and_the_gain_is_recorded(cli, scripted, tmp_path):
    qgen, q_spec = scripted(name="qgen", default=lambda m, p: f"{QUESTION} (list {next(f'd{i}' for i in range(3) if words(1, 100 * i) in m[-1]['content'])})")
    agen, a_spec = scripted(name="agen", default="alpha0 beta0 and some more words", continuation_logprobs=continuation)
    r = cli("run", pipeline(tmp_path, q_spec, a_spec), "-q")
    assert r.exit_code == 0, r.output
    # each generator got only its own calls: qgen writes questions, agen answers and scores
    assert {h["kind"] for h in qgen.history} == {"chat"} and len(qgen.history) == 3
    assert all(h["messages"][0]["role"] == "system" for h in qgen.history)
    assert [h["kind"] for h in agen.history].count("chat") == 3
    assert all(h["messages"][0]["role"] == "user" for h in agen.history if h["kind"] == "chat")
    scored = [h for h in agen.history if h["kind"] == "score_continuation"]
    assert len(scored) == 6 and {h["continuation"] for h in scored} == {words(60, 100 * i) for i in range(3)}
    # the conditional frame is the answer generator's own: the question as the only user turn
    assert all(h["messages"] is None or [m["role"] for m in h["messages"]] == ["user"] for h in scored)

    rows = {row["meta"]["source_id"]: row for row in read_jsonl(tmp_path / "out" / "data.jsonl")}
    assert set(rows) == {"d0", "d1", "d2"}  # every pair kept without --min-gain
    for sid, row in rows.items():
        steps = row["meta"]["lineage"]
        assert [s["stage"] for s in steps][:2] == ["cycle_instruct.question", "cycle_instruct.answer"]
        assert {s["stage"] for s in steps[2:]} == {"cycle_instruct.score"} and len(steps) == 4
        for s in steps:  # each step names the model of its own stage
            assert s["model"] == (q_spec if s["stage"] == "cycle_instruct.question" else a_spec), s
        assert row["meta"]["gain"] == pytest.approx(-1.0 if sid == "d2" else 1.0)
        details = row["meta"]["gain_details"]
        assert details["cond_tokens"] == details["uncond_tokens"] == 60 and details["uncond_logprob"] == pytest.approx(-2.0)
    # the answer "alpha0 beta0 and some more words" shares its first 2 of 6 words with d0 (60 words), none with d1, d2
    p, r = 2 / 6, 2 / 60
    assert rows["d0"]["meta"]["rouge_l"] == pytest.approx(2 * p * r / (p + r), abs=1e-6)
    assert rows["d1"]["meta"]["rouge_l"] == rows["d2"]["meta"]["rouge_l"] == 0.0

    # --min-gain drops the pair whose question does not help
    r = cli("run", pipeline(tmp_path, q_spec, a_spec, "    min_gain: 0\n"), "-o", tmp_path / "out2", "-q")
    assert r.exit_code == 0, r.output
    assert sorted(row["meta"]["source_id"] for row in read_jsonl(tmp_path / "out2" / "data.jsonl")) == ["d0", "d1"]
    [dropped] = [c for c in read_jsonl(tmp_path / "out2" / "candidates.jsonl") if c["status"] == "dropped"]
    assert (dropped["dropped_at"], dropped["reason"], dropped["meta"]["gain"]) == ("cycle_instruct.score", "below_min_gain", pytest.approx(-1.0))


def test_score_stage_refuses_a_backend_that_cannot_score_before_any_call(cli, scripted, tmp_path):
    qgen, q_spec = scripted(name="qgen", default=QUESTION)
    r = cli("run", pipeline(tmp_path, q_spec, "echo:an answer"), "-q")
    assert r.exit_code == 2 and "score_continuation" in r.output and "cycle_instruct.score" in r.output
    assert qgen.history == []


def test_example_pipeline_runs_every_stage_in_order(registry):
    from btkit.pipeline import load_pipeline

    config = load_pipeline(EXAMPLES / "pipelines" / "cycle_instruct.yaml", registry)
    assert [f"{s.method}.{s.stage}" for s in config.stages] == ["cycle_instruct.question", "cycle_instruct.answer", "cycle_instruct.score"]
    assert config.model == "llamacpp:default" and config.input.resolve() == (EXAMPLES / "corpus.jsonl").resolve()


# -- the embedded model ---------------------------------------------------------------------------
@pytest.mark.model
@pytest.mark.slow
def test_cycle_instruct_with_embedded_model(tmp_path):
    """The example pipeline (question, answer, score) on 3 documents with the embedded SmolLM2, its
    answers cut to 48 tokens (a cut answer is kept and marked)."""
    text = (EXAMPLES / "pipelines" / "cycle_instruct.yaml").read_text()
    assert "max_tokens: 512" in text and "input: ../corpus.jsonl" in text
    text = text.replace("max_tokens: 512", "max_tokens: 48").replace("input: ../corpus.jsonl", f"input: {EXAMPLES / 'corpus.jsonl'}")
    (tmp_path / "p.yaml").write_text(text)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "btkit.cli", "run", str(tmp_path / "p.yaml"), "-o", str(out), "--limit", "3", "--concurrency", "1", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    cands = read_jsonl(out / "candidates.jsonl")
    assert len({c["source_id"] for c in cands}) == 3
    answered = 0
    for c in cands:
        assert (c["status"] == "kept") == (c["reason"] is None)
        if c["status"] == "dropped":
            assert c["dropped_at"].startswith("cycle_instruct.") and c["reason"]
            continue
        answered += 1
        f, meta = c["fields"], c["meta"]
        assert f["instruction"] and f["segment"] == f["response"] and f["reconstruction"]
        assert 0.0 <= meta["rouge_l"] <= 1.0
        assert meta["gain"] is not None and -20 < meta["gain"] < 20  # a real likelihood difference, nats per token
        assert {s["model"] for s in c["lineage"]} == {"llamacpp:default"}
    assert answered >= 1, [(c["source_id"], c["dropped_at"], c["reason"]) for c in cands]
    stats = json.loads((out / "stats.json").read_text())
    assert list(stats["stages"]) == ["cycle_instruct.question", "cycle_instruct.answer", "cycle_instruct.score"]
    assert stats["records"] == len(cands) == stats["kept"] + stats["dropped"]
