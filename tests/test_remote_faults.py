"""Remote backends against a fault-injecting OpenAI-compatible server: real `btkit run humpback` runs.

Each case checks what a user relies on: the run finishes, every input unit is in candidates.jsonl
exactly once (kept, or dropped with its reason), failures.jsonl holds the error and the raw reply,
retries happen as documented (counted on the server), and the API key never leaks.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from conftest import read_jsonl, words, write_jsonl
from fault_server import FaultServer

CANARY = "sk-canary-7f3a9c1e5d"
HAS_LITELLM = importlib.util.find_spec("litellm") is not None
BACKENDS = ["openai:fake-model", "vllm:fake-model"] + (["litellm:openai/fake-model"] if HAS_LITELLM else [])


@pytest.fixture
def srv(server, monkeypatch):
    server.reset()
    server.owner = "fake"
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    return server


def corpus(path: Path, markers: dict[str, str]) -> Path:
    """One document per id, its fault marker first, long enough to be one Humpback segment."""
    rows = [{"id": doc_id, "text": f"{marker} " + words(40, start=50 * i)} for i, (doc_id, marker) in enumerate(markers.items())]
    return write_jsonl(path, rows)


def run(cli, corpus_path: Path, out: Path, srv: FaultServer, model: str = "openai:fake-model", *extra: str):
    """A default-mode run (``--judge-mode auto``): on this server, which does not say it is vLLM,
    every backend must settle on the rubric by itself."""
    return cli("run", "humpback", corpus_path, "-o", out, "--model", model, "--base-url", srv.base_url,
               "--shots", "1", "-q", "-B", "backoff_base=0.02", *extra)


def assert_each_unit_once(out: Path, ids: list[str]) -> list[dict]:
    cands = read_jsonl(out / "candidates.jsonl")
    assert Counter(c["source_id"] for c in cands) == Counter(ids)
    for c in cands:
        assert (c["status"] == "kept") == (c["reason"] is None)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["status"] == "complete" and stats["units"] == len(ids) == stats["kept"] + stats["dropped"]
    return cands


@pytest.mark.slow
@pytest.mark.parametrize("model", BACKENDS)
def test_transient_faults_are_retried_and_nothing_is_lost(cli, srv, tmp_path, model):
    markers = {
        "plain": "",
        "r429": "[[fault=http429 times=2 ra=1 id=r429]]",
        "r500": "[[fault=http500 times=3 id=r500]]",
        "hang": "[[fault=hang times=1 hang_s=10 id=hang]]",  # far past the timeout: times out once, whatever the load
        "drop": "[[fault=drop times=2 id=drop]]",
        "bad": "[[fault=badjson times=2 id=bad]]",
        "cur": "[[fault=http500 times=1 stage=curate id=cur]]",
    }
    out = tmp_path / "out"
    # a wide timeout: an ordinary request on a loaded machine never reaches it, so every retry counted below
    # is one the fault caused (at 1.5 s a slow ordinary request could be retried too and change the counts)
    r = run(cli, corpus(tmp_path / "c.jsonl", markers), out, srv, model, "-B", "timeout=4", "-B", "max_retries=4")
    assert r.exit_code == 0, r.output
    cands = assert_each_unit_once(out, list(markers))
    assert all(c["status"] == "kept" for c in cands), [(c["source_id"], c["reason"]) for c in cands]
    assert {c["meta"]["curate_mode"] for c in cands} == {"rubric"}  # auto, on a server that is not vLLM
    assert not any("continue_final_message" in s.body or "prompt_logprobs" in s.body for s in srv.requests)
    assert (out / "failures.jsonl").read_text() == ""
    for fault_id, times in [("r429", 2), ("r500", 3), ("hang", 1), ("drop", 2), ("bad", 2)]:
        assert len(srv.seen(fault_id)) == times + 1, fault_id
    assert len(srv.seen("cur", "curate")) == 2
    t = [s.t for s in srv.seen("r429")]
    assert t[1] - t[0] >= 1.0 and t[2] - t[1] >= 1.0, "Retry-After: 1 was not honoured"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["backend_failures"] == 0 and stats["tokens_in"] > 0 and stats["tokens_out"] > 0
    assert "retry 1/4 in" in r.output  # a retried request is visible without a terminal or logging set up
    # stats count what the server saw: every request, retries included
    chat_requests = [r for r in srv.requests if r.path.endswith("/chat/completions")]
    assert stats["requests_sent"] == len(chat_requests) and stats["retries"] == 2 + 3 + 1 + 2 + 2 + 1


@pytest.mark.slow
@pytest.mark.parametrize("model", BACKENDS)
def test_permanent_faults_drop_records_with_reason_and_raw_reply(cli, srv, tmp_path, model):
    markers = {
        "plain": "",
        "p500": "[[fault=http500 id=p500]]",
        "p400": "[[fault=http400 id=p400]]",
        "pbad": "[[fault=badjson id=pbad]]",
        "phang": "[[fault=hang hang_s=10 id=phang]]",  # far past the timeout, every attempt
        "plong": "[[fault=length id=plong]]",
        "pfilter": "[[fault=content_filter id=pfilter]]",
        "pwait": "[[fault=http429 ra=3600 id=pwait]]",
    }
    out = tmp_path / "out"
    # a timeout no ordinary request reaches on a loaded machine: only phang's attempts time out, so the
    # counts below are exact whatever the load (at 1 s a slow ordinary request could be retried too)
    r = run(cli, corpus(tmp_path / "c.jsonl", markers), out, srv, model, "-B", "timeout=3", "-B", "max_retries=2")
    assert r.exit_code == 0, r.output
    cands = {c["source_id"]: c for c in assert_each_unit_once(out, list(markers))}
    assert cands["plain"]["status"] == "kept"
    for doc in ("p500", "p400", "pbad", "phang", "pwait"):
        assert (cands[doc]["dropped_at"], cands[doc]["reason"]) == ("humpback.augment", "backend_error"), doc
    assert cands["plong"]["reason"] == "instruction_truncated"
    assert cands["pfilter"]["status"] == "dropped" and cands["pfilter"]["reason"].startswith("instruction_")
    assert cands["pfilter"]["lineage"][0]["finish_reason"] == "content_filter"
    # attempts as documented: 5xx, bad JSON, timeouts retried max_retries times; 400 and a too-long Retry-After not retried
    assert {d: len(srv.seen(d)) for d in ("p500", "pbad", "phang", "p400", "pwait")} == {"p500": 3, "pbad": 3, "phang": 3, "p400": 1, "pwait": 1}
    failures = {f["id"].split("#")[0]: f for f in read_jsonl(out / "failures.jsonl")}
    assert set(failures) == {"p500", "p400", "pbad", "phang", "pwait"}
    assert all(f["reason"] == "backend_error" and f["stage"] == "humpback.augment" for f in failures.values())
    assert "internal failure for p500" in failures["p500"]["raw"] and "500" in failures["p500"]["error"]
    assert "bad request for p400" in failures["p400"]["raw"]
    assert "timeout" in failures["phang"]["error"].lower() or "timed out" in failures["phang"]["error"].lower()
    if model.startswith("litellm:"):  # litellm parses the body itself and keeps only its error message
        assert failures["pbad"]["raw"]
    else:
        assert "trunc" in failures["pbad"]["raw"] and "not JSON" in failures["pbad"]["error"]
        assert "max_retry_wait" in failures["pwait"]["error"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["backend_failures"] == 5 and stats["dropped_by_reason"]["humpback.augment:backend_error"] == 5
    # failed calls and their retries are counted: stats add up to what the server saw
    augment = stats["stages"]["humpback.augment"]
    assert augment["failed_calls"] == 5 and augment["retries"] == 2 + 2 + 2
    assert stats["requests_sent"] == len([r for r in srv.requests if r.path.endswith("/chat/completions")])


@pytest.mark.parametrize("model", ["openai:fake-model", "vllm:fake-model"])
def test_malformed_200_replies_are_retried_and_a_bad_usage_never_costs_the_reply(cli, srv, tmp_path, model):
    """A 200 whose shape is wrong is a transient fault (retried, then fine); content as text parts is
    text; a ``usage`` that is a string, NaN or holds NaN counts 0 tokens and the reply is kept, unretried."""
    markers = {
        "plain": "",
        "empty": "[[fault=nochoices times=1 id=empty]]",
        "strmsg": "[[fault=strmessage times=2 id=strmsg]]",
        "num": "[[fault=numcontent times=1 id=num]]",
        "parts": "[[fault=partcontent id=parts]]",
        "susage": "[[fault=strusage id=susage]]",
        "nusage": "[[fault=nanusage id=nusage]]",
        "ncounts": "[[fault=nancounts id=ncounts]]",
        "cparts": "[[fault=partcontent stage=curate id=cparts]]",
        "cusage": "[[fault=nanusage stage=curate id=cusage]]",
    }
    out = tmp_path / "out"
    r = run(cli, corpus(tmp_path / "c.jsonl", markers), out, srv, model, "-B", "max_retries=3")
    assert r.exit_code == 0, r.output
    cands = {c["source_id"]: c for c in assert_each_unit_once(out, list(markers))}
    assert all(c["status"] == "kept" for c in cands.values()), [(c["source_id"], c["reason"], c["meta"]) for c in cands.values()]
    assert (out / "failures.jsonl").read_text() == ""
    for fault_id, attempts in [("empty", 2), ("strmsg", 3), ("num", 2), ("parts", 1), ("susage", 1), ("nusage", 1), ("ncounts", 1)]:
        assert len(srv.seen(fault_id)) == attempts, fault_id
    assert len(srv.seen("cparts", "curate")) == len(srv.seen("cusage", "curate")) == 1
    assert cands["parts"]["fields"]["instruction"] == "Explain how the item parts works in practice."  # the parts, joined
    assert cands["cparts"]["meta"]["score"] == 5 and cands["cusage"]["meta"]["score"] == 5
    for doc in ("susage", "nusage", "ncounts"):
        augment = next(s for s in cands[doc]["lineage"] if s["stage"] == "humpback.augment")
        assert augment["tokens"] == [0, 0], doc
    stats = json.loads((out / "stats.json").read_text())
    assert stats["tokens_in"] > 0 and stats["dropped_by_reason"] == {}


@pytest.mark.parametrize("model", BACKENDS)
def test_malformed_200_replies_that_never_recover_are_backend_errors_with_the_raw_body(cli, srv, tmp_path, model):
    """Never a stage_error traceback: after its retries a malformed reply drops its record as
    ``backend_error`` with the raw reply. (litellm reads replies itself and also refuses text parts and
    a malformed usage, see litellm_backend; for openai:/vllm: those are kept, see the test above.)"""
    markers = {"plain": "", "empty": "[[fault=nochoices id=empty]]", "strmsg": "[[fault=strmessage id=strmsg]]",
               "num": "[[fault=numcontent id=num]]", **{f"more{i}": "" for i in range(4)}}
    out = tmp_path / "out"
    r = run(cli, corpus(tmp_path / "c.jsonl", markers), out, srv, model, "-B", "max_retries=2")
    assert r.exit_code == 0, r.output
    cands = {c["source_id"]: c for c in assert_each_unit_once(out, list(markers))}
    bad = ("empty", "strmsg", "num")
    for doc in bad:
        assert (cands[doc]["dropped_at"], cands[doc]["reason"]) == ("humpback.augment", "backend_error"), doc
        assert len(srv.seen(doc)) == 3, doc  # retried like a garbled body
    assert all(cands[d]["status"] == "kept" for d in cands if d not in bad)
    failures = {f["id"].split("#")[0]: f for f in read_jsonl(out / "failures.jsonl")}
    assert set(failures) == set(bad) and all("Traceback" not in f["error"] for f in failures.values())
    if not model.startswith("litellm:"):
        assert '"choices": []' in failures["empty"]["raw"] and "no choices" in failures["empty"]["error"]
        assert '"message": "Explain how the item strmsg' in failures["strmsg"]["raw"] and "message is str" in failures["strmsg"]["error"]
        assert '"content": 42' in failures["num"]["raw"] and "content is int" in failures["num"]["error"]
    else:  # litellm's own reading of the reply, quoting what it received
        assert "choices=[]" in failures["empty"]["raw"]
        assert "Explain how the item strmsg" in failures["strmsg"]["raw"] and "'content': 42" in failures["num"]["raw"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dropped_by_reason"] == {"humpback.augment:backend_error": 3}


def test_retry_budget_caps_retries_across_the_run(cli, srv, tmp_path):
    ids = [f"d{i}" for i in range(6)]
    out = tmp_path / "out"
    r = run(cli, corpus(tmp_path / "c.jsonl", {d: f"[[fault=http500 id={d}]]" for d in ids}), out, srv, "openai:fake-model",
            "-B", "max_retries=5", "-B", "retry_budget=2", "-B", "retry_ratio=0")
    assert r.exit_code == 0, r.output
    cands = assert_each_unit_once(out, ids)
    assert all(c["reason"] == "backend_error" for c in cands)
    assert len(srv.requests) == len(ids) + 2  # one attempt each, plus the budget's two retries
    errors = [f["error"] for f in read_jsonl(out / "failures.jsonl")]
    assert len(errors) == len(ids) and sum("retry budget" in e for e in errors) >= len(ids) - 2


@pytest.mark.slow
def test_client_has_no_hidden_cap_below_engine_concurrency(cli, srv, tmp_path):
    """160 requests in flight, above aiohttp's default pool of 100 connections: the server holds each
    augment request until 160 are open at once (or 30 s passed), so a capped pool shows a lower peak."""
    n = 160
    ids = [f"s{i}" for i in range(n)]
    out = tmp_path / "out"
    r = run(cli, corpus(tmp_path / "c.jsonl", {d: f"[[fault=barrier n={n} hang_s=30 id={d}]]" for d in ids}), out, srv,
            "openai:fake-model", "--concurrency", str(n), "--no-cache", "-B", "timeout=60")
    assert r.exit_code == 0, r.output
    assert_each_unit_once(out, ids)
    assert srv.max_slow_in_flight == n  # the engine's --concurrency, reached and never exceeded
    waits = [s.t for s in srv.requests if s.action == "barrier"]
    assert len(waits) == n and max(waits) - min(waits) < 20  # all arrived together, not after a timeout


@pytest.mark.parametrize("model", BACKENDS)
def test_api_key_never_leaks_into_logs_files_cache_or_errors(cli, srv, tmp_path, caplog, isolated_cache, model):
    caplog.set_level(logging.DEBUG)
    markers = {"plain": "", "echo": "[[fault=echokey id=echo]]", "once": "[[fault=http500 times=1 id=once]]",
               "boom": "[[fault=http500 id=boom]]"}
    out = tmp_path / "out"
    r = run(cli, corpus(tmp_path / "c.jsonl", markers), out, srv, model, "-B", "max_retries=1")
    assert r.exit_code == 0, r.output
    assert_each_unit_once(out, list(markers))
    assert {s.authorization for s in srv.requests} == {f"Bearer {CANARY}"}  # the key is used...
    failures = {f["id"].split("#")[0]: f for f in read_jsonl(out / "failures.jsonl")}
    assert "rejected request with header" in failures["echo"]["raw"]
    # ...and nowhere else: logs, CLI output, every file of the run, the cache
    assert caplog.records and CANARY not in caplog.text
    assert CANARY not in r.output and CANARY not in (r.stderr_bytes or b"").decode()
    files = [p for p in out.rglob("*") if p.is_file()] + [p for p in isolated_cache.parent.rglob("*") if p.is_file()]
    assert any(p.name.startswith("cache") for p in files)
    for p in files:
        assert CANARY.encode() not in p.read_bytes(), p


@pytest.mark.parametrize("model", BACKENDS)
def test_rejected_key_stops_the_run_without_echoing_it(cli, srv, tmp_path, caplog, model):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    r = run(cli, corpus(tmp_path / "c.jsonl", {"a": "[[fault=http401 id=a]]", "b": ""}), out, srv, model)
    assert r.exit_code == 2
    assert "API key" in r.output and CANARY not in r.output and CANARY not in caplog.text
    assert len(srv.seen("a")) == 1  # a refused key is not retried


def test_vllm_discovers_model_and_scores_from_logprobs_after_prefill(cli, srv, tmp_path):
    srv.owner = "vllm"
    out = tmp_path / "out"
    r = cli("run", "humpback", corpus(tmp_path / "c.jsonl", {"a": "", "b": ""}), "-o", out, "--model", "vllm:",
            "--base-url", srv.base_url.removesuffix("/v1"), "--shots", "1", "-q")
    assert r.exit_code == 0, r.output
    cands = assert_each_unit_once(out, ["a", "b"])
    for c in cands:
        assert c["status"] == "kept" and c["meta"]["curate_mode"] == "logprob"
        assert c["meta"]["score"] == 5 and set(c["meta"]["score_dist"]) == {"1", "2", "3", "4", "5"}
        assert c["meta"]["score_dist"]["4"] > 0  # ' 4' and '4' both counted for '4'
    scoring = [s.body for s in srv.requests if s.body.get("max_tokens") == 1]
    assert len(scoring) == 2
    for body in scoring:
        assert body["model"] == "fake-model" and body["continue_final_message"] is True and body["add_generation_prompt"] is False
        assert body["messages"][-1] == {"role": "assistant", "content": "Score: "} and body["logprobs"] is True


@pytest.mark.parametrize("mode", ["logprob", "pmi", "ifd"])
def test_vllm_modes_that_need_vllm_stop_before_any_request_on_another_server(cli, srv, tmp_path, mode):
    out = tmp_path / "out"
    r = cli("run", "humpback", corpus(tmp_path / "c.jsonl", {"a": "", "b": ""}), "-o", out, "--model", "vllm:",
            "--base-url", srv.base_url, "--judge-mode", mode, "-q")
    assert r.exit_code == 2
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "does not say it is vLLM (GET /models owned_by: fake)" in lines[0] and f"--judge-mode {mode}" in lines[0]
    assert "llamacpp:PATH.gguf" in lines[0] and "vllm_extensions=true" in lines[0]
    assert srv.requests == []  # not one model call was paid for
    assert not (out / "candidates.jsonl").exists()


def test_vllm_extensions_vouched_for_by_the_user_are_trusted(srv):
    from btkit_plugins.backends.openai_compat import VLLMBackend

    trusted = VLLMBackend("fake-model", {"base_url": srv.base_url, "vllm_extensions": "true"})
    assert trusted.supports("next_token_logprobs") and trusted.supports("score_continuation")
    refused = VLLMBackend("fake-model", {"base_url": srv.base_url, "vllm_extensions": "false"})
    srv.owner = "vllm"
    assert not refused.supports("score_continuation") and refused.supports("chat")
    assert "-B vllm_extensions=false turns" in refused.unsupported_reason("score_continuation")


def test_vllm_request_features_n_schema_and_continuation_scores(srv):
    from btkit_plugins.backends.openai_compat import VLLMBackend

    srv.owner = "vllm"
    b = VLLMBackend("fake-model", {"base_url": srv.base_url})

    async def go():
        many = await b.chat([{"role": "user", "content": "hi"}], {"n": 3, "temperature": 0.8, "json_schema": {"type": "object"}, "guided_decoding_backend": "xgrammar"})
        sent = srv.requests[-1].body
        cond = await b.score_continuation([{"role": "user", "content": "say it"}], "hello big world")
        cond_req = srv.requests[-1]
        uncond = await b.score_continuation(None, "hello big world")
        uncond_req = srv.requests[-1]
        await b.aclose()
        return many, sent, cond, cond_req, uncond, uncond_req

    many, sent, cond, cond_req, uncond, uncond_req = asyncio.run(go())
    assert [c["text"] for c in many.extra["choices"]] == [f"Explain how the item plain works in practice. (choice {i})" for i in range(3)]
    assert many.text == many.extra["choices"][0]["text"] and many.completion_tokens > 0
    assert sent["n"] == 3 and sent["temperature"] == 0.8 and sent["guided_decoding_backend"] == "xgrammar"
    assert sent["response_format"]["type"] == "json_schema" and sent["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert cond == [-0.5, -0.4, -0.6] and uncond == [-0.5, -0.4, -0.6]  # 'hello', ' big', ' world'
    # both in the same chat frame: the unconditional one is the reply to an empty user turn, prefilled the same way
    for req, turns in [(cond_req, [{"role": "user", "content": "say it"}]), (uncond_req, [{"role": "user", "content": ""}])]:
        assert req.path == "/v1/chat/completions"
        assert req.body["messages"] == turns + [{"role": "assistant", "content": "hello big world"}]
        assert (req.body["continue_final_message"], req.body["add_generation_prompt"], req.body["prompt_logprobs"]) == (True, False, 0)
    assert {k for k in cond_req.body if k != "messages"} == {k for k in uncond_req.body if k != "messages"}
    assert not [r for r in srv.requests if r.path == "/v1/completions"]
    assert "api_key" not in json.dumps(b.identity()) and CANARY not in json.dumps(b.identity()) and CANARY not in repr(b.__dict__)
    assert b.identity() == {"backend": "vllm", "base_url": srv.base_url, "model": "fake-model"}


def test_openai_refuses_an_assistant_prefix_it_cannot_send(srv):
    from btkit.errors import CapabilityError
    from btkit_plugins.backends.openai_compat import OpenAICompatBackend

    b = OpenAICompatBackend("m", {"base_url": srv.base_url})
    with pytest.raises(CapabilityError, match="prefix"):
        asyncio.run(b.chat([{"role": "user", "content": "hi"}], {"assistant_prefix": "Score: "}))
    assert srv.requests == []


@pytest.mark.slow
def test_api_key_given_as_backend_option_stays_out_of_the_run_directory(srv, tmp_path, isolated_cache, monkeypatch):
    """A real process: run.json records the command line, which here carries the key (-B api_key=...)."""
    import subprocess
    import sys

    monkeypatch.delenv("OPENAI_API_KEY")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "btkit.cli", "run", "humpback", str(corpus(tmp_path / "c.jsonl", {"a": "", "b": "[[fault=echokey id=b]]"})),
           "-o", str(out), "--model", "openai:fake-model", "--base-url", srv.base_url, "--judge-mode", "rubric", "--shots", "1",
           "-q", "-B", f"api_key={CANARY}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert {s.authorization for s in srv.requests} == {f"Bearer {CANARY}"}
    assert json.loads((out / "run.json").read_text())["command"][-1] == "api_key=***"
    assert CANARY not in proc.stdout + proc.stderr
    for p in [p for p in out.rglob("*") if p.is_file()] + [p for p in isolated_cache.parent.rglob("*") if p.is_file()]:
        assert CANARY.encode() not in p.read_bytes(), p
