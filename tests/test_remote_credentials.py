"""Credentials around remote backends: a password written into the base URL, a key a server echoes
inside a successful reply, and which backends ``OPENAI_BASE_URL`` is for. Real ``btkit`` runs (in
process or as real processes) against the fault-injecting server on 127.0.0.1; every file of the
run and the cache is read back byte for byte.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import read_jsonl, words, write_jsonl
from fault_server import FaultServer

KEY = "sk-canary-3b8e5f0a17c2"
PASSWORD = "pw-canary-94c1e7b25a"
BASIC = "Basic " + base64.b64encode(f"proxyuser:{PASSWORD}".encode()).decode()
HAS_LITELLM = importlib.util.find_spec("litellm") is not None
needs_litellm = pytest.mark.skipif(not HAS_LITELLM, reason="litellm is not installed (pip install 'btkit[remote]')")
REMOTE = ["openai:fake-model", "vllm:fake-model", pytest.param("litellm:openai/fake-model", marks=needs_litellm)]
REMOTE_LITELLM_SLOW = REMOTE[:2] + [pytest.param("litellm:openai/fake-model", marks=[needs_litellm, pytest.mark.slow])]


@pytest.fixture
def srv(server, monkeypatch):
    server.reset()
    server.owner = "fake"
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    return server


def corpus(path: Path, markers: dict[str, str]) -> Path:
    rows = [{"id": doc_id, "text": f"{marker} " + words(40, start=50 * i)} for i, (doc_id, marker) in enumerate(markers.items())]
    return write_jsonl(path, rows)


def every_file(out: Path, cache: Path) -> list[Path]:
    files = [p for p in out.rglob("*") if p.is_file()] + [p for p in cache.parent.rglob("*") if p.is_file()]
    assert any(p.name == "run.json" for p in files) and any(p.name.startswith("cache") for p in files)
    return files


def with_credentials(url: str) -> str:
    return url.replace("http://", f"http://proxyuser:{PASSWORD}@", 1)


# -- 8: a password in the base URL ------------------------------------------------------------
@pytest.mark.parametrize("given_as", ["--base-url", "OPENAI_BASE_URL"])
@pytest.mark.parametrize("model", ["openai:fake-model", pytest.param("litellm:openai/fake-model", marks=[needs_litellm, pytest.mark.slow])])
def test_a_password_in_the_base_url_is_used_and_recorded_nowhere(srv, tmp_path, isolated_cache, model, given_as):
    """run.json (fingerprint and command line), stats, lineage, failures, the cache and what the run
    prints hold the URL without ``user:password@``; the server gets the credentials as Basic auth."""
    markers = {"plain": "", "echo400": "[[fault=echokey id=echo400]]", "echo200": "[[fault=echoreply id=echo200]]",
               "boom": "[[fault=http500 id=boom]]", **{f"more{i}": "" for i in range(4)}}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "btkit.cli", "run", "humpback", str(corpus(tmp_path / "c.jsonl", markers)), "-o", str(out),
           "--model", model, "--judge-mode", "rubric", "--shots", "1", "-q", "-B", "max_retries=1", "-B", "backoff_base=0.01"]
    env = {**os.environ, "OPENAI_API_KEY": KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    if given_as == "--base-url":
        cmd += ["--base-url", with_credentials(srv.base_url)]
    else:
        env["OPENAI_BASE_URL"] = with_credentials(srv.base_url)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert srv.requests and {s.authorization for s in srv.requests} == {BASIC}  # the URL's credentials were sent
    cands = {c["source_id"]: c for c in read_jsonl(out / "candidates.jsonl")}
    assert cands["plain"]["status"] == "kept" and cands["echo200"]["status"] == "kept"
    assert cands["echo400"]["reason"] == cands["boom"]["reason"] == "backend_error"
    token = BASIC.split()[1]
    for secret in (PASSWORD, token, KEY):
        assert secret not in proc.stdout + proc.stderr
        for p in every_file(out, isolated_cache):
            assert secret.encode() not in p.read_bytes(), (secret, p)
    run = json.loads((out / "run.json").read_text())
    if given_as == "--base-url":
        assert run["fingerprint"]["backend_options"]["base_url"] == srv.base_url
        assert run["command"][run["command"].index("--base-url") + 1] == srv.base_url
    else:
        assert "base_url" not in run["fingerprint"]["backend_options"]  # read by the backend, not copied by the CLI
    failures = {f["id"].split("#")[0]: f for f in read_jsonl(out / "failures.jsonl")}
    assert "rejected request with header Basic ***" in failures["echo400"]["raw"]


@pytest.mark.slow
def test_stage_base_url_with_a_password_is_recorded_without_it(srv, tmp_path, isolated_cache, monkeypatch):
    """A pipeline stage's own ``base_url`` lands in run.json's fingerprint and in ``--check``'s listing."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "out"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        f"input: {corpus(tmp_path / 'c.jsonl', {'a': ''})}\noutput: {out}\nmodel: openai:fake-model\n"
        f"stages:\n  - use: humpback.augment\n    base_url: {with_credentials(srv.base_url)}\n"
        "  - use: humpback.curate\n    judge_mode: rubric\n", encoding="utf-8")
    check = subprocess.run([sys.executable, "-m", "btkit.cli", "run", str(pipeline), "--check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    assert f"@ {srv.base_url}" in check.stdout and PASSWORD not in check.stdout
    proc = subprocess.run([sys.executable, "-m", "btkit.cli", "run", str(pipeline), "-q"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OPENAI_BASE_URL": srv.base_url})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {s.authorization for s in srv.requests if s.stage == "augment"} == {BASIC}
    assert {s.authorization for s in srv.requests if s.stage == "curate"} == {f"Bearer {KEY}"}
    stages = json.loads((out / "run.json").read_text())["fingerprint"]["stages"]
    assert stages[0]["options"]["base_url"] == srv.base_url
    for p in every_file(out, isolated_cache):
        assert PASSWORD.encode() not in p.read_bytes(), p


def test_redacted_command_line_drops_userinfo_from_every_url():
    from btkit.rundir import redact_argv

    argv = ["btkit", "--base-url", f"http://u:{PASSWORD}@h:1/v1", f"--base-url=https://u:{PASSWORD}@h/v1",
            "-S", f"augment.base_url=http://u:{PASSWORD}@h:2/v1", "-B", f"api_key={KEY}", "--model", "openai:x"]
    assert redact_argv(argv) == ["btkit", "--base-url", "http://h:1/v1", "--base-url=https://h/v1",
                                 "-S", "augment.base_url=http://h:2/v1", "-B", "api_key=***", "--model", "openai:x"]


def test_redaction_masks_credentials_not_token_counts():
    """``max_tokens=128`` is a setting, not a secret: the report once showed it as ``max_tokens=***``."""
    from btkit.rundir import redact_argv

    argv = ["-S", "augment.max_tokens=128", "--max-tokens=64", "-B", "access_token=abc", "--api-key=sk-1", "-B", "db_password=p"]
    assert redact_argv(argv) == ["-S", "augment.max_tokens=128", "--max-tokens=64", "-B", "access_token=***", "--api-key=***",
                                 "-B", "db_password=***"]


# -- 9: a key echoed inside a successful reply ------------------------------------------------
@pytest.mark.parametrize("model", REMOTE_LITELLM_SLOW)
def test_a_key_echoed_in_a_successful_reply_never_reaches_cache_or_data(cli, srv, tmp_path, isolated_cache, monkeypatch, model):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "out"
    markers = {"aug": "[[fault=echoreply id=aug]]", "cur": "[[fault=echoreply stage=curate id=cur]]"}
    r = cli("run", "humpback", corpus(tmp_path / "c.jsonl", markers), "-o", out, "--model", model, "--base-url", srv.base_url,
            "--judge-mode", "rubric", "--shots", "1", "-q")
    assert r.exit_code == 0, r.output
    assert {s.action for s in srv.requests} >= {"echoreply"}  # the server did quote the key in 200 replies
    data = read_jsonl(out / "data.jsonl")
    assert {d["meta"]["source_id"] for d in data} == {"aug", "cur"}  # the replies are used, the key cut out of them
    aug = next(d for d in data if d["meta"]["source_id"] == "aug")
    assert "(asked with Bearer ***)" in aug["instruction"]
    for p in every_file(out, isolated_cache):
        assert KEY.encode() not in p.read_bytes(), p


@pytest.mark.parametrize("model", REMOTE)
def test_every_choice_of_an_n_request_is_redacted(srv, monkeypatch, model):
    from btkit.plugins import Registry

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    backend = Registry().make_backend(model, {"base_url": srv.base_url, "vllm_extensions": "false"})

    async def go():
        try:
            return await backend.chat([{"role": "user", "content": "[[fault=echoreply id=n3]] hi"}], {"n": 3, "max_tokens": 16})
        finally:
            await backend.aclose()

    comp = asyncio.run(go())
    texts = [c["text"] for c in comp.extra["choices"]]
    assert len(texts) == 3 and all("(asked with Bearer ***)" in t for t in texts)
    assert KEY not in json.dumps(comp.to_json())


# -- 12: who reads OPENAI_BASE_URL --------------------------------------------------------------
@pytest.mark.slow
@needs_litellm
def test_a_litellm_anthropic_run_is_never_sent_to_openai_base_url(srv, tmp_path):
    """The CLI does not copy OPENAI_BASE_URL into backend options: litellm:anthropic/... goes to its
    own endpoint (here ANTHROPIC_BASE_URL, a second local server), not to the OpenAI-compatible one."""
    anthropic = FaultServer().start()
    try:
        out = tmp_path / "out"
        env = {**os.environ, "OPENAI_BASE_URL": srv.base_url, "ANTHROPIC_BASE_URL": anthropic.base_url.removesuffix("/v1"),
               "ANTHROPIC_API_KEY": "sk-ant-canary-1234567890", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        proc = subprocess.run([sys.executable, "-m", "btkit.cli", "run", "humpback", str(corpus(tmp_path / "c.jsonl", {"a": ""})),
                               "-o", str(out), "--model", "litellm:anthropic/claude-x", "--judge-mode", "rubric", "--shots", "1",
                               "-q", "-B", "max_retries=0"], capture_output=True, text=True, timeout=300, env=env)
        assert srv.requests == [], [(s.path, s.action) for s in srv.requests]
        assert [s.path for s in anthropic.requests][:1] == ["/v1/messages"], proc.stderr[-2000:]
    finally:
        anthropic.stop()


def test_openai_base_url_is_for_openai_compatible_backends_only(srv, monkeypatch):
    from btkit.plugins import Registry

    monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
    registry = Registry()
    assert registry.make_backend("openai:m", {}).identity()["base_url"] == srv.base_url
    assert registry.make_backend("vllm:m", {}).identity()["base_url"] == srv.base_url
    assert registry.make_backend("openai:m", {"base_url": "http://127.0.0.1:9/v1"}).identity()["base_url"] == "http://127.0.0.1:9/v1"
    if HAS_LITELLM:
        anthropic = registry.make_backend("litellm:anthropic/claude-x", {})
        assert anthropic.identity()["base_url"] is None
        assert "api_base" not in anthropic.request_kwargs([{"role": "user", "content": "hi"}], {})
        assert registry.make_backend("litellm:openai/m", {}).identity()["base_url"] == srv.base_url  # where litellm sends it too


def test_a_local_run_resumes_after_openai_base_url_changed(cli, scripted, srv, tmp_path, monkeypatch):
    """OPENAI_BASE_URL is not a setting of a run whose backend never reads it (llamacpp:, or here a
    scripted backend): changing it between two invocations must not stop the resume."""
    backend, spec = scripted(default="What is in the list?", logprobs={"5": -0.1})
    c = corpus(tmp_path / "c.jsonl", {f"d{i}": "" for i in range(4)})
    out = tmp_path / "out"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:1/v1")
    first = cli("run", "humpback", c, "-o", out, "--model", spec, "--shots", "1", "--limit", "2", "-q")
    assert first.exit_code == 0, first.output
    assert "base_url" not in json.loads((out / "run.json").read_text())["fingerprint"]["backend_options"]
    monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
    second = cli("run", "humpback", c, "-o", out, "--model", spec, "--shots", "1", "-q")
    assert second.exit_code == 0, second.output
    assert "different settings" not in second.output
    assert sorted({c["source_id"] for c in read_jsonl(out / "candidates.jsonl")}) == ["d0", "d1", "d2", "d3"]
    assert srv.requests == []


def test_a_pipeline_file_reads_openai_base_url_like_the_cli(srv, tmp_path, isolated_cache):
    """No base_url in the file: an openai: stage goes to OPENAI_BASE_URL, as `btkit run METHOD` does."""
    out = tmp_path / "out"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"input: {corpus(tmp_path / 'c.jsonl', {'a': '', 'b': ''})}\noutput: {out}\nmodel: openai:fake-model\n"
                        "stages:\n  - use: humpback.augment\n  - use: humpback.curate\n    judge_mode: rubric\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "btkit.cli", "run", str(pipeline), "-q"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OPENAI_BASE_URL": srv.base_url, "OPENAI_API_KEY": KEY})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {s.stage for s in srv.requests} == {"augment", "curate"}
    assert len(read_jsonl(out / "data.jsonl")) == 2
