"""Options out of range stop a run before any model call, with one line naming the option, whether
they come as flags, ``-S STAGE.KEY=VALUE``, pipeline-file keys or ``-B`` backend options; and 0
is a value, not "not given" (``--shots 0`` is zero-shot, ``--min-words 0`` keeps short segments)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from btkit.kit.seeds import DEFAULT_SEED, load_seed

from conftest import ROOT, read_jsonl, words, write_jsonl

INSTRUCTION = "What do the listed words mean?"


@pytest.fixture
def judge(scripted):
    """Writes an instruction, rewrites to a two-word answer, scores every pair 5."""

    def reply(messages, params):
        return "Short answer." if "Rewrite the document into the answer" in messages[-1]["content"] else INSTRUCTION

    return scripted(default=reply, logprobs={"5": -0.01, "1": -6.0})


def corpus(tmp_path, n: int = 2, length: int = 60):
    return write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": words(length, 100 * i)} for i in range(n)])


def click_error(result) -> str:
    """The one error line click prints for a bad flag value."""
    lines = [l for l in result.output.splitlines() if l.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def btkit_error(result) -> str:
    """The one ``error: ...`` line btkit prints for bad settings."""
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# -- flags ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,args", [
    ("humpback", ["--limit", "-3"]),
    ("humpback", ["--candidates", "-2"]),  # used to drop every record
    ("humpback", ["--candidates", "0"]),
    ("humpback", ["--temperature", "nan"]),  # used to be sent as NaN, which is not JSON
    ("humpback", ["--temperature", "inf"]),
    ("humpback", ["--temperature", "-0.5"]),
    ("humpback", ["--top-p", "0"]),
    ("humpback", ["--top-p", "1.5"]),
    ("humpback", ["--max-tokens", "0"]),
    ("humpback", ["--concurrency", "0"]),
    ("humpback", ["--shots", "-1"]),
    ("humpback", ["--min-words", "-1"]),
    ("humpback", ["--max-words", "0"]),
    ("humpback", ["--keep-top", "nan"]),
    ("humpback", ["--score-threshold", "nan"]),
    ("backforth", ["--min-rewrite-words", "-1"]),
    ("kun", ["--max-perplexity", "nan"]),
    ("kun", ["--max-repetition", "nan"]),
    ("kun", ["--min-response-chars", "-1"]),
    ("air", ["--dedup-threshold", "nan"]),
])
def test_a_flag_out_of_range_is_refused_before_any_call(cli, judge, tmp_path, method, args):
    backend, spec = judge
    out = tmp_path / "out"
    r = cli("run", method, corpus(tmp_path), "-o", out, "--model", spec, "-q", *args)
    assert r.exit_code == 2, r.output
    assert click_error(r).startswith(f"Error: Invalid value for '{args[0]}'")
    assert backend.history == [] and not out.exists()


# -- -S STAGE.KEY=VALUE and pipeline files: the same checks ------------------------------------------
@pytest.mark.parametrize("item,message", [
    ("augment.temperature=NaN", "augment.temperature (humpback.augment): nan is not a finite number"),
    ("augment.temperature=-1", "augment.temperature (humpback.augment): -1.0 is not in the range x>=0."),
    ("curate.top_p=0", "curate.top_p (humpback.curate): 0.0 is not in the range 0<x<=1."),
    ("augment.candidates=-2", "augment.candidates (humpback.augment): -2 is not in the range x>=1."),
    ("augment.shots=2.5", "augment.shots (humpback.augment): expected a whole number, got 2.5"),
    ("augment.repetition_penalty=0", "augment.repetition_penalty (humpback.augment): 0.0 is not in the range x>0."),
])
def test_a_stage_option_out_of_range_is_refused_before_any_call(cli, judge, tmp_path, item, message):
    backend, spec = judge
    out = tmp_path / "out"
    r = cli("run", "humpback", corpus(tmp_path), "-o", out, "--model", spec, "-q", "-S", item)
    assert r.exit_code == 2
    assert btkit_error(r) == f"error: --stage-option: {message}"
    assert backend.history == [] and not out.exists()


@pytest.mark.parametrize("body,message", [
    ("stages:\n  - use: humpback.augment\n    temperature: .nan\n  - humpback.curate\n",
     "stages[0].temperature (humpback.augment): nan is not a finite number"),
    ("stages:\n  - use: humpback.augment\n    candidates: -2\n  - humpback.curate\n",
     "stages[0].candidates (humpback.augment): -2 is not in the range x>=1."),
    ("options: {min_words: -5}\nstages: [humpback.augment, humpback.curate]\n", "options.min_words: -5 is not in the range x>=0."),
    ("options: {top_p: 1.5}\nstages: [humpback.augment, humpback.curate]\n", "options.top_p: 1.5 is not in the range 0<x<=1."),
    ("concurrency: 0\nstages: [humpback.augment, humpback.curate]\n", "concurrency: 0 is not in the range x>=1."),
    ("limit: -1\nstages: [humpback.augment, humpback.curate]\n", "limit: -1 is not in the range x>=0."),
    ("concurrency: 2.5\nstages: [humpback.augment, humpback.curate]\n", "concurrency: expected a whole number, got 2.5"),
])
def test_a_pipeline_key_out_of_range_is_refused_before_any_call(cli, judge, tmp_path, body, message):
    backend, spec = judge
    corpus(tmp_path)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"input: c.jsonl\noutput: out\nmodel: '{spec}'\n{body}", encoding="utf-8")
    r = cli("run", pipeline, "-q")
    assert r.exit_code == 2
    assert btkit_error(r) == f"error: {pipeline}: {message}"
    assert backend.history == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["--concurrency", "0"], ["--limit", "-1"], ["--max-tokens", "0"]])
def test_a_pipeline_command_flag_out_of_range_is_refused(cli, judge, tmp_path, args):
    backend, spec = judge
    corpus(tmp_path)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"input: c.jsonl\noutput: out\nmodel: '{spec}'\nstages: [humpback.augment, humpback.curate]\n", encoding="utf-8")
    r = cli("run", pipeline, "-q", *args)
    assert r.exit_code == 2 and click_error(r).startswith(f"Error: Invalid value for '{args[0]}'")
    assert backend.history == [] and not (tmp_path / "out").exists()


# -- backend options -------------------------------------------------------------------------------
def test_negative_max_connections_is_refused_instead_of_hanging(server, tmp_path):
    """``-B max_connections=-1`` used to wait forever for a connection, printing nothing."""
    server.reset()
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "BTKIT_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("OPENAI_BASE_URL", None)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "btkit.cli", "run", "humpback", str(corpus(tmp_path)), "-o", str(out),
                           "--model", "openai:fake-model", "--base-url", server.base_url, "-q", "-B", "max_connections=-1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: backend option max_connections=-1 must be a finite number >= 0"]
    assert server.requests == [] and not out.exists()


@pytest.mark.parametrize("option,message", [
    ("timeout=NaN", "backend option timeout=nan must be a finite number > 0"),
    ("connect_timeout=0", "backend option connect_timeout=0 must be a finite number > 0"),
    ("max_retries=1.5", "backend option max_retries=1.5 is not a whole number"),
    ("retry_budget=-1", "backend option retry_budget=-1 must be a finite number >= 0"),
])
def test_remote_backend_options_out_of_range_are_refused(cli, server, tmp_path, monkeypatch, option, message):
    server.reset()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    out = tmp_path / "out"
    r = cli("run", "humpback", corpus(tmp_path), "-o", out, "--model", "openai:fake-model", "--base-url", server.base_url,
            "-q", "-B", option)
    assert r.exit_code == 2 and btkit_error(r) == f"error: {message}"
    assert server.requests == [] and not out.exists()


@pytest.mark.parametrize("option,message", [
    ("n_threads=0", "backend option n_threads=0 must be a whole number >= 1"),  # used to mean "all cores"
    ("n_ctx=0", "backend option n_ctx=0 must be a whole number >= 1"),  # used to mean 4096
    ("n_ctx=abc", "backend option n_ctx='abc' must be a whole number >= 1"),
])
def test_llamacpp_backend_options_out_of_range_are_refused(cli, tmp_path, option, message):
    out = tmp_path / "out"
    r = cli("run", "humpback", corpus(tmp_path, n=1), "-o", out, "--model", "llamacpp:default", "--limit", "1", "-q", "-B", option)
    assert r.exit_code == 2 and btkit_error(r) == f"error: {message}"
    assert not out.exists()


# -- zero is a value -------------------------------------------------------------------------------
def seed_instructions_sent(backend) -> list[str]:
    sent = " ".join(m["content"] for h in backend.history if h["kind"] == "chat" for m in h["messages"])
    return [p["instruction"] for p in load_seed(DEFAULT_SEED) if p["instruction"] in sent]


@pytest.mark.parametrize("how", ["flag", "stage_option", "pipeline"])
def test_zero_shots_sends_no_seed_examples(cli, judge, tmp_path, how):
    """``--shots 0`` used to run 3-shot (``0 or 3``)."""
    backend, spec = judge
    c = corpus(tmp_path, n=1)
    if how == "pipeline":
        pipeline = tmp_path / "p.yaml"
        pipeline.write_text(f"input: c.jsonl\noutput: out\nmodel: '{spec}'\nstages:\n  - use: humpback.augment\n    shots: 0\n"
                            "  - humpback.curate\n", encoding="utf-8")
        r = cli("run", pipeline, "-q")
    else:
        args = ["--shots", "0"] if how == "flag" else ["-S", "augment.shots=0"]
        r = cli("run", "humpback", c, "-o", tmp_path / "out", "--model", spec, "-q", *args)
    assert r.exit_code == 0, r.output
    assert any(h["kind"] == "chat" for h in backend.history)
    assert seed_instructions_sent(backend) == []
    assert read_jsonl(tmp_path / "out" / "data.jsonl")[0]["instruction"] == INSTRUCTION


def test_default_shots_still_send_seed_examples(cli, judge, tmp_path):
    backend, spec = judge
    r = cli("run", "humpback", corpus(tmp_path, n=1), "-o", tmp_path / "out", "--model", spec, "-q")
    assert r.exit_code == 0, r.output
    assert len(seed_instructions_sent(backend)) == 3


def test_zero_min_words_keeps_a_short_segment(cli, judge, tmp_path):
    """``--min-words 0`` used to become 30 and drop a five-word document as too short."""
    backend, spec = judge
    c = write_jsonl(tmp_path / "c.jsonl", [{"id": "short", "text": words(5)}])
    r = cli("run", "humpback", c, "-o", tmp_path / "out", "--model", spec, "-q", "--min-words", "0")
    assert r.exit_code == 0, r.output
    [cand] = read_jsonl(tmp_path / "out" / "candidates.jsonl")
    assert cand["status"] == "kept", cand
    assert backend.history and words(5) in backend.history[0]["messages"][-1]["content"]


def test_zero_min_rewrite_words_keeps_a_short_rewrite(cli, judge, tmp_path):
    """``--min-rewrite-words 0`` used to become 5 and drop a two-word rewrite as too short."""
    backend, spec = judge
    r = cli("run", "backforth", corpus(tmp_path, n=1), "-o", tmp_path / "out", "--model", spec, "-q", "--min-rewrite-words", "0")
    assert r.exit_code == 0, r.output
    [row] = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert row["response"] == "Short answer."
    r = cli("run", "backforth", corpus(tmp_path, n=1), "-o", tmp_path / "five", "--model", spec, "-q")  # the default, 5
    [cand] = read_jsonl(tmp_path / "five" / "candidates.jsonl")
    assert cand["reason"] == "rewrite_too_short"


# -- messages name the flag the user types -----------------------------------------------------------
def test_lone_surrogate_error_names_the_cli_flag(cli, judge, tmp_path):
    backend, spec = judge
    c = tmp_path / "c.jsonl"
    c.write_text('{"id": "a", "text": "' + words(40) + ' \\ud800 end"}\n', encoding="utf-8")
    r = cli("run", "humpback", c, "-o", tmp_path / "out", "--model", spec, "-q")
    assert r.exit_code == 2
    line = btkit_error(r)
    assert "lone UTF-16 surrogate" in line and "pass --encoding-errors replace" in line and "encoding_errors=" not in line
    assert backend.history == []
