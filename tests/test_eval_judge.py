"""``btkit eval-judge``: the negative builder, ROC AUC, and whole evaluations (scripted and real model)."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from btkit.backends import CHAT
from btkit_plugins.commands.eval_judge import (TEXT_REFERENCE_INSTRUCTIONS, TRUNCATE_SHARE, WARMUP_MESSAGES, build_items, derangement,
                                      precision_recall, roc_auc, truncate_words)

from conftest import EXAMPLES, write_jsonl

GOLD = EXAMPLES / "gold" / "faq_pairs.jsonl"


def pairs(n):
    return [{"id": f"p{i}", "instruction": f"Question {i}: how does feature {i} work?",
             "response": " ".join(f"w{i}_{k}" for k in range(20))} for i in range(n)]


# -- negatives ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 10, 57])
def test_derangement_moves_every_element(n):
    perm = derangement(n, random.Random(n))
    assert sorted(perm) == list(range(n)) and all(perm[i] != i for i in range(n))


def test_negatives_are_deterministic_and_of_each_kind():
    gold = pairs(10)
    items = build_items(gold, seed=3)
    assert [(it.id, it.instruction, it.response) for it in items] == [(it.id, it.instruction, it.response) for it in build_items(gold, seed=3)]
    assert [it.instruction for it in items] != [it.instruction for it in build_items(gold, seed=4)]
    kinds = {k: [it for it in items if it.kind == k] for k in ("gold", "swapped", "truncated", "text_ref")}
    assert all(len(v) == 10 for v in kinds.values())
    assert all(it.label == 1 for it in kinds["gold"]) and all(it.label == 0 for k in ("swapped", "truncated", "text_ref") for it in kinds[k])
    by_id = {p["id"]: p for p in gold}
    for it in kinds["swapped"]:  # the response kept, another pair's instruction
        assert it.response == by_id[it.gold_id]["response"] and it.instruction != by_id[it.gold_id]["instruction"]
    assert sorted(it.instruction for it in kinds["swapped"]) == sorted(p["instruction"] for p in gold)
    for it in kinds["truncated"]:  # the instruction kept, the first 30% of the words
        assert it.instruction == by_id[it.gold_id]["instruction"] and it.response.split() == by_id[it.gold_id]["response"].split()[:6]
    for it in kinds["text_ref"]:
        assert it.instruction in TEXT_REFERENCE_INSTRUCTIONS and it.response == by_id[it.gold_id]["response"]


def test_docs_and_help_say_what_the_truncated_negative_keeps(cli):
    import btkit_plugins.commands.eval_judge as ej

    assert TRUNCATE_SHARE == 0.3 and "first 30% of its response's words" in ej.__doc__
    r = cli("eval-judge", "--help")
    assert "truncated (only the first 30% of the response's words)" in " ".join(r.output.split())


def test_truncation_keeps_layout_and_skips_what_it_cannot_cut():
    assert truncate_words("one two\n\nthree four five six seven eight nine ten") == "one two\n\nthree"
    assert truncate_words("short") is None
    assert build_items([{"id": "a", "instruction": "Q?", "response": "Yes."}], kinds=["truncated"])[1:] == []


def test_same_instruction_twice_is_not_a_negative():
    gold = [{"id": "a", "instruction": "What is apt?", "response": "A tool."},
            {"id": "b", "instruction": "what is  APT?", "response": "A package tool."}]
    assert [it.kind for it in build_items(gold, kinds=["swapped"])] == ["gold", "gold"]


def test_unknown_negative_kind_is_refused():
    from btkit.errors import BtkitError

    with pytest.raises(BtkitError, match="unknown negative kind"):
        build_items(pairs(3), kinds=["swapped", "shuffled"])


# -- metrics --------------------------------------------------------------------------------------
def brute_force_auc(scores, labels):
    low = float("-inf")
    s = [low if x is None else x for x in scores]
    pos = [x for x, l in zip(s, labels) if l]
    neg = [x for x, l in zip(s, labels) if not l]
    return sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))


def test_roc_auc_known_values_and_ties():
    assert roc_auc([3, 4, 1, 2], [1, 1, 0, 0]) == 1.0
    assert roc_auc([1, 2, 3, 4], [1, 1, 0, 0]) == 0.0
    assert roc_auc([2, 2, 2, 2], [1, 0, 1, 0]) == 0.5
    assert roc_auc([None, None, 1.0], [1, 0, 0]) == 0.25  # unscored ranks below every score
    assert roc_auc([1, 2], [1, 1]) is None


def test_roc_auc_equals_pairwise_count_on_random_data():
    rng = random.Random(7)
    for _ in range(50):
        n = rng.randint(2, 30)
        labels = [rng.randint(0, 1) for _ in range(n)]
        if len(set(labels)) < 2:
            continue
        scores = [None if rng.random() < 0.2 else rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(n)]
        assert roc_auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels))


def test_precision_recall():
    assert precision_recall([True, True, False, True], [1, 0, 1, 1]) == (2 / 3, 2 / 3)
    assert precision_recall([False, False], [1, 0]) == (None, 0.0)


# -- whole evaluations ----------------------------------------------------------------------------
def test_eval_judge_on_a_scripted_backend_reports_auc_precision_recall(cli, scripted, tmp_path):
    gold = write_jsonl(tmp_path / "gold.jsonl", pairs(6))

    def logprobs(messages, continuation):  # the response's own question raises every token's logprob
        n = len(continuation.split())
        if messages is None:
            return [-3.0] * n
        own = continuation.split()[0].split("_")[0][1:] in messages[-1]["content"].split(":")[0]
        return [-2.0 if own else -3.5] * n

    backend, spec = scripted(continuation_logprobs=logprobs)
    out = tmp_path / "r.json"
    r = cli("eval-judge", gold, "--judge-mode", "pmi", "--model", spec, "--negatives", "swapped,text_ref", "--json", out)
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["mode"] == "pmi" and rep["method_stage"] == "humpback.curate"
    assert rep["items"] == 18 and rep["positives"] == 6 and rep["negatives"] == {"swapped": 6, "text_ref": 6}
    assert rep["auc"] == 1.0 and rep["auc_by_negative"] == {"swapped": 1.0, "text_ref": 1.0}
    assert rep["threshold"] == 0.0 and rep["precision"] == 1.0 and rep["recall"] == 1.0 and rep["kept"] == 6
    assert rep["scored_share"] == 1.0 and rep["seconds_per_item"] >= 0
    assert "| pmi | 1.000 | 1.000 | 1.000 | 1.000 | score >= 0.000 | 18/18 (1.000) |" in r.output  # the table
    # one unconditional call per response, shared by the gold pair and its negatives
    assert sum(h["messages"] is None for h in backend.history) == 6
    assert rep["model_calls"] == 18 + 6 and rep["cache_hits"] == 12
    # a warm-up call of the same kind went first, outside the clock and the counts
    assert backend.history[0] == {"kind": "score_continuation", "messages": WARMUP_MESSAGES, "continuation": "Hello."}
    assert len(backend.history) == 1 + 18 + 6 and rep["warmup_error"] is None and rep["warmup_s"] >= 0
    assert rep["items_from_cache"] == 0  # the unconditional shares make some calls cache hits, but no item is served whole
    # the same evaluation again: every item answered by the cache, and the report says so
    r = cli("eval-judge", gold, "--judge-mode", "pmi", "--model", spec, "--negatives", "swapped,text_ref", "--json", out)
    assert r.exit_code == 0, r.output
    again = json.loads(out.read_text())
    assert again["items_from_cache"] == 18 and again["model_calls"] == 0 and again["auc"] == 1.0
    assert len(backend.history) == 2 * 1 + 18 + 6  # only the second warm-up reached the backend
    assert "18/18 items answered whole by the cache" in r.output


def test_eval_judge_clock_starts_after_the_model_is_loaded(cli, scripted, tmp_path):
    """The first call of a backend pays its lazy load: the warm-up takes it, not seconds_per_item.

    Measured against the load's own start and end in this process, so a loaded machine cannot make it fail:
    a clock started before the load would report at least the load plus the run, more than the time from
    the load's end to the command's end."""
    import time

    gold = write_jsonl(tmp_path / "gold.jsonl", pairs(3))
    load: dict[str, float] = {}

    def logprobs(messages, continuation):
        if not load:
            start = time.perf_counter()
            time.sleep(0.6)  # loading the model
            load["end"] = time.perf_counter()
            load["s"] = load["end"] - start
        return [-1.0] * 2 if messages else [-2.0] * 2

    backend, spec = scripted(continuation_logprobs=logprobs)
    t_start = time.perf_counter()
    r = cli("eval-judge", gold, "--judge-mode", "pmi", "--model", spec, "--json", "-")
    t_end = time.perf_counter()
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    rounding = 1e-4  # the report rounds seconds to 4 places
    assert load["s"] >= 0.6
    assert load["s"] - rounding <= rep["warmup_s"] <= t_end - t_start + rounding  # the warm-up paid the whole load
    assert 0 < rep["wall_s"] <= t_end - load["end"] + rounding  # the timed run began after the load had ended
    assert rep["seconds_per_item"] == pytest.approx(rep["wall_s"] / rep["items"], abs=rounding)


def test_eval_judge_warm_up_failure_is_reported_not_fatal(cli, scripted, tmp_path):
    from btkit.errors import BackendError

    gold = write_jsonl(tmp_path / "gold.jsonl", pairs(3))
    backend, spec = scripted(replies=[BackendError("model still loading")], default="Looks right.\nScore: 5")
    r = cli("eval-judge", gold, "--judge-mode", "rubric", "--model", spec, "--json", "-")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["warmup_error"] == "BackendError: model still loading" and rep["scored_share"] == 1.0
    assert backend.history[0]["params"] == {"temperature": 0.0, "max_tokens": 1}


def test_eval_judge_counts_unscored_items_as_rejected(cli, scripted, tmp_path):
    gold = write_jsonl(tmp_path / "gold.jsonl", pairs(4))
    backend, spec = scripted(default="I think this is a fine answer.")  # never writes 'Score: N'
    r = cli("eval-judge", gold, "--judge-mode", "rubric", "--model", spec, "--json", "-")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["scored"] == 0 and rep["scored_share"] == 0.0 and rep["auc"] == 0.5 and rep["auc_scored_only"] is None
    assert rep["recall"] == 0.0 and rep["precision"] is None and rep["errors"] == {"no_score": 16}


def test_eval_judge_keep_top(cli, scripted, tmp_path):
    gold = write_jsonl(tmp_path / "gold.jsonl", pairs(4))
    backend, spec = scripted(continuation_logprobs=lambda m, c: [-1.0 - 0.01 * len(c)] * 2 if m else [-2.0] * 2)
    r = cli("eval-judge", gold, "--judge-mode", "pmi", "--model", spec, "--keep-top", "25", "--json", "-")
    rep = json.loads(r.output)
    assert rep["keep_top"] == 25 and rep["kept"] == 4  # a quarter of 16 items
    assert rep["keep_top_cutoff"] == sorted((s["score"] for s in rep["item_scores"]), reverse=True)[3]


def test_eval_judge_compares_several_modes_in_one_table(cli, scripted, tmp_path):
    gold = write_jsonl(tmp_path / "gold.jsonl", pairs(3))
    backend, spec = scripted(continuation_logprobs=lambda m, c: [-1.0] * 2 if m else [-2.0] * 2)
    out = tmp_path / "r.json"
    r = cli("eval-judge", gold, "--judge-mode", "pmi", "--judge-mode", "ifd", "--model", spec, "--json", out)
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert [m["mode"] for m in rep["modes"]] == ["pmi", "ifd"]
    assert rep["modes"][0]["item_scores"][0]["score"] == 1.0 and rep["modes"][1]["item_scores"][0]["score"] == 0.5
    assert "| pmi |" in r.output and "| ifd |" in r.output


def test_eval_judge_refuses_a_backend_that_cannot_score_before_any_call(cli, scripted, tmp_path):
    gold = write_jsonl(tmp_path / "gold.jsonl", pairs(3))
    backend, spec = scripted(default="x")
    backend.capabilities = frozenset({CHAT})
    r = cli("eval-judge", gold, "--judge-mode", "ifd", "--model", spec)
    assert r.exit_code == 2 and "cannot do 'score_continuation'" in r.output and "--judge-mode ifd" in r.output
    assert backend.history == []


def refusal(result) -> str:
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("method", ["kun", "crab", "air"])
def test_eval_judge_refuses_a_method_with_no_stage_that_scores_pairs(cli, scripted, tmp_path, method):
    """Kun's first curate stage is the perplexity filter: every item used to go unscored, AUC 0.5, exit 0."""
    gold = write_jsonl(tmp_path / "gold.jsonl", pairs(4))
    backend, spec = scripted(default="good", logprobs={"good": -0.1, "bad": -3.0, "Yes": -0.1, "No": -3.0, "5": -0.1},
                             continuation_logprobs=lambda m, c: [-1.0] * 2)
    r = cli("eval-judge", gold, "--method", method, "--model", spec, "--json", "-")
    line = refusal(r)
    assert f"method '{method}' has no stage that does" in line
    assert "stages that can be evaluated: backforth.curate, humpback.curate" in line
    assert backend.history == []


