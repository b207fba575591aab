"""Cost before and during a run: ``--dry-run`` estimates calls, tokens and cost without a single
request (counted at a real HTTP server on 127.0.0.1), and ``--max-cost`` stops a run cleanly within
one call's cost of the limit; a higher limit resumes it and nothing is paid twice."""

from __future__ import annotations

import json

import pytest

from btkit.backends import Completion
from btkit.engine import SPENT_FILE, price_of

from conftest import EXAMPLES, read_jsonl, words, write_jsonl

CALL_COST = 0.01


def corpus(tmp_path, n=6):
    return write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": words(60, start=i * 60)} for i in range(n)])


def test_dry_run_sends_no_request_and_writes_nothing(cli, server, tmp_path):
    c = corpus(tmp_path)
    before = len(server.requests)
    out = tmp_path / "out"
    r = cli("run", "humpback", c, "-o", out, "--model", "openai:gpt-4o-mini", "--base-url", server.base_url,
            "--judge-mode", "rubric", "--dry-run")
    assert r.exit_code == 0, r.output
    assert len(server.requests) == before  # not one request, not even GET /v1/models
    assert not out.exists()
    assert "dry run" in r.output and "estimate" in r.output.lower()
    lines = {line.split()[0]: line for line in r.output.splitlines() if line.startswith("humpback.")}
    assert set(lines) == {"humpback.augment", "humpback.curate"}
    assert lines["humpback.augment"].split()[1] == "6"  # six units, one call each
    if price_of("openai:gpt-4o-mini") is not None:  # litellm's price table is installed
        assert "$" in lines["humpback.augment"]
    # the control: the same command without --dry-run does reach the server
    r = cli("run", "humpback", c, "-o", out, "--model", "openai:fake-model", "--base-url", server.base_url,
            "--judge-mode", "rubric", "--concurrency", "1", "-q")
    assert r.exit_code == 0, r.output
    assert len([q for q in server.requests[before:] if q.path.endswith("/chat/completions")]) == 12


def test_dry_run_says_no_price_for_a_local_model_and_counts_only_units_left(cli, tmp_path):
    c = corpus(tmp_path)
    r = cli("run", "humpback", c, "-o", tmp_path / "o", "--dry-run")  # the embedded model: never loaded here
    assert r.exit_code == 0, r.output
    assert "no price (llamacpp:default)" in r.output
    prompt_tokens = [line.split()[2] for line in r.output.splitlines() if line.startswith("humpback.augment")]
    assert prompt_tokens and prompt_tokens[0] not in ("?", "0")


def test_dry_run_of_a_pipeline_file(cli, server, tmp_path):
    c = corpus(tmp_path, n=4)
    before = len(server.requests)
    r = cli("run", str(EXAMPLES / "pipelines" / "humpback.yaml"), "--input", c, "-o", tmp_path / "p",
            "--model", "openai:fake-model", "--base-url", server.base_url, "--dry-run")
    assert r.exit_code == 0, r.output
    assert len(server.requests) == before and not (tmp_path / "p").exists()
    assert [line.split()[:2] for line in r.output.splitlines() if line.startswith("humpback.")] == \
        [["humpback.augment", "4"], ["humpback.curate", "4"]]


def priced(messages, params):
    text = "\n".join(m["content"] for m in messages)
    reply = "The pair is fine.\nScore: 5" if "5-point scale" in text else "What does this note explain in detail?"
    return Completion(text=reply, finish_reason="stop", prompt_tokens=100, completion_tokens=10, extra={"cost": CALL_COST})


def test_max_cost_stops_within_one_call_and_a_higher_limit_resumes(cli, scripted, tmp_path):
    backend, spec = scripted(default=priced)
    c = corpus(tmp_path)
    out = tmp_path / "out"
    args = ("run", "humpback", c, "-o", out, "--model", spec, "--judge-mode", "rubric", "--concurrency", "1", "-q")
    limit = 0.035
    r = cli(*args, "--max-cost", str(limit))
    assert r.exit_code == 2, r.output
    assert "--max-cost" in r.output and "re-run the same command with a higher --max-cost" in r.output
    paid = len(backend.history) * CALL_COST
    assert limit <= paid < limit + CALL_COST  # the call that reached the limit was the last one
    assert not (out / "data.jsonl").exists() and (out / "candidates.jsonl").exists()
    assert json.loads((out / SPENT_FILE).read_text())["cost_usd"] == pytest.approx(paid)

    # the same limit again: spent already, so no request at all
    sent = len(backend.history)
    r = cli(*args, "--max-cost", str(limit))
    assert r.exit_code == 2 and "limit is reached" in r.output
    assert len(backend.history) == sent

    # a higher limit continues and finishes; calls already paid come from the cache
    r = cli(*args, "--max-cost", "1")
    assert r.exit_code == 0, r.output
    assert len(backend.history) == 12  # 6 units x (augment + curate), each paid once
    assert len(read_jsonl(out / "data.jsonl")) == 6
    assert json.loads((out / SPENT_FILE).read_text())["cost_usd"] == pytest.approx(12 * CALL_COST)


def test_max_cost_counts_a_real_http_backends_price(cli, server, tmp_path):
    if price_of("openai:gpt-4o-mini") is None:
        pytest.skip("litellm's price table is not installed (pip install 'btkit[remote]')")
    c = corpus(tmp_path)
    before = len(server.requests)
    out = tmp_path / "out"
    limit = 0.00005
    args = ("run", "humpback", c, "-o", out, "--model", "openai:gpt-4o-mini", "--base-url", server.base_url,
            "--judge-mode", "rubric", "--concurrency", "1", "-q")
    r = cli(*args, "--max-cost", str(limit))
    assert r.exit_code == 2, r.output
    calls = [q for q in server.requests[before:] if q.path.endswith("/chat/completions")]
    assert 0 < len(calls) < 12
    spent = json.loads((out / SPENT_FILE).read_text())["cost_usd"]
    assert spent >= limit
    r = cli(*args, "--max-cost", "10")
    assert r.exit_code == 0, r.output
    assert len([q for q in server.requests[before:] if q.path.endswith("/chat/completions")]) == 12


def test_progress_text_shows_failures_and_records_per_stage():
    from btkit.progress import progress_text, status_line

    p = {"finished": 3, "total": 6, "kept": 2, "dropped": 1, "failed": 1, "tokens_in": 1200, "tokens_out": 30,
         "cost_usd": 0.02, "stages": {"humpback.augment": 3, "humpback.curate": 2}}
    text = progress_text(p)
    assert text == "kept=2 dropped=1 failed=1 tokens=1200+30 cost=$0.0200 | augment=3 curate=2"
    line = status_line(p, 6.0)
    assert line.startswith("progress: 3/6 units (50%), 0.50 units/s, ETA 6s, ") and line.endswith(text)


def test_dry_run_counts_candidates_as_calls_and_records(cli, tmp_path):
    c = corpus(tmp_path)
    r = cli("run", "humpback", c, "-o", tmp_path / "o", "--candidates", "3", "--dry-run")
    assert r.exit_code == 0, r.output
    calls = {line.split()[0]: line.split()[1] for line in r.output.splitlines() if line.startswith("humpback.")}
    assert calls == {"humpback.augment": "18", "humpback.curate": "18"}
