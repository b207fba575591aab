"""End to end on the real embedded SmolLM2-135M GGUF: what a user gets from the README's first command."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import EXAMPLES, read_jsonl, write_jsonl

pytestmark = pytest.mark.model


def test_humpback_on_examples_with_embedded_model(tmp_path):
    """5 documents, 2 candidates each (two seeded requests: llamacpp: has no n>1), judged by the
    rubric digits' logprobs, keeping the top half. A fixed sampling seed makes the run reproducible,
    and the keep rule keeps at least one pair whenever any pair was scored, so the test asks for a
    non-empty data.jsonl without hoping the 135M model's judge gives any particular score."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "btkit.cli", "run", "humpback", str(EXAMPLES / "corpus.jsonl"), "-o", str(out),
           "--seed", str(EXAMPLES / "seed.jsonl"), "--limit", "5", "--shots", "2", "--max-tokens", "64",
           "--candidates", "2", "--sample-seed", "1", "--judge-mode", "logprob", "--keep-top", "50", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for name in ("data.jsonl", "candidates.jsonl", "stats.json", "failures.jsonl", "run.json"):
        assert (out / name).is_file(), name
    stats = json.loads((out / "stats.json").read_text())
    cands = read_jsonl(out / "candidates.jsonl")
    corpus = {r["id"]: r["text"] for r in read_jsonl(EXAMPLES / "corpus.jsonl")}
    assert stats["status"] == "complete" and stats["model"] == "llamacpp:default"
    assert len({c["source_id"] for c in cands}) == 5
    assert stats["records"] == len(cands) == stats["kept"] + stats["dropped"]
    assert sorted(c["id"].rsplit("~", 1)[1] for c in cands) == ["0"] * 5 + ["1"] * 5  # one segment each, 2 candidates
    for c in cands:  # each candidate its own request, seed + i
        step = c["lineage"][0]
        assert step["model"] == "llamacpp:default" and step["template"] == "humpback/augment"
        assert step["params"]["seed"] == 1 + int(c["id"].rsplit("~", 1)[1])
        assert step["raw"] is not None and (step.get("parsed") or step.get("parse_error"))
        assert (c["status"] == "kept") == (c["reason"] is None)
    assert stats["stages"]["humpback.augment"]["tokens_out"] > 0

    # curate scored pairs: every pair that reached it has a score (logprob mode cannot fail to parse)
    cur = stats["stages"]["humpback.curate"]
    scored = [c for c in cands if c["meta"].get("scored_by") == "humpback.curate"]
    assert cur["in"] == len(scored) >= 1 and cur["parse_failures_total"] == 0
    assert set(cur["dropped"]) <= {"below_keep_top"}
    for c in scored:
        meta = c["meta"]
        assert meta["curate_mode"] == "logprob" and set(meta["score_dist"]) == {"1", "2", "3", "4", "5"}
        assert meta["score"] in (1, 2, 3, 4, 5) and 1 <= meta["score_expected"] <= 5

    # data.jsonl: the top half of the scored pairs, by expected score, with the paper's source tag
    data = read_jsonl(out / "data.jsonl")
    assert len(data) == stats["kept"] == math.ceil(len(scored) / 2) >= 1
    kept_ids = {row["meta"]["id"] for row in data}
    dropped_scores = [c["meta"]["score_expected"] for c in scored if c["id"] not in kept_ids]
    for row in data:
        assert set(row) == {"instruction", "response", "system", "meta"}
        assert row["system"] == "Answer with knowledge from web search."
        assert row["instruction"].strip() and row["response"].strip()
        assert all(par in corpus[row["meta"]["source_id"]] for par in row["response"].split("\n\n"))  # the segment is the response
        meta = row["meta"]
        assert meta["method"] == "humpback" and meta["keep_top"] == 50 and meta["score"] in (1, 2, 3, 4, 5)
        assert all(meta["score_expected"] >= d for d in dropped_scores)
        lineage = meta["lineage"]
        assert [s["stage"] for s in lineage] == ["humpback.augment", "humpback.curate"]
        assert lineage[0]["parsed"] == {"instruction": row["instruction"]} and lineage[1]["kind"] == "next_token_logprobs"


def test_rubric_mode_on_real_model_counts_unparseable_scores(cli, tmp_path):
    """The 135M model rarely writes 'Score: N': every pair is either scored or counted as unparseable."""
    corpus = write_jsonl(tmp_path / "c.jsonl", [json.loads(l) for l in (EXAMPLES / "corpus.jsonl").read_text().splitlines()[:2]])
    out = tmp_path / "out"
    r = cli("run", "humpback", corpus, "-o", out, "--judge-mode", "rubric", "--max-tokens", "96", "-q")
    assert r.exit_code == 0, r.output
    stats = json.loads((out / "stats.json").read_text())
    cur = stats["stages"]["humpback.curate"]
    assert cur["in"] == cur["out"] + sum(cur["dropped"].values())
    assert cur["dropped"].get("unparseable_score", 0) == cur["parse_failures_total"]
    assert set(cur["dropped"]) <= {"unparseable_score", "below_threshold"}


def test_rerun_same_command_makes_no_new_model_calls(cli, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [json.loads(l) for l in (EXAMPLES / "corpus.jsonl").read_text().splitlines()[:2]])
    assert cli("run", "humpback", corpus, "-o", tmp_path / "a", "-q").exit_code == 0
    assert cli("run", "humpback", corpus, "-o", tmp_path / "b", "--threshold", "1", "-q").exit_code == 0
    stats = json.loads((tmp_path / "b" / "stats.json").read_text())
    assert stats["model_calls_this_invocation"] == 0 and stats["cache_hits_this_invocation"] > 0
    a = read_jsonl(tmp_path / "a" / "candidates.jsonl")
    b = read_jsonl(tmp_path / "b" / "candidates.jsonl")
    assert [x["fields"].get("instruction") for x in a] == [x["fields"].get("instruction") for x in b]


def test_llamacpp_logprobs_find_the_digits_after_score_space():
    """SmolLM2 puts a space token before a digit: the candidate digits must carry real probability mass."""
    import asyncio

    from btkit_plugins.backends.llamacpp import LlamaCppBackend

    b = LlamaCppBackend("default", {})
    msgs = [{"role": "user", "content": "Rate this answer from 1 to 5 and write 'Score: N'.\nQ: What is 2+2?\nA: 4."}]
    lp = asyncio.run(b.next_token_logprobs(msgs, "Score: ", ["1", "2", "3", "4", "5"]))
    import math

    assert sum(math.exp(v) for v in lp.values()) > 0.2
    asyncio.run(b.aclose())


def test_help_is_fast_and_import_light():
    code = ("import sys; from click.testing import CliRunner; from btkit.cli import cli; "
            "r = CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0; "
            "r = CliRunner().invoke(cli, ['run', 'humpback', '--help']); assert r.exit_code == 0; "
            "heavy = [m for m in ('llama_cpp', 'torch', 'transformers', 'litellm', 'openai') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
