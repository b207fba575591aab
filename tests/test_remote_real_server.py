"""Remote backends against a real OpenAI-compatible server: llama-cpp-python's, serving the embedded
SmolLM2-135M on 127.0.0.1. A remote run must give what a local ``llamacpp:`` run gives: the same
files, the same record keys, the same lineage step keys; with the default curate mode, ``vllm:`` on a
server that is not vLLM reads the rubric, and modes it cannot serve stop before any model call.
``openai:`` scores continuations through ``/completions`` echo on a server started with
``--logits_all True`` (checked against llama-cpp-python run in process) and refuses where it cannot.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from conftest import EXAMPLES, read_jsonl, write_jsonl

pytestmark = [pytest.mark.model, pytest.mark.slow]

HAS_LITELLM = importlib.util.find_spec("litellm") is not None
HAS_SERVER = importlib.util.find_spec("llama_cpp.server") is not None if importlib.util.find_spec("llama_cpp") else False
# Small and bounded: one few-shot turn, short completions. No --judge-mode: the default (auto) must work.
COMMON = ["--shots", "1", "--max-tokens", "32", "-q"]
#: llama-cpp-python's server reads echoed prompt logprobs one position late for a model that adds no
#: BOS token (abetlen/llama-cpp-python#1983; SmolLM2 adds none); with a BOS its numbers are right.
ADD_BOS = "tokenizer.ggml.add_bos_token=bool:true"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_cpp_server(log: Path, *args: str) -> Iterator[dict]:
    """``python -m llama_cpp.server`` with the embedded model on a free 127.0.0.1 port; stopped by PID.

    Its access log (unbuffered) lists every request: tests count them with :func:`requests_seen`.
    """
    if not HAS_SERVER:
        pytest.skip("llama-cpp-python[server] is not installed")
    from btkit.kit.models import embedded_model_path

    port = free_port()
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_model_path()), "--host", "127.0.0.1",
             "--port", str(port), "--n_ctx", "4096", "--n_threads", str(os.cpu_count() or 1), *args],
            stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(240):  # up to 60 s on a busy machine
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/models", timeout=1) as r:
                    model_id = json.load(r)["data"][0]["id"]
                break
            except OSError:
                time.sleep(0.25)
        else:
            pytest.fail(f"llama_cpp.server did not answer /v1/models: {log.read_text()[-2000:]}")
        yield {"base_url": base, "model_id": model_id, "log": log}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def requests_seen(server: dict, method: str = "POST") -> list[str]:
    """The request lines of the server's access log, e.g. ``POST /v1/chat/completions``."""
    return re.findall(rf'"({method} /\S*) HTTP', server["log"].read_text(errors="replace"))


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """The server as most people start it: ``--logits_all False`` (no echoed logprobs)."""
    with llama_cpp_server(tmp_path_factory.mktemp("llama-server") / "server.log", "--logits_all", "False") as srv:
        yield srv


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory):
    """``--logits_all True`` with a BOS token added: echoed prompt logprobs, at the right positions."""
    with llama_cpp_server(tmp_path_factory.mktemp("echo-server") / "server.log", "--logits_all", "True",
                          "--kv_overrides", ADD_BOS) as srv:
        yield srv


@pytest.fixture
def small_corpus(tmp_path):
    """Two real documents cut to their first 60 words: short prompts keep the CPU server quick."""
    rows = [json.loads(l) for l in (EXAMPLES / "corpus.jsonl").read_text().splitlines()[:2]]
    return write_jsonl(tmp_path / "corpus.jsonl", [{**r, "text": " ".join(r["text"].split()[:60])} for r in rows])


def shape(out: Path) -> dict:
    """What must not depend on the backend: file names, record keys, lineage step keys, data keys."""
    cands = read_jsonl(out / "candidates.jsonl")
    data = read_jsonl(out / "data.jsonl")
    return {
        "files": sorted(p.name for p in out.iterdir()),
        "record_keys": sorted({k for c in cands for k in c}),
        # outcome keys vary with what the model wrote: every step has one of parsed / parse_error
        "step_keys": sorted({k for c in cands for s in c["lineage"] for k in s} - {"cost", "parsed", "parse_error", "parse_error_detail"}),
        "steps_with_one_outcome": all(("parsed" in s) != ("parse_error" in s) for c in cands for s in c["lineage"]),
        "step_kinds": sorted({s["kind"] for c in cands for s in c["lineage"]}),
        "units": sorted({c["source_id"] for c in cands}),
        "data_keys": sorted({k for d in data for k in d}) if data else None,
    }


