"""Judge mode ``complete``: pmi plus a completeness term from the end-of-turn logprob of the same passes.

The arithmetic on known logprobs (``likelihood_parts``, ``likelihood_score`` with a recording
context), ``auto`` choosing it exactly where a backend scores continuations with the end of the turn
(and for pair judges only), the one-line refusals, and a whole ``btkit run humpback`` on a scripted
backend that returns the end-of-turn value.
"""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from btkit.backends import CHAT, END_OF_TURN, NEXT_TOKEN_LOGPROBS, SCORE_CONTINUATION
from btkit.errors import CapabilityError
from btkit.kit.judges import (COMPLETE_WEIGHT, END_FLOOR, JUDGE_MODES, LABEL_JUDGE_MODES, LIKELIHOOD_MODES, complete_term,
                              likelihood_parts, likelihood_score, require_judge_mode, resolve_judge_mode)
from btkit.testing.backends import ScriptedBackend

from conftest import read_jsonl, words, write_jsonl

COND = [-1.0, -2.0, -3.0]  # mean -2
UNCOND = [-2.0, -3.0, -4.0, -5.0]  # mean -3.5: pmi 1.5


def test_complete_is_a_likelihood_mode_of_the_one_vocabulary():
    assert "complete" in LIKELIHOOD_MODES and "complete" in JUDGE_MODES and "complete" not in LABEL_JUDGE_MODES


def test_complete_is_pmi_minus_the_weighted_shortfall_of_the_end_of_turn_below_the_floor():
    assert (END_FLOOR, COMPLETE_WEIGHT) == (-12.0, 0.5)  # the measured choice (README); the tests below follow it
    # the model expects the reply to go on: log P(end) = -20 is 8 nats below the floor
    score, parts = likelihood_parts("complete", COND, UNCOND, end_cond=-20.0)
    assert complete_term(-20.0) == -8.0
    assert score == pytest.approx(1.5 - 0.5 * 8.0)
    assert parts["pmi"] == pytest.approx(1.5) and parts["complete_term"] == pytest.approx(-8.0)
    assert parts["end_cond_logprob"] == -20.0 and parts["end_floor"] == END_FLOOR and parts["complete_weight"] == COMPLETE_WEIGHT
    assert parts["score"] == score and parts["cond_tokens"] == 3 and parts["uncond_tokens"] == 4  # the end token is no response token
    # a reply that plausibly ends there costs nothing: the score is pmi, and >= 0 still means "the instruction helps"
    for end in (-0.1, -3.0, END_FLOOR):
        score, parts = likelihood_parts("complete", COND, UNCOND, end_cond=end)
        assert score == pytest.approx(1.5) and parts["complete_term"] == 0.0
    # pmi and ifd are unchanged by an end value they do not use
    assert likelihood_parts("pmi", COND, UNCOND, -20.0)[0] == pytest.approx(1.5)
    assert likelihood_parts("ifd", COND, UNCOND)[0] == pytest.approx(1 - 2.0 / 3.5, abs=1e-6)


def test_complete_without_or_with_bad_end_values_is_unscored_with_a_reason():
    assert likelihood_parts("complete", COND, UNCOND) == (None, {"score_error": "no_end_of_turn_logprob"})
    for bad in (math.nan, 0.5, -math.inf):
        assert likelihood_parts("complete", COND, UNCOND, bad) == (None, {"score_error": "invalid_logprobs"})
    assert likelihood_parts("complete", [], UNCOND, -1.0) == (None, {"score_error": "empty_response"})


class RecordingCtx:
    """A stage context whose score_continuation answers from a table and records each call."""

    def __init__(self, cond, uncond):
        self.cond, self.uncond, self.calls = cond, uncond, []

    async def score_continuation(self, template, variables, continuation, **kwargs):
        self.calls.append((template, continuation, kwargs))
        return list(self.cond if template is not None else self.uncond)


def test_likelihood_score_asks_the_conditional_pass_for_the_end_of_turn_and_splits_it_off():
    ctx = RecordingCtx(COND + [-22.0], UNCOND)
    score, parts = asyncio.run(likelihood_score(ctx, "complete", "humpback/pmi", {"instruction": "Q"}, "A"))
    # the unconditional pass is pmi's own call (its cache entry is shared with pmi and ifd)
    assert ctx.calls == [("humpback/pmi", "A", {"end_of_turn": True}), (None, "A", {})]
    assert score == pytest.approx(1.5 - 10.0 * COMPLETE_WEIGHT) and parts["cond_tokens"] == 3
    # pmi asks exactly as before: no keyword, so its cache entries and backends stay as they were
    ctx = RecordingCtx(COND, UNCOND)
    assert asyncio.run(likelihood_score(ctx, "pmi", "humpback/pmi", {"instruction": "Q"}, "A"))[0] == pytest.approx(1.5)
    assert [c[2] for c in ctx.calls] == [{}, {}]
    ctx = RecordingCtx([], [])
    assert asyncio.run(likelihood_score(ctx, "complete", "t", {}, "A")) == (None, {"score_error": "empty_response"})


