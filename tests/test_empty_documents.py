"""Documents with no text are journalled as dropped, with a reason, by every method; never silently skipped."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import read_jsonl, write_jsonl

LONG = " ".join(f"word{i}" for i in range(60)) + "."
#: Every segmenting method, and the stage its prepare step journals drops under.
SEGMENTING = {"humpback": "humpback.segment", "kun": "kun.clean", "backforth": "backforth.segment", "air": "air.segment", "cycle_instruct": "cycle_instruct.segment"}


def run_process(method: str, corpus, out) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "btkit.cli", "run", method, str(corpus), "-o", str(out), "--model", "echo:", "-q"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("method", sorted(SEGMENTING))
def test_empty_and_blank_documents_are_dropped_as_empty_text(tmp_path, method):
    corpus = write_jsonl(tmp_path / "c.jsonl", [
        {"id": "full", "text": LONG}, {"id": "empty", "text": ""}, {"id": "blank", "text": " \n\t\r\n \u00a0"},
        {"id": "headers", "text": "## Title\n\n---\n"},
    ])
    out = tmp_path / "out"
    proc = run_process(method, corpus, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {l["source_id"]: l for l in read_jsonl(out / "candidates.jsonl")}
    assert set(lines) == {"full", "empty", "blank", "headers"}  # one journalled record per document
    for doc in ("empty", "blank", "headers"):
        line = lines[doc]
        assert (line["status"], line["dropped_at"], line["reason"]) == ("dropped", SEGMENTING[method], "empty_text"), line
        assert line["lineage"] == []  # no model call was spent on it
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dropped_by_reason"][f"{SEGMENTING[method]}:empty_text"] == 3


def test_crab_pairs_with_blank_instruction_or_response_are_dropped(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [
        {"id": "full", "instruction": "Say something.", "response": LONG},
        {"id": "blank", "instruction": " \n ", "response": LONG}, {"id": "empty", "instruction": "Say something.", "response": ""},
    ])
    out = tmp_path / "out"
    proc = run_process("crab", corpus, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {l["source_id"]: l for l in read_jsonl(out / "candidates.jsonl") if l["source_id"] != "full"}
    assert {k: (l["dropped_at"], l["reason"]) for k, l in lines.items()} == {
        "blank": ("crab.prepare", "empty_pair"), "empty": ("crab.prepare", "empty_pair")}
