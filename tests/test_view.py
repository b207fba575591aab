"""``btkit view``: a run's records in the terminal, filtered by kept/dropped, reason, stage, id, text; paged."""

from __future__ import annotations

import re

import pytest

from btkit.errors import BackendError
from btkit_plugins.results import view

from conftest import read_jsonl, words, write_jsonl

HOSTILE = "What does [bold red]this[/] list [link=http://x]say[/link]?"


def reply_for(messages, params):
    """Keyed by document: d0 and d4 kept, d1 below threshold, d2 unparseable, d3 refused, d5 a failed judge call."""
    content = messages[-1]["content"]
    judge = "Score: <rating>" in content
    for i, (instruction, verdict) in enumerate([
        ("What does the first list hold?", "Complete.\nScore: 5"),
        ("What does the second list hold?", "Partly.\nScore: 2"),
        ("What does the third list hold?", "No idea."),
        ("Sorry, I cannot do that.", None),
        (HOSTILE, "Fine.\nScore: 5"),
        ("What does the sixth list hold?", BackendError("HTTP 503 from the judge")),
    ]):
        if words(1, i * 100) in content:
            if not judge:
                return instruction
            if isinstance(verdict, Exception):
                raise verdict
            return verdict
    raise AssertionError("unexpected prompt")


@pytest.fixture
def run_dir(cli, scripted, tmp_path):
    backend, spec = scripted(default=reply_for)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": words(60, i * 100)} for i in range(6)])
    out = tmp_path / "run"
    r = cli("run", "humpback", corpus, "-o", out, "--model", spec, "--judge-mode", "rubric", "-q")
    assert r.exit_code == 0, r.output
    return out


def ids(output: str) -> list[str]:
    """Record ids in panel titles, in order (``d3#0  dropped at ...``)."""
    return re.findall(r"(d\d#\d)  (?:kept|dropped)", output)


def show(cli, run_dir, *args):
    r = cli("view", run_dir, "--no-pager", "--width", "250", *args)
    assert r.exit_code == 0, r.output
    return r.output


def test_all_records_with_lineage_and_scores(cli, run_dir):
    out = show(cli, run_dir)
    assert ids(out) == [f"d{i}#0" for i in range(6)]
    assert "records 1-6 of 6, page 1/1" in out
    assert "What does the first list hold?" in out and "score=5 (threshold 5)" in out
    assert "dropped at humpback.curate: below_threshold" in out
    assert "lineage (2 steps)" in out and "humpback/augment@" in out and "humpback/curate@" in out
    assert "raw: Complete." in out  # the judge's raw reply, in its lineage step
    assert "parse error: no_score" in out
    assert "error: HTTP 503 from the judge" in out


def test_record_text_is_never_rich_markup(cli, run_dir):
    out = show(cli, run_dir, "--id", "d4")
    assert HOSTILE in out  # printed as written, brackets and all


@pytest.mark.parametrize("args,expected", [
    (("--kept",), ["d0#0", "d4#0"]),
    (("--dropped",), ["d1#0", "d2#0", "d3#0", "d5#0"]),
    (("--reason", "below_threshold"), ["d1#0"]),
    (("--reason", "below_threshold", "--reason", "instruction_refusal"), ["d1#0", "d3#0"]),
    (("--dropped", "--stage", "augment"), ["d3#0"]),
    (("--dropped", "--stage", "humpback.curate"), ["d1#0", "d2#0", "d5#0"]),
    (("--stage", "curate"), ["d0#0", "d1#0", "d2#0", "d4#0", "d5#0"]),  # dropped there, or kept after a call there
    (("--stage", "augment"), ["d0#0", "d3#0", "d4#0"]),
    (("--kept", "--reason", "below_threshold"), []),
    (("--grep", "SIXTH LIST"), ["d5#0"]),
    (("--id", "d2"), ["d2#0"]),
])
def test_filters(cli, run_dir, args, expected):
    out = show(cli, run_dir, *args)
    assert ids(out) == expected
    if not expected:
        assert "no record matches" in out


def test_filters_agree_with_the_journal(cli, run_dir):
    lines = read_jsonl(run_dir / "candidates.jsonl")
    for reason in {l["reason"] for l in lines if l["reason"]}:
        out = show(cli, run_dir, "--reason", reason, "--page-size", "100")
        assert ids(out) == [l["id"] for l in lines if l["reason"] == reason]


def test_paging(cli, run_dir):
    pages = [show(cli, run_dir, "--page-size", "4", "--page", str(p)) for p in (1, 2, 3)]
    assert ids(pages[0]) == ["d0#0", "d1#0", "d2#0", "d3#0"] and "records 1-4 of 6, page 1/2" in pages[0]
    assert "next: --page 2" in pages[0]
    assert ids(pages[1]) == ["d4#0", "d5#0"] and "records 5-6 of 6, page 2/2" in pages[1] and "next:" not in pages[1]
    assert ids(pages[2]) == [] and "no records on page 3 (6 match, 2 pages)" in pages[2]
    dropped = show(cli, run_dir, "--dropped", "--page-size", "3", "--page", "2")
    assert ids(dropped) == ["d5#0"] and "records 4-4 of 4, page 2/2" in dropped and "(filter: dropped)" in dropped


def test_long_text_is_cut_unless_full(cli, run_dir):
    out = show(cli, run_dir, "--id", "d0", "--no-lineage")
    assert "more characters; --full shows all" not in out  # 60 words fit
    long_out = view._clip("x" * 1000, view.CLIP)
    assert long_out.endswith("[400 more characters; --full shows all]")
    assert "lineage" not in out


def test_select_reads_only_the_page():
    lines = ({"id": f"r{i}", "status": "kept" if i % 2 else "dropped", "reason": None if i % 2 else "x"} for i in range(1000))
    page, total = view.select(lines, 3, 7, status="kept")
    assert total == 500 and [l["id"] for l in page] == [f"r{i}" for i in range(29, 43, 2)]


def test_not_a_run_directory(cli, tmp_path):
    r = cli("view", tmp_path)
    assert r.exit_code == 2 and "no candidates.jsonl" in r.output
