"""Back-and-Forth: golden rewrite prompt, the rewrite parser, Humpback's stages under this method's name,
the record keeping the original text next to the rewritten response, and a real-model run."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from btkit.methods import ParseError
from btkit.prompts import PromptLibrary
from btkit_plugins.methods.backforth import parse_rewrite

from conftest import EXAMPLES, read_jsonl, words, write_jsonl

DOC = ("Posted by admin | 3 comments\n\nThe dpkg tool installs a single .deb file but does not fetch its dependencies. "
       "The apt tool resolves dependencies and downloads them for you.\n\nShare this on social media!")


def test_golden_rewrite_prompt(registry, golden):
    variables = {"instruction": "What is the difference between dpkg and apt?", "text": DOC, "response": DOC}
    golden("backforth/rewrite.txt", PromptLibrary(registry.prompt_roots()).render("backforth/rewrite", variables))


def test_rewrite_prompt_holds_instruction_and_original_document(registry):
    p = PromptLibrary(registry.prompt_roots()).render("backforth/rewrite", {"instruction": "Q?", "text": DOC, "response": "other"})
    assert [m["role"] for m in p.messages] == ["system", "user"]
    assert "Q?" in p.messages[-1]["content"] and DOC in p.messages[-1]["content"]


@pytest.mark.parametrize("reply,expected", [
    ("dpkg installs one package file; apt also resolves and downloads dependencies.", "dpkg installs one package file; apt also resolves and downloads dependencies."),
    ("Rewritten answer: dpkg installs one file, apt resolves dependencies too.", "dpkg installs one file, apt resolves dependencies too."),
    ("**Answer:**\ndpkg installs one file, while apt resolves dependencies.", "dpkg installs one file, while apt resolves dependencies."),
    ("Here is the rewritten response:\n\n- dpkg: one .deb file\n- apt: dependencies too", "- dpkg: one .deb file\n- apt: dependencies too"),
])
def test_rewrite_parser_strips_labels(reply, expected):
    assert parse_rewrite(reply) == expected


@pytest.mark.parametrize("reply,reason", [
    ("", "empty_reply"), (None, "empty_reply"), ("Rewritten answer:", "empty_reply"),
    ("I'm sorry, but I cannot rewrite this document.", "refusal"),
    ("Use apt.", "too_short"),
])
def test_rewrite_parser_refuses(reply, reason):
    with pytest.raises(ParseError) as e:
        parse_rewrite(reply)
    assert e.value.reason == reason


REWRITTEN = "dpkg installs a single .deb file and does not fetch dependencies, while apt resolves and downloads them for you."


def backforth_reply(messages, params):
    content = messages[-1]["content"]
    if "Rewrite the document into the answer" in content:
        if words(1, 100) in content:
            return "I'm sorry, but I can't do that."
        return REWRITTEN
    return "What is the difference between dpkg and apt?"


def test_run_rewrites_and_keeps_the_original(cli, scripted, tmp_path):
    backend, spec = scripted(default=backforth_reply, logprobs={"5": math.log(0.9), "4": math.log(0.1)})
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": DOC + " " + words(40)}, {"id": "d1", "text": words(60, 100)}])
    out = tmp_path / "out"
    r = cli("run", "backforth", corpus, "-o", out, "--model", spec, "-q")
    assert r.exit_code == 0, r.output
    [row] = read_jsonl(out / "data.jsonl")
    assert row["response"] == REWRITTEN
    assert row["meta"]["original_response"].startswith("Posted by admin")
    assert row["instruction"] == "What is the difference between dpkg and apt?"
    assert row["meta"]["method"] == "backforth" and row["meta"]["score"] == 5
    assert [s["stage"] for s in row["meta"]["lineage"]] == ["backforth.augment", "backforth.curate", "backforth.rewrite"]
    assert [s["template"] for s in row["meta"]["lineage"]] == ["humpback/augment", "humpback/curate", "backforth/rewrite"]
    cands = {c["id"]: c for c in read_jsonl(out / "candidates.jsonl")}
    assert cands["d0#0"]["fields"]["text"].startswith("Posted by admin")  # the original text stays in the record
    assert cands["d1#0"]["reason"] == "rewrite_refusal" and cands["d1#0"]["dropped_at"] == "backforth.rewrite"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["stages"]["backforth.rewrite"]["dropped"] == {"rewrite_refusal": 1}
    rewrite_call = [h for h in backend.history if h["kind"] == "chat" and "Rewrite the document" in h["messages"][-1]["content"]][0]
    assert rewrite_call["params"]["temperature"] == 0.7


def test_curation_threshold_defaults_to_the_top_score(cli, scripted, tmp_path):
    backend, spec = scripted(default=backforth_reply, logprobs={"4": -0.1, "5": -3.0})
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": words(60)}])
    assert cli("run", "backforth", corpus, "-o", tmp_path / "a", "--model", spec, "-q").exit_code == 0
    cands = read_jsonl(tmp_path / "a" / "candidates.jsonl")
    assert cands[0]["reason"] == "below_threshold" and cands[0]["dropped_at"] == "backforth.curate"
    assert cli("run", "backforth", corpus, "-o", tmp_path / "b", "--model", spec, "--threshold", "4", "-q").exit_code == 0
    assert read_jsonl(tmp_path / "b" / "data.jsonl")[0]["response"] == REWRITTEN


def test_truncated_rewrite_is_dropped_with_its_reason(cli, scripted, tmp_path):
    from btkit.backends import Completion

    def reply(messages, params):
        if "Rewrite the document" in messages[-1]["content"]:
            return Completion(text="dpkg installs a single", finish_reason="length")
        return "What is the difference between dpkg and apt?"

    backend, spec = scripted(default=reply, logprobs={"5": -0.01})
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": words(60)}])
    assert cli("run", "backforth", corpus, "-o", tmp_path / "out", "--model", spec, "-q").exit_code == 0
    [cand] = read_jsonl(tmp_path / "out" / "candidates.jsonl")
    assert cand["reason"] == "rewrite_truncated" and cand["lineage"][-1]["parse_error"] == "truncated"


@pytest.mark.model
def test_backforth_with_embedded_model(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "btkit.cli", "run", "backforth", str(EXAMPLES / "corpus.jsonl"), "-o", str(out), "--limit", "2",
           "--judge-mode", "logprob", "--threshold", "1", "--shots", "1", "--max-tokens", "48",
           # room for the instruction, so that candidates get past augmentation to curation and rewriting
           "-S", "augment.max_tokens=128",
           # seeded: unseeded llama.cpp sampling differs per process, and some draws truncate every instruction
           "--sample-seed", "2", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for name in ("data.jsonl", "candidates.jsonl", "stats.json"):
        assert (out / name).is_file()
    cands = read_jsonl(out / "candidates.jsonl")
    assert len({c["source_id"] for c in cands}) == 2
    rewritten = 0
    for c in cands:
        assert (c["status"] == "kept") == (c["reason"] is None)
        if c["status"] == "dropped":
            assert c["dropped_at"].startswith("backforth.") and c["reason"]
        stages = [s["stage"] for s in c["lineage"]]
        if "backforth.curate" in stages:
            # curated by next-token logprobs; threshold 1 passes every score, so curation leads to a rewrite
            assert set(c["meta"]["score_dist"]) == {"1", "2", "3", "4", "5"} and "backforth.rewrite" in stages, stages
        if "backforth.rewrite" in stages:
            rewritten += 1
            assert c["fields"]["text"] and c["lineage"][-1]["template"] == "backforth/rewrite"
            assert c["status"] == "kept" or c["dropped_at"] == "backforth.rewrite"
    assert rewritten >= 1, [(c["id"], c.get("dropped_at"), c["reason"]) for c in cands]
    rows = read_jsonl(out / "data.jsonl")
    assert len(rows) == sum(c["status"] == "kept" for c in cands)
    for row in rows:
        assert row["instruction"] and row["response"] and row["meta"]["original_response"]
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["stages"]) == {"backforth.augment", "backforth.curate", "backforth.rewrite"}
    assert stats["records"] == len(cands) == stats["kept"] + stats["dropped"]


def test_augment_is_humpbacks_stage_under_this_methods_name_and_zero_options_stay_zero(registry):
    """backforth.augment comes from the humpback method through the registry (no import of its module)."""
    backforth = registry.method("backforth")
    augment = backforth.stage_with_defaults("augment", {"shots": 0})
    assert augment.label == "backforth.augment" and augment.templates == ("humpback/augment",)
    assert augment.shots == 0  # zero-shot, not the default 3
    assert backforth.stage_with_defaults("augment", {}).shots == 3  # the click option's default
    assert backforth.stage_with_defaults("rewrite", {"min_rewrite_words": 0}).min_words == 0
    source = (EXAMPLES.parent / "plugins" / "methods" / "backforth.py").read_text(encoding="utf-8")
    assert "from .humpback" not in source and "methods.humpback" not in source