@pytest.mark.parametrize("method,stage", [("kun", "judge"), ("kun", "perplexity"), ("air", "score"), ("crab", "verify"),
                                          ("humpback", "augment"), ("humpback", "nosuch")])
def test_eval_judge_refuses_a_named_stage_that_does_not_score_pairs(cli, scripted, tmp_path, method, stage):
    gold = write_jsonl(tmp_path / "gold.jsonl", pairs(4))
    backend, spec = scripted(default="good", logprobs={"good": -0.1, "bad": -3.0})
    r = cli("eval-judge", gold, "--method", method, "--stage", stage, "--model", spec, "--json", "-")
    line = refusal(r)
    assert f"stage '{method}.{stage}' does not" in line and "backforth.curate, humpback.curate" in line
    assert backend.history == []


def test_eval_judge_evaluates_backforths_curate_stage(cli, scripted, tmp_path):
    gold = write_jsonl(tmp_path / "gold.jsonl", pairs(4))
    def logprobs(messages, continuation):  # as above: the response's own question makes it more likely
        if messages is None:
            return [-3.0] * 2
        own = continuation.split()[0].split("_")[0][1:] in messages[-1]["content"].split(":")[0]
        return [-2.0 if own else -3.5] * 2

    backend, spec = scripted(continuation_logprobs=logprobs)
    r = cli("eval-judge", gold, "--method", "backforth", "--judge-mode", "pmi", "--negatives", "swapped", "--model", spec, "--json", "-")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["method_stage"] == "backforth.curate" and rep["scored_share"] == 1.0 and rep["auc"] == 1.0