class Backend:
    def __init__(self, *capabilities: str):
        self.capabilities = set(capabilities)

    def supports(self, capability: str) -> bool:
        return capability in self.capabilities

    def require(self, capability: str, why: str) -> None:
        if capability not in self.capabilities:
            raise CapabilityError(f"cannot do '{capability}', needed for {why}")


def test_auto_picks_complete_where_continuations_and_the_end_of_turn_are_scored():
    full = Backend(CHAT, NEXT_TOKEN_LOGPROBS, SCORE_CONTINUATION, END_OF_TURN)
    mode, why = resolve_judge_mode("auto", full)
    assert mode == "complete" and why.startswith("auto: ") and "end of the turn" in why
    # judges that read a label (kun.judge, crab.verify, air.score) keep logprob/rubric
    assert resolve_judge_mode("auto", full, LABEL_JUDGE_MODES)[0] == "logprob"
    assert resolve_judge_mode("auto", Backend(CHAT, SCORE_CONTINUATION, END_OF_TURN), LABEL_JUDGE_MODES)[0] == "rubric"
    # no end-of-turn logprob (openai:, vllm:, a scripted backend): as before, and the reason says so
    mode, why = resolve_judge_mode("auto", Backend(CHAT, NEXT_TOKEN_LOGPROBS, SCORE_CONTINUATION))
    assert mode == "logprob" and "end-of-turn" in why
    assert resolve_judge_mode("auto", Backend(CHAT, SCORE_CONTINUATION))[0] == "rubric"
    assert resolve_judge_mode("auto", Backend(CHAT, END_OF_TURN))[0] == "rubric"


def test_complete_is_refused_in_one_line_before_any_call_where_it_cannot_run():
    with pytest.raises(CapabilityError, match=r"end_of_turn_logprob.*--judge-mode complete in stage humpback.curate"):
        require_judge_mode("complete", Backend(CHAT, SCORE_CONTINUATION), "humpback.curate")
    with pytest.raises(CapabilityError, match="score_continuation"):
        require_judge_mode("complete", Backend(CHAT, END_OF_TURN), "humpback.curate")
    require_judge_mode("complete", Backend(SCORE_CONTINUATION, END_OF_TURN), "humpback.curate")


def test_openai_compatible_backends_refuse_the_end_of_turn_in_one_line():
    from btkit_plugins.backends.openai_compat import OpenAICompatBackend

    backend = OpenAICompatBackend("m", {"base_url": "http://127.0.0.1:9/v1"})
    assert not backend.supports(END_OF_TURN)
    with pytest.raises(CapabilityError) as e:
        asyncio.run(backend.score_continuation(None, "text", end_of_turn=True))
    assert "\n" not in str(e.value) and "--judge-mode complete" in str(e.value) and "--judge-mode pmi" in str(e.value)


# -- a whole run ---------------------------------------------------------------------------------
GAINS = [0.5, 0.4, 0.3]  # pmi of each document's pair
ENDS = [-1.0, -20.0, -12.0]  # end_cond: doc 1 looks cut off (term -8)


class EndScripted(ScriptedBackend):
    capabilities = ScriptedBackend.capabilities | {END_OF_TURN}

    async def score_continuation(self, messages, continuation, *, end_of_turn=False):
        self.history.append({"kind": "score_continuation", "messages": messages, "continuation": continuation, "end_of_turn": end_of_turn})
        n = len(continuation.split())
        i = next(i for i in range(len(GAINS)) if words(1, i * 100) in continuation)
        values = [-2.0] * n if messages is None else [-2.0 + GAINS[i]] * n
        if end_of_turn:
            assert messages is not None, "only the conditional pass asks for the end of the turn"
            values.append(ENDS[i])
        return values


