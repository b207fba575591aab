"""Remote backends against a real OpenAI-compatible server: llama-cpp-python's, serving the embedded
SmolLM2-135M on 127.0.0.1. A remote run must give what a local ``llamacpp:`` run gives: the same
files, the same record keys, the same lineage step keys.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import EXAMPLES, read_jsonl, write_jsonl

pytestmark = [pytest.mark.model, pytest.mark.slow]

HAS_LITELLM = importlib.util.find_spec("litellm") is not None
HAS_SERVER = importlib.util.find_spec("llama_cpp.server") is not None if importlib.util.find_spec("llama_cpp") else False
# Small and bounded: one few-shot turn, short completions.
COMMON = ["--curate-mode", "rubric", "--shots", "1", "--max-tokens", "32", "-q"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """``python -m llama_cpp.server`` on a free port; stopped by PID at the end of the module."""
    if not HAS_SERVER:
        pytest.skip("llama-cpp-python[server] is not installed")
    from btkit_plugins.llamacpp import embedded_model_path

    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_model_path()), "--host", "127.0.0.1",
             "--port", str(port), "--n_ctx", "4096", "--n_threads", str(os.cpu_count() or 1), "--logits_all", "False"],
            stdout=f, stderr=subprocess.STDOUT,
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
        yield {"base_url": base, "model_id": model_id}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


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
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    local = tmp_path / "local"
    r = cli("run", "humpback", small_corpus, "-o", local, *COMMON)
    assert r.exit_code == 0, r.output
    want = shape(local)
    assert want["step_kinds"] == ["chat"] and len(want["units"]) == 2

    # vllm: with no model name discovers the server's model; openai: names one
    for model in ("vllm:", "openai:smollm2"):
        out = tmp_path / model.replace(":", "_")
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
    from btkit_plugins.openai_compat import VLLMBackend

    b = VLLMBackend("", {"base_url": llama_server["base_url"]})
    msgs = [{"role": "user", "content": "Rate 1-5: is 2+2=4?"}]
    with pytest.raises(CapabilityError, match="does not say it is vLLM.*--curate-mode rubric"):
        asyncio.run(b.next_token_logprobs(msgs, "Score: ", ["1", "2", "3", "4", "5"]))
    with pytest.raises(CapabilityError, match="does not say it is vLLM"):
        asyncio.run(b.score_continuation(msgs, "Four."))
    assert b.model == llama_server["model_id"]  # discovered from GET /v1/models
    trusted = VLLMBackend("", {"base_url": llama_server["base_url"], "vllm_extensions": True})
    assert trusted.supports("next_token_logprobs")
    trusted.require_extensions("test")  # vouched for by the user: no error


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
