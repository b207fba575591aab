"""``btkit loop humpback`` end to end on CPU from the embedded model, with tiny settings.

Checked, not assumed: iteration 2 is curated by the model trained in iteration 1 (its path in every
curate call's lineage, its content hash in the report equal to the folder's), that model computes
something other than the base model on the same prompt, and a re-run recomputes nothing.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from btkit_plugins.train.base_model import model_digest

from conftest import EXAMPLES, read_jsonl, write_jsonl

pytestmark = [pytest.mark.model, pytest.mark.slow]

TINY = ["--max-steps", "1", "--batch-size", "2", "--max-length", "384", "--lora-r", "8", "--lr", "2e-3"]


def _next_token_scores(model_dir: Path, registry) -> float:
    """Log-likelihood of a fixed response under a model (the same prompt for every model)."""
    backend = registry.make_backend(f"transformers:{model_dir}")
    try:
        messages = [{"role": "user", "content": "What does the ls command do?"}]
        return float(sum(asyncio.run(backend.score_continuation(messages, "It lists the files in a directory."))))
    finally:
        asyncio.run(backend.aclose())


def test_humpback_loop_end_to_end(cli, registry, tmp_path: Path, hf_base: Path) -> None:
    seed = tmp_path / "seed.jsonl"
    write_jsonl(seed, read_jsonl(EXAMPLES / "seed.jsonl")[:4])
    loop = tmp_path / "loop"
    args = ["loop", "humpback", EXAMPLES / "corpus.jsonl", "--seed", seed, "--limit", "3", "-o", loop, "--base", hf_base,
            *TINY, "--judge-mode", "pmi", "--threshold", "-1000", "--max-tokens", "48", "-q"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    report = json.loads((loop / "report.json").read_text())
    it1, it2 = report["iterations"]

    # each step is a folder with its summary; models are where the report says, with the hash it says
    for step in ("backward", "m0", "curate-m0", "m1", "curate-m1", "m2"):
        assert (loop / step / "step.json").is_file(), step
    assert it1["model"] == f"transformers:{loop / 'm1'}"
    assert it1["model_sha256"] == model_digest(loop / "m1")
    assert it2["curated_by"] == it1["model"] and it2["curated_by_sha256"] == it1["model_sha256"]

    # M1 trained on the seed (tagged) plus curated augmented pairs (tagged): more rows than M0, another model
    m1_rows = read_jsonl(loop / "m1" / "rows.jsonl")
    systems = {r["prompt"][0]["content"] for r in m1_rows if r["prompt"][0]["role"] == "system"}
    assert systems == {"Answer in the style of an AI Assistant.", "Answer with knowledge from web search."}
    assert it1["trained_on"] > it1["seed_pairs"] == 4
    assert report["m0"]["model_sha256"] != it1["model_sha256"]

    # iteration 2's curate calls were made by M1: its path in the lineage of every scored record
    curated = [r for r in read_jsonl(loop / "curate-m1" / "candidates.jsonl") if r["unit"] != "extra"]
    curate_steps = [s for r in curated for s in r["lineage"] if s.get("stage") == "humpback.curate"]
    assert curate_steps and {s["model"] for s in curate_steps} == {f"transformers:{loop / 'm1'}"}
    augment_steps = [s for r in curated for s in r["lineage"] if s.get("stage") == "humpback.augment"]
    assert augment_steps and {s["model"] for s in augment_steps} == {f"transformers:{loop / 'backward'}"}

    # and M1 is not the base model: the same response scores differently under each
    assert abs(_next_token_scores(loop / "m1", registry) - _next_token_scores(hf_base, registry)) > 1e-3

    # a re-run of the same command recomputes nothing: every step skipped, no file rewritten
    stamps = {p: p.stat().st_mtime_ns for p in loop.rglob("*") if p.is_file() and p.name != "report.json"}
    result = cli(*args[:-1])
    assert result.exit_code == 0, result.output
    assert result.output.count("complete, skipped") == 6
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # other settings on the same loop directory are refused with one line
    result = cli(*args[:-1], "--iterations", "3")
    assert result.exit_code == 2 and "holds a loop" in result.output and "iterations" in result.output
