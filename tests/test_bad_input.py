"""Bad input: one clear line naming file, line and field; non-zero exit; nothing already written lost."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import read_jsonl, write_jsonl

LONG = " ".join(f"word{i}" for i in range(60))


def run(cli, corpus, out, spec, *extra):
    return cli("run", "humpback", corpus, "-o", out, "--model", spec, "-q", *extra)


@pytest.fixture
def judge(scripted):
    return scripted(default="How do the words relate?", logprobs={"5": -0.1, "1": -3.0})


def error_line(result) -> str:
    lines = [l for l in result.output.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_missing_file(cli, judge, tmp_path):
    backend, spec = judge
    r = run(cli, tmp_path / "nope.jsonl", tmp_path / "out", spec)
    assert r.exit_code == 2
    assert "nope.jsonl: file not found" in error_line(r)
    assert backend.history == []


def test_malformed_line_names_file_and_line(cli, judge, tmp_path):
    backend, spec = judge
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": LONG}) + "\n" + json.dumps({"text": LONG}) + "\n{\"text\": broken\n")
    r = run(cli, corpus, tmp_path / "out", spec)
    assert r.exit_code == 2
    assert f"{corpus}:3: not valid JSON" in error_line(r)
    assert backend.history == []  # validated before the first model call


def test_missing_text_field_names_field_and_option(cli, judge, tmp_path):
    _, spec = judge
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": LONG}, {"body": LONG}])
    r = run(cli, corpus, tmp_path / "out", spec)
    line = error_line(r)
    assert r.exit_code == 2
    assert f"{corpus}:2:" in line and "field 'text'" in line and "--text-field" in line and "body" in line


def test_text_field_option_picks_another_field(cli, judge, tmp_path):
    _, spec = judge
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "body": LONG}])
    r = run(cli, corpus, tmp_path / "out", spec, "--text-field", "body")
    assert r.exit_code == 0, r.output
    assert read_jsonl(tmp_path / "out" / "data.jsonl")[0]["response"].startswith("word0")


def test_non_string_text_field(cli, judge, tmp_path):
    _, spec = judge
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": 42}])
    line = error_line(run(cli, corpus, tmp_path / "out", spec))
    assert f"{corpus}:1:" in line and "field 'text'" in line and "string" in line


def test_not_an_object(cli, judge, tmp_path):
    _, spec = judge
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("[1, 2]\n")
    assert "expected a JSON object" in error_line(run(cli, corpus, tmp_path / "out", spec))


def test_empty_file(cli, judge, tmp_path):
    _, spec = judge
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("")
    r = run(cli, corpus, tmp_path / "out", spec)
    assert r.exit_code == 2 and "file is empty" in error_line(r)
    corpus.write_text("\n\n  \n")
    assert "no records" in error_line(run(cli, corpus, tmp_path / "out", spec))


def test_binary_file(cli, judge, tmp_path):
    _, spec = judge
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00binary")
    r = run(cli, corpus, tmp_path / "out", spec)
    assert r.exit_code == 2 and f"{corpus}:1: binary data" in error_line(r)


def test_directory_instead_of_file(cli, judge, tmp_path):
    _, spec = judge
    r = run(cli, tmp_path, tmp_path / "out", spec)
    assert r.exit_code == 2 and "is a directory" in error_line(r)


def test_bad_seed_file_names_line_and_field(cli, judge, tmp_path):
    _, spec = judge
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": LONG}])
    seed = write_jsonl(tmp_path / "seed.jsonl", [{"instruction": "a", "response": "b"}, {"instruction": "c"}])
    line = error_line(run(cli, corpus, tmp_path / "out", spec, "--seed", seed))
    assert f"{seed}:2:" in line and "field 'response'" in line


def test_bad_input_keeps_what_was_already_written(cli, judge, tmp_path):
    _, spec = judge
    good = write_jsonl(tmp_path / "good.jsonl", [{"id": "a", "text": LONG}])
    out = tmp_path / "out"
    assert run(cli, good, out, spec).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    bad = tmp_path / "good.jsonl"
    bad.write_text(json.dumps({"id": "a", "text": LONG}) + "\nnot json\n")
    r = run(cli, bad, out, spec)
    assert r.exit_code == 2
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before


def test_unknown_model_backend(cli, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": LONG}])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", "nosuch:thing", "-q")
    assert r.exit_code == 2 and "unknown backend 'nosuch'" in error_line(r)


def test_missing_gguf_file(cli, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": LONG}])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", f"llamacpp:{tmp_path}/missing.gguf", "-q")
    assert r.exit_code == 2 and "model file not found" in error_line(r)


# -- JSON Python cannot read: one line, through the real command in its own process ------------------
def run_cli_process(corpus, out) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "btkit.cli", "run", "humpback", str(corpus), "-o", str(out), "--model", "echo:", "-q"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The run failed with exactly one line of output, an ``error:`` line, and no traceback."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines[:5]
    return lines[0]


def test_deeply_nested_json_is_one_line_naming_file_line_and_field(tmp_path):
    corpus = tmp_path / "c.jsonl"
    nested = '{"id": "b", "text": "%s", "meta": {"tags": %s1%s}}' % (LONG, "[" * 100_000, "]" * 100_000)
    corpus.write_text(json.dumps({"id": "a", "text": LONG}) + "\n" + nested + "\n")
    line = one_error_line(run_cli_process(corpus, tmp_path / "out"))
    assert f"{corpus}:2: field 'meta':" in line and "nested" in line and "too deep" in line
    assert not (tmp_path / "out" / "candidates.jsonl").exists()  # refused before the run began


def test_integer_over_python_digit_limit_is_one_line_naming_file_line_and_field(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "a", "text": LONG}) + "\n" + '{"id": "b", "text": "%s", "views": %s}\n' % (LONG, "7" * 5000))
    line = one_error_line(run_cli_process(corpus, tmp_path / "out"))
    assert f"{corpus}:2: field 'views':" in line and "5000 digits" in line and "string" in line
    assert not (tmp_path / "out" / "candidates.jsonl").exists()


def test_nesting_at_the_recursion_limit_never_escapes_as_a_traceback(tmp_path):
    """Just below the limit a line parses, and walking it again (lone-surrogate check and repair)
    must not then overflow: every depth around the limit is read or refused with InputError."""
    from btkit.errors import InputError
    from btkit.io import validate_jsonl

    limit = sys.getrecursionlimit()
    outcomes = set()
    for depth in range(limit - 60, limit + 5):
        corpus = tmp_path / f"d{depth}.jsonl"
        corpus.write_text('{"text": "x", "meta": %s"\\udc00"%s}\n' % ("[" * depth, "]" * depth))
        for errors in ("strict", "replace"):
            try:
                validate_jsonl(corpus, ("text",), errors=errors)
                outcomes.add("read")
            except InputError as e:
                assert "field 'meta'" in str(e), str(e)
                outcomes.add("refused")
    assert outcomes == {"read", "refused"}