def test_a_run_with_auto_curates_with_complete_and_records_why(cli, doubles, tmp_path):
    backend = doubles.script("end", EndScripted(default=lambda messages, params: "What does this list say about the subject?"))
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": words(60, i * 100)} for i in range(len(GAINS))])
    out = tmp_path / "out"
    r = cli("run", "humpback", corpus, "-o", out, "--model", backend.spec, "-q")
    assert r.exit_code == 0, r.output
    from btkit.kit.judges import auto_choice_line

    class Stage:
        label, judge_mode, judge_modes = "humpback.curate", "auto", JUDGE_MODES

    assert auto_choice_line(Stage(), backend).startswith("humpback.curate: --judge-mode auto -> complete (")
    data = read_jsonl(out / "data.jsonl")
    assert sorted(d["meta"]["source_id"] for d in data) == ["d0", "d2"]  # d1: 0.4 - 0.5 * 8 < 0
    cands = {c["source_id"]: c["meta"] for c in read_jsonl(out / "candidates.jsonl") if c["meta"].get("curate_mode")}
    for i in range(len(GAINS)):
        meta = cands[f"d{i}"]
        assert meta["curate_mode"] == "complete" and meta["judge_mode_auto"].startswith("auto: ")
        assert meta["score"] == pytest.approx(GAINS[i] + COMPLETE_WEIGHT * min(0.0, ENDS[i] - END_FLOOR))
    scoring = [h for h in backend.history if h["kind"] == "score_continuation"]
    assert sorted(h["end_of_turn"] for h in scoring) == [False] * 3 + [True] * 3


# -- eval-judge ----------------------------------------------------------------------------------
def gold_pairs(n):
    return [{"instruction": f"Question number {i} about {words(3, i * 100)}?", "response": words(40, i * 100)} for i in range(n)]


def test_eval_judge_says_what_auto_chose_and_keeps_the_parts(cli, scripted, tmp_path):
    gold = write_jsonl(tmp_path / "gold.jsonl", gold_pairs(3))
    backend, spec = scripted(logprobs={"5": -0.1}, continuation_logprobs=lambda m, c: [-1.0] * 2 if m else [-2.0] * 2)
    out = tmp_path / "r.json"
    r = cli("eval-judge", gold, "--judge-mode", "auto", "--judge-mode", "pmi", "--model", spec, "--json", out)
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())["modes"]
    # a scripted backend reads no end-of-turn logprob: auto is logprob, and the report says why
    assert rep[0]["mode"] == "logprob" and rep[0]["auto_choice"].startswith("humpback.curate: --judge-mode auto -> logprob (")
    assert rep[0]["auto_choice"] in r.output and rep[1]["auto_choice"] is None
    assert rep[1]["item_scores"][0]["pmi"] == 1.0 and rep[1]["item_scores"][0]["cond_tokens"] == 2


def test_eval_judge_reports_complete_beside_pmi_per_negative_kind(cli, doubles, tmp_path):
    GAINS[:] = [0.5, 0.4, 0.3]
    gold = write_jsonl(tmp_path / "gold.jsonl", [{"instruction": f"Q{i}?", "response": words(60, i * 100)} for i in range(3)])
    backend = doubles.script("end2", EndScripted())
    out = tmp_path / "r.json"
    r = cli("eval-judge", gold, "--judge-mode", "auto", "--judge-mode", "pmi", "--model", backend.spec, "--json", out)
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())["modes"]
    assert [m["mode"] for m in rep] == ["complete", "pmi"] and "--judge-mode auto -> complete (" in r.output
    assert set(rep[0]["auc_by_negative"]) == {"swapped", "truncated", "text_ref"} and rep[0]["scored"] == rep[0]["items"]
    assert rep[0]["threshold"] == 0.0  # auto resolved to a likelihood mode keeps score >= 0, not the rubric's 5
    assert all("end_cond_logprob" in it for it in rep[0]["item_scores"])


def test_the_run_says_what_auto_chose_and_a_scripted_backend_can_script_the_end_of_turn(cli, scripted, tmp_path):
    """The shipped ScriptedBackend declares END_OF_TURN when given ``end_of_turn_logprob``; a run (not
    quiet) prints auto's choice once per judging stage, after the input checks."""
    backend, spec = scripted(default="What does this list say about the subject?",
                             continuation_logprobs=lambda m, c: [-1.5] * 3 if m else [-2.0] * 3,
                             end_of_turn_logprob=lambda m, c: -25.0)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d", "text": words(60)}])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec)
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if "--judge-mode auto ->" in line]
    assert len(lines) == 1 and lines[0].startswith("humpback.curate: --judge-mode auto -> complete (")
    meta = [c["meta"] for c in read_jsonl(tmp_path / "out" / "candidates.jsonl") if c["meta"].get("curate_mode")][0]
    assert meta["score"] == pytest.approx(0.5 + COMPLETE_WEIGHT * (-25.0 - END_FLOOR))  # pmi 0.5, 13 nats below the floor
    assert [h.get("end_of_turn") for h in backend.history if h["kind"] == "score_continuation"].count(True) == 1
