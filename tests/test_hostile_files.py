"""Hostile input files: bytes that are not UTF-8, lone surrogates, byte-order marks and CRLF, one
50 MB document, hundreds of thousands of tiny lines, empty files, directories. Each gets a one-line
message naming file, line and field, or is processed with memory that stays flat; nothing already
written is lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from btkit.config import RunConfig, StageSpec
from btkit.engine import run_pipeline

from conftest import read_jsonl, write_jsonl, words

LONG = words(60)


def run(cli, corpus, out, spec, *extra):
    return cli("run", "humpback", corpus, "-o", out, "--model", spec, "-q", *extra)


def error_line(result) -> str:
    lines = [l for l in result.output.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture
def judge(scripted):
    return scripted(default="How do these words relate to each other?", logprobs={"5": -0.1, "1": -3.0})


def test_invalid_utf8_names_file_line_and_field(cli, judge, tmp_path):
    backend, spec = judge
    corpus = tmp_path / "latin1.jsonl"
    corpus.write_bytes(json.dumps({"id": "a", "text": LONG}).encode() + b"\n" +
                       b'{"id": "b", "text": "caf\xe9 ' + LONG.encode() + b'"}\n')
    r = run(cli, corpus, tmp_path / "out", spec)
    assert r.exit_code == 2
    line = error_line(r)
    assert f"{corpus}:2: field 'text': not valid UTF-8 at byte 25" in line and "re-encode" in line
    assert backend.history == []  # found before any model call
    assert "--encoding-errors replace" in line

    # the way out the message names works from the command line
    r = run(cli, corpus, tmp_path / "out2", spec, "--encoding-errors", "replace", "--threshold", "4")
    assert r.exit_code == 0, r.output
    stats = json.loads((tmp_path / "out2" / "stats.json").read_text())
    assert stats["input_lines_with_replaced_text"] == 1
    assert [d["response"].startswith("caf\ufffd ") for d in read_jsonl(tmp_path / "out2" / "data.jsonl")] == [False, True]


def test_lone_surrogate_escapes_name_the_field(cli, judge, tmp_path):
    _, spec = judge
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "ok", "text": "' + LONG + ' \\ud83d\\ude00 emoji pair is fine"}\n'
                      '{"id": "bad", "text": "' + LONG + ' cut emoji \\ud83d"}\n', encoding="utf-8")
    line = error_line(run(cli, corpus, tmp_path / "out", spec))
    assert f"{corpus}:2: field 'text':" in line and "surrogate" in line


def test_replace_mode_decodes_bad_text_and_counts_it(registry, judge, tmp_path):
    """The run option encoding_errors=replace: bad bytes and lone surrogates become U+FFFD, counted."""
    _, spec = judge
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b'{"id": "a", "text": "caf\xe9 ' + LONG.encode() + b'"}\n'
                       b'{"id": "b", "text": "' + LONG.encode() + b' cut \\ud83d"}\n'
                       b'{"id": "c", "text": "' + words(60, start=500).encode() + b'"}\n')
    config = RunConfig(input=corpus, out_dir=tmp_path / "out", stages=[StageSpec("humpback", "augment"), StageSpec("humpback", "curate")],
                       model=spec, options={"encoding_errors": "replace", "threshold": 4}, quiet=True)
    stats = run_pipeline(config, registry)
    assert stats["input_lines_with_replaced_text"] == 2
    data = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert len(data) == 3
    assert data[0]["response"].startswith("caf\ufffd ") and data[1]["response"].endswith("cut \ufffd")
    (tmp_path / "out" / "data.jsonl").read_bytes().decode("utf-8")  # what btkit wrote is valid UTF-8


def test_bom_crlf_and_missing_final_newline_are_fine(cli, judge, tmp_path):
    _, spec = judge
    corpus = tmp_path / "windows.jsonl"
    rows = [json.dumps({"id": f"w{i}", "text": words(40, start=i * 100)}) for i in range(3)]
    corpus.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode())
    r = run(cli, corpus, tmp_path / "out", spec, "--threshold", "4")
    assert r.exit_code == 0, r.output
    assert [d["meta"]["source_id"] for d in read_jsonl(tmp_path / "out" / "data.jsonl")] == ["w0", "w1", "w2"]


@pytest.mark.parametrize("content,message", [
    (b"", "file is empty"),
    (b"\n\n \r\n\t\n", "no records: the file holds only blank lines"),
    (b"\xef\xbb\xbf\n", "no records"),
    (None, "is a directory"),
])
def test_empty_files_and_directories_change_nothing(cli, judge, tmp_path, content, message):
    """A failed invocation on an existing run directory leaves every file in it as it was."""
    _, spec = judge
    good = write_jsonl(tmp_path / "good.jsonl", [{"id": "a", "text": LONG}])
    out = tmp_path / "out"
    assert run(cli, good, out, spec).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    bad = tmp_path / "bad.jsonl"
    if content is None:
        bad.mkdir()
    else:
        bad.write_bytes(content)
    r = run(cli, bad, out, spec)
    assert r.exit_code == 2 and message in error_line(r) and str(bad) in error_line(r)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def _child_peak_rss_mb(cmd: list[str], cwd: Path | None = None) -> tuple[float, subprocess.CompletedProcess]:
    """Run a command; peak RSS of that one child, read with getrusage in a wrapper process."""
    wrapper = ("import resource, subprocess, sys, json\n"
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "print(json.dumps({'rc': p.returncode, 'rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, 'err': p.stderr[-2000:]}))")
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, cwd=cwd, timeout=300)
    out = json.loads(proc.stdout)
    return out["rss_kb"] / 1024, out


@pytest.mark.slow
def test_a_50mb_document_is_segmented_in_bounded_memory(tmp_path):
    """One 50 MB document on one JSON line: read once, cut into segments of at most --max-words
    (duplicated paragraphs are dropped as duplicates, counted), the rest sent to the model."""
    paragraph = words(380, start=0)
    distinct = [words(380, start=(i + 1) * 1000) for i in range(3)]
    repeats = 50 * 1024 * 1024 // (len(paragraph) + 2)
    text = "\n\n".join(distinct + [paragraph] * repeats)
    corpus = tmp_path / "big.jsonl"
    corpus.write_text(json.dumps({"id": "big", "text": text}) + "\n", encoding="utf-8")
    assert corpus.stat().st_size > 50 * 1024 * 1024
    out = tmp_path / "out"
    rss, res = _child_peak_rss_mb([sys.executable, "-m", "btkit.cli", "run", "humpback", str(corpus), "-o", str(out),
                                   "--model", "echo:What do these words say about each other?", "--judge-mode", "rubric",
                                   "--cache", str(tmp_path / "c.sqlite"), "-q"])
    assert res["rc"] == 0, res["err"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["units"] == 3 + repeats
    assert stats["dropped_by_reason"]["humpback.segment:duplicate"] == repeats - 1
    assert stats["calls"] == 4 * 2  # 4 distinct segments, augment + curate each
    assert all(len(l["fields"]["text"].split()) <= 400 for l in read_jsonl(out / "candidates.jsonl")[:10])
    assert rss < 1024, f"peak RSS {rss:.0f} MB for a 50 MB document"


@pytest.mark.slow
def test_many_tiny_lines_keep_memory_flat(tmp_path):
    """300,000 lines peak no higher than ten thousand: the engine streams (no per-unit state kept; 30x the
    units would show as tens of MB at a hundred bytes each). A million lines took 52 s of CI time to say the same."""
    peaks = {}
    for n in (10_000, 300_000):
        corpus = tmp_path / f"tiny{n}.jsonl"
        with corpus.open("w") as fh:
            fh.writelines(f'{{"text": "w{i}"}}\n' for i in range(n))
        out = tmp_path / f"out{n}"
        peaks[n], res = _child_peak_rss_mb([sys.executable, "-m", "btkit.cli", "run", "humpback", str(corpus), "-o", str(out),
                                            "--model", "echo:", "--cache", str(tmp_path / "c.sqlite"), "-q"])
        assert res["rc"] == 0, res["err"]
        stats = json.loads((out / "stats.json").read_text())
        assert stats["units"] == n and stats["dropped_by_reason"] == {"humpback.segment:too_short": n}
    assert peaks[300_000] < peaks[10_000] + 15, peaks



def test_a_document_without_spaces_is_cut_too(registry):
    from btkit.kit.segment import segments

    assert all(len(s) <= 400 * 50 for s in segments("x" * 5_000_000, 400))