@pytest.mark.parametrize("args", [["--limit", "0"], ["--limit", "-1"], ["--concurrency", "0"], ["--keep-top", "nan"],
                                  ["--score-threshold", "inf"]])
def test_eval_judge_refuses_options_out_of_range(cli, scripted, tmp_path, args):
    gold = write_jsonl(tmp_path / "gold.jsonl", pairs(4))
    backend, spec = scripted(continuation_logprobs=lambda m, c: [-1.0] * 2)
    r = cli("eval-judge", gold, "--judge-mode", "pmi", "--model", spec, "--json", "-", *args)
    assert r.exit_code == 2 and f"Error: Invalid value for '{args[0]}'" in r.output
    assert backend.history == []


@pytest.mark.model
def test_eval_judge_pmi_on_the_shipped_gold_set(cli, tmp_path):
    out = tmp_path / "pmi.json"
    r = cli("eval-judge", GOLD, "--judge-mode", "pmi", "--limit", "20", "--json", out)
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["pairs"] == 20 and rep["items"] == 80 and rep["scored_share"] == 1.0
    assert rep["warmup_error"] is None and rep["warmup_s"] > 0 and rep["items_from_cache"] == 0
    for key in ("auc", "precision", "recall", "seconds_per_item"):
        assert isinstance(rep[key], float)
    # PMI sees a wrong question and a question about "the text" (measured on 40 pairs: 0.81, 0.98;
    # 0.5 would be a coin) but not a truncated answer (0.20: the first 30% of an answer is the part
    # most tied to its question), so the overall AUC (0.66) is not the thing to pin here.
    by_kind = rep["auc_by_negative"]
    assert by_kind["swapped"] > 0.7 and by_kind["text_ref"] > 0.8, by_kind


