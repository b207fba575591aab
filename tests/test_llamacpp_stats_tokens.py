"""Logprob and likelihood curation on llama.cpp count the tokens they read in stats.json (they were 0)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import EXAMPLES

pytestmark = pytest.mark.model


def run(tmp_path, name: str, *extra: str) -> dict:
    out = tmp_path / name
    cmd = [sys.executable, "-m", "btkit.cli", "run", "humpback", str(EXAMPLES / "corpus.jsonl"), "-o", str(out), "--limit", "2",
           # augment gets room for an instruction: at 32 tokens some llama.cpp builds truncate both, and nothing is curated
           "--max-tokens", "32", "-S", "augment.max_tokens=96", "--sample-seed", "1", "--threshold", "1", "--cache", str(tmp_path / "cache.sqlite"), "-q", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "stats.json").read_text())


@pytest.mark.parametrize("mode", ["logprob", "pmi"])
def test_scoring_calls_count_the_tokens_they_read(tmp_path, mode):
    """One forward pass over the judging prompt (logprob), or two over the response with and
    without the instruction (pmi): each reads at least the response's tokens. A re-run served from
    the cache reports the same counts, as cached chat steps do."""
    stats = run(tmp_path, "first", "--judge-mode", mode)
    curate = stats["stages"]["humpback.curate"]
    assert curate["calls"] >= 1
    assert curate["tokens_in"] >= 20 * curate["calls"] and curate["tokens_out"] == 0
    assert stats["tokens_in"] == stats["stages"]["humpback.augment"]["tokens_in"] + curate["tokens_in"]
    again = run(tmp_path, "again", "--judge-mode", mode)
    assert again["stages"]["humpback.curate"]["tokens_in"] == curate["tokens_in"]
    assert again["stages"]["humpback.curate"]["cache_hits"] == again["stages"]["humpback.curate"]["calls"]