def test_vllm_and_openai_runs_have_the_shape_of_a_local_run(cli, llama_server, small_corpus, tmp_path, monkeypatch):
    """Remote runs with the default curate mode: ``auto`` must settle on the rubric there (llama.cpp's
    server is not vLLM), so they compare with a local run told to use the rubric."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    local = tmp_path / "local"
    r = cli("run", "humpback", small_corpus, "-o", local, "--judge-mode", "rubric", *COMMON)
    assert r.exit_code == 0, r.output
    want = shape(local)
    assert want["step_kinds"] == ["chat"] and len(want["units"]) == 2

    # vllm: with no model name discovers the server's model; openai: names one
    for model in ("vllm:", "openai:smollm2"):
        out = tmp_path / model.replace(":", "_")
        before = requests_seen(llama_server)
        r = cli("run", "humpback", small_corpus, "-o", out, "--model", model, "--base-url", llama_server["base_url"], *COMMON)
        assert r.exit_code == 0, r.output
        got = shape(out)
        if want["data_keys"] is None or got["data_keys"] is None:  # the 135M judge rarely keeps a pair
            got["data_keys"] = want["data_keys"] = None
        assert got == want, model
        stats = json.loads((out / "stats.json").read_text())
        assert stats["model"] == model and stats["backend_failures"] == 0
        assert stats["tokens_in"] > 0 and stats["tokens_out"] > 0 and stats["calls"] >= 2
        cands = read_jsonl(out / "candidates.jsonl")
        step = cands[0]["lineage"][0]
        assert step["model"] == model and step["raw"] and step["finish_reason"] in ("stop", "length")
        assert all(c["meta"].get("curate_mode", "rubric") == "rubric" for c in cands)
        assert set(requests_seen(llama_server)[len(before):]) == {"POST /v1/chat/completions"}  # nothing else was tried


def test_vllm_default_run_curates_by_rubric_on_a_server_that_is_not_vllm(cli, llama_server, small_corpus, tmp_path):
    """The bug this guards: vllm: claimed logprobs statically, so auto picked them and the run stopped
    after paying for every augment call. Now it asks the server once and reads the rubric."""
    out = tmp_path / "out"
    # -S augment.max_tokens gives the instruction room to finish (a truncated one never reaches curate)
    r = cli("run", "humpback", small_corpus, "-o", out, "--model", "vllm:", "--base-url", llama_server["base_url"], "--shots", "1",
            "-S", "augment.max_tokens=96", "-S", "augment.temperature=0", "-S", "curate.max_tokens=32", "-q")
    assert r.exit_code == 0, r.output
    cands = read_jsonl(out / "candidates.jsonl")
    curated = [c for c in cands if "curate_mode" in c["meta"]]
    assert curated, [(c["dropped_at"], c["reason"]) for c in cands]
    assert {c["meta"]["curate_mode"] for c in curated} == {"rubric"}
    assert all(s["kind"] == "chat" for c in cands for s in c["lineage"])
    assert json.loads((out / "stats.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("mode", ["pmi", "logprob"])
def test_vllm_explicit_likelihood_mode_stops_before_any_request(cli, llama_server, small_corpus, tmp_path, mode, isolated_cache):
    before = requests_seen(llama_server)
    out = tmp_path / "out"
    r = cli("run", "humpback", small_corpus, "-o", out, "--model", "vllm:", "--base-url", llama_server["base_url"],
            "--judge-mode", mode, *COMMON)
    assert r.exit_code == 2
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1, lines
    assert "does not say it is vLLM (GET /models owned_by: me)" in lines[0] and f"--judge-mode {mode}" in lines[0]
    assert "llamacpp:PATH.gguf" in lines[0]  # a backend that can
    assert requests_seen(llama_server)[len(before):] == []  # no model call: only GET /models was asked
    assert not (out / "candidates.jsonl").exists()
    assert not isolated_cache.exists() or isolated_cache.stat().st_size == 0 or _cache_rows(isolated_cache) == 0


def _cache_rows(path: Path) -> int:
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as db:
        tables = [t for (t,) in db.execute("select name from sqlite_master where type='table'")]
        return sum(db.execute(f'select count(*) from "{t}"').fetchone()[0] for t in tables)


def test_openai_auto_curate_falls_back_to_rubric_and_prices_known_models(cli, llama_server, small_corpus, tmp_path):
    # llama.cpp's server answers whatever model is named; gpt-4o-mini is in litellm's price table
    out = tmp_path / "out"
    r = cli("run", "humpback", small_corpus, "-o", out, "--model", "openai:gpt-4o-mini", "--base-url", llama_server["base_url"],
            "--limit", "1", "--shots", "1", "--max-tokens", "32", "-q")
    assert r.exit_code == 0, r.output
    cands = read_jsonl(out / "candidates.jsonl")
    assert [c["meta"]["curate_mode"] for c in cands if "curate_mode" in c["meta"]] in ([], ["rubric"])
    stats = json.loads((out / "stats.json").read_text())
    if HAS_LITELLM:  # the price table ships with litellm
        aug = stats["stages"]["humpback.augment"]
        assert aug["cost_usd"] == pytest.approx(aug["tokens_in"] * 0.15e-6 + aug["tokens_out"] * 0.6e-6)


def test_vllm_logprob_scoring_refuses_a_server_that_is_not_vllm(llama_server):
    """llama.cpp's server ignores vLLM's prefill fields: scores read there would be wrong, so it is a
    configuration error (the run stops with this message) before any scoring request is sent."""
    import asyncio

    from btkit.errors import CapabilityError
    from btkit_plugins.backends.openai_compat import VLLMBackend

    before = requests_seen(llama_server)
    b = VLLMBackend("", {"base_url": llama_server["base_url"]})
    assert b.supports("chat") and not b.supports("next_token_logprobs") and not b.supports("score_continuation")
    msgs = [{"role": "user", "content": "Rate 1-5: is 2+2=4?"}]
    with pytest.raises(CapabilityError, match="does not say it is vLLM.*--judge-mode rubric"):
        asyncio.run(b.next_token_logprobs(msgs, "Score: ", ["1", "2", "3", "4", "5"]))
    with pytest.raises(CapabilityError, match="does not say it is vLLM"):
        asyncio.run(b.score_continuation(msgs, "Four."))
    assert b.model == llama_server["model_id"]  # discovered from GET /v1/models
    trusted = VLLMBackend("", {"base_url": llama_server["base_url"], "vllm_extensions": True})
    assert trusted.supports("next_token_logprobs")
    trusted.require_extensions("test")  # vouched for by the user: no error
    assert requests_seen(llama_server)[len(before):] == []  # refused before sending anything


@pytest.mark.skipif(not HAS_LITELLM, reason="litellm is not installed (pip install 'btkit[remote]')")
def test_litellm_openai_provider_on_the_local_server(cli, llama_server, small_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local-unused")
    out = tmp_path / "out"
    r = cli("run", "humpback", small_corpus, "-o", out, "--model", "litellm:openai/gpt-4o-mini", "--base-url", llama_server["base_url"],
            "--limit", "1", *COMMON)
    assert r.exit_code == 0, r.output
    stats = json.loads((out / "stats.json").read_text())
    assert stats["backend_failures"] == 0 and stats["tokens_in"] > 0
    step = read_jsonl(out / "candidates.jsonl")[0]["lineage"][0]
    assert step["model"] == "litellm:openai/gpt-4o-mini" and step["raw"]
    assert step["cost"] == pytest.approx(step["tokens"][0] * 0.15e-6 + step["tokens"][1] * 0.6e-6)
    assert stats["cost_usd"] > 0


# -- openai: continuation scores through /completions echo ---------------------------------------
def test_openai_pmi_run_on_a_server_that_echoes_prompt_logprobs(cli, echo_server, tmp_path):
    rows = [json.loads(l) for l in (EXAMPLES / "corpus.jsonl").read_text().splitlines()[:2]]
    corpus_path = write_jsonl(tmp_path / "c.jsonl", [{**r, "text": " ".join(r["text"].split()[:30])} for r in rows])
    out = tmp_path / "out"
    r = cli("run", "humpback", corpus_path, "-o", out, "--model", "openai:smollm2", "--base-url", echo_server["base_url"],
            "--judge-mode", "pmi", "--keep-top", "100", "--min-words", "10", "--shots", "1",
            "-S", "augment.max_tokens=48", "-S", "augment.temperature=0", "-q")
    assert r.exit_code == 0, r.output
    cands = read_jsonl(out / "candidates.jsonl")
    scored = [c for c in cands if c["meta"].get("curate_mode") == "pmi"]
    assert scored, [(c["dropped_at"], c["reason"]) for c in cands]
    data = read_jsonl(out / "data.jsonl")
    assert data and {d["meta"]["id"] for d in data} <= {c["id"] for c in scored}
    for d in data:
        meta = d["meta"]
        assert meta["curate_mode"] == "pmi" and meta["score"] == meta["pmi"] == pytest.approx(meta["cond_logprob"] - meta["uncond_logprob"], abs=1e-5)
        assert meta["cond_tokens"] == meta["uncond_tokens"] > 5  # the same response tokens in both frames
        assert -20 < meta["cond_logprob"] < 0 and -20 < meta["uncond_logprob"] < 0
        assert [s["kind"] for s in meta["lineage"]].count("score_continuation") == 2
    stats = json.loads((out / "stats.json").read_text())
    assert stats["status"] == "complete" and stats["backend_failures"] == 0
    calls = requests_seen(echo_server)
    assert "POST /v1/completions" in calls and "POST /v1/chat/completions" in calls


def test_openai_continuation_scores_match_llama_cpp_run_in_process(echo_server):
    """The per-token logprobs read from the server are the ones llama-cpp-python computes here for the
    same text (same GGUF, same BOS): the frame, the offsets and the boundary are handled right."""
    import asyncio

    import llama_cpp
    import numpy as np

    from btkit.kit.models import embedded_model_path
    from btkit_plugins.backends.openai_compat import OpenAICompatBackend, text_frame

    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = "The capital of France is Paris."
    b = OpenAICompatBackend("smollm2", {"base_url": echo_server["base_url"]})

    async def go():
        try:
            return await b.score_continuation(question, answer), await b.score_continuation(None, answer)
        finally:
            await b.aclose()

    cond, uncond = asyncio.run(go())
    llm = llama_cpp.Llama(model_path=str(embedded_model_path()), n_ctx=512, logits_all=True, verbose=False,
                          n_threads=os.cpu_count() or 1, kv_overrides={"tokenizer.ggml.add_bos_token": True})
    for messages, got in ((question, cond), (None, uncond)):
        frame = text_frame(messages)
        head = [llm.token_bos()] + llm.tokenize(frame.encode(), add_bos=False, special=True)  # as the server tokenizes
        full = [llm.token_bos()] + llm.tokenize((frame + answer).encode(), add_bos=False, special=True)
        assert full[: len(head)] == head  # the frame's final newline ends a token here: no straddling token
        llm.reset()
        llm.eval(full)
        logits = np.asarray(llm.scores[: len(full)], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        logprobs = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
        want = [float(logprobs[i - 1, full[i]]) for i in range(len(head), len(full))]
        assert len(got) == len(want) == len(full) - len(head)
        assert got == pytest.approx(want, abs=2e-3)
        assert all(v < 0 for v in got)
    # and the numbers mean what PMI needs: the question makes its answer likelier
    assert sum(cond) / len(cond) > sum(uncond) / len(uncond)


def test_openai_refuses_to_score_where_the_server_gives_no_echo_logprobs(cli, llama_server, small_corpus, tmp_path):
    """``--logits_all False``: the server answers HTTP 500 to echo + logprobs; the run stops with one
    line naming backends that can, after that one probe and before any augment call."""
    before = requests_seen(llama_server)
    r = cli("run", "humpback", small_corpus, "-o", tmp_path / "out", "--model", "openai:smollm2", "--base-url", llama_server["base_url"],
            "--judge-mode", "pmi", *COMMON)
    assert r.exit_code == 2
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1, lines
    assert "HTTP 500 (logprobs is not supported for models created with logits_all=False)" in lines[0]
    assert "this endpoint cannot score continuations" in lines[0] and "llamacpp:PATH.gguf" in lines[0] and "vllm:" in lines[0]
    assert requests_seen(llama_server)[len(before):] == ["POST /v1/completions"]


def test_openai_refuses_echo_logprobs_read_one_token_late(cli, small_corpus, tmp_path):
    """``--logits_all True`` with SmolLM2 as it ships (no BOS token): llama-cpp-python's server gives
    each token the logprob of the distribution after it. Scores read there would be wrong: refused."""
    with llama_cpp_server(tmp_path / "server.log", "--logits_all", "True") as late:
        r = cli("run", "humpback", small_corpus, "-o", tmp_path / "out", "--model", "openai:smollm2", "--base-url", late["base_url"],
                "--judge-mode", "ifd", *COMMON)
        assert r.exit_code == 2
        lines = [l for l in r.output.splitlines() if l.strip()]
        assert len(lines) == 1 and "one token late" in lines[0] and "this endpoint cannot score continuations" in lines[0], lines
        assert "--judge-mode ifd" in lines[0] and "llamacpp:PATH.gguf" in lines[0]
        assert requests_seen(late) == ["POST /v1/completions"]