def test_eval_judge_runs_the_stage_through_the_engine_failures_and_hooks_included(cli, scripted, registry, tmp_path):
    """A failed call loses its item (counted as backend_error, as in a run); an after-stage hook applies."""
    from btkit.errors import BackendError
    from btkit.hookspecs import hookimpl

    class RejectQuestionOne:
        @hookimpl
        def btkit_after_stage(self, record, stage, run):
            return "hook_rejected" if record.fields["instruction"].startswith("Question 1:") else None

    registry.register(RejectQuestionOne(), name="reject-question-one")
    gold = write_jsonl(tmp_path / "gold.jsonl", pairs(3))
    backend, spec = scripted(replies=["warm", BackendError("boom")], default="Fine.\nScore: 5")
    r = cli("eval-judge", gold, "--judge-mode", "rubric", "--negatives", "swapped", "--model", spec, "--json", "-")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["errors"] == {"backend_error": 1} and rep["scored"] == rep["items"] - 1
    kept = {s["id"]: s["kept"] for s in rep["item_scores"]}
    assert rep["items"] == 6 and kept["gold:p1"] is False  # the hook drops both items asking question 1
    # every item scores 5: kept unless the hook dropped it (two items) or its call failed (one, maybe one of those two)
    assert sum(kept.values()) in (rep["items"] - 3, rep["items"] - 2)
