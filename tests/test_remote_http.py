"""The remote backends' shared rules: options, Retry-After, base URLs, budgets, identity. No server."""

from __future__ import annotations

import email.utils
import time

import pytest

from btkit.errors import BtkitError
from btkit.kit.http import RemoteSettings, RetryBudget, Secret, normalize_base_url, parse_retry_after, public_url


def test_retry_after_in_seconds_milliseconds_and_http_date():
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25  # the finer one wins
    in_ten = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8 <= parse_retry_after({"retry-after": in_ten}) <= 10
    assert parse_retry_after({"retry-after": "soon"}) is None and parse_retry_after({}) is None


def test_backoff_honours_retry_after_and_grows_with_jitter_otherwise():
    s = RemoteSettings(backoff_base=1.0, max_backoff=8.0)
    assert all(2.0 <= s.backoff(0, 2.0) <= 2.2 for _ in range(50))  # never earlier than the server asked
    for attempt, cap in [(0, 1.0), (1, 2.0), (2, 4.0), (5, 8.0)]:
        waits = [s.backoff(attempt, None) for _ in range(200)]
        assert min(waits) >= cap / 2 and max(waits) <= cap and len(set(waits)) > 1


def test_retry_budget_grows_with_requests():
    b = RetryBudget(budget=1, ratio=0.5)
    b.note_request()
    assert b.try_spend() and not b.try_spend()  # 1 + 0.5 x 1 allows one retry
    b.note_request()
    assert b.try_spend() and not b.try_spend()  # 1 + 0.5 x 2 allows two in all


def test_options_from_the_command_line_are_checked():
    s = RemoteSettings.from_options({"timeout": "30", "max_retries": 4, "base_url": "ignored here"})
    assert (s.timeout, s.max_retries) == (30.0, 4)
    with pytest.raises(BtkitError, match="timeout"):
        RemoteSettings.from_options({"timeout": "soon"})
    with pytest.raises(BtkitError):
        RemoteSettings.from_options({"timeout": 0})


def test_base_urls_get_v1_and_lose_credentials_in_public_form():
    assert normalize_base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalize_base_url("https://api.example.com/v1/") == "https://api.example.com/v1"
    assert normalize_base_url("http://h:1/openai/v1") == "http://h:1/openai/v1"
    assert public_url("https://user:pw@h.example/v1") == "https://h.example/v1"
    with pytest.raises(BtkitError, match="not an http"):
        normalize_base_url("127.0.0.1:8000")


def test_identity_has_url_and_model_never_the_key(monkeypatch):
    from btkit_plugins.backends.litellm_backend import LiteLLMBackend
    from btkit_plugins.backends.openai_compat import OpenAICompatBackend

    monkeypatch.setenv("OPENAI_API_KEY", "sk-canary-identity")
    b = OpenAICompatBackend("gpt-x", {"base_url": "https://user:pw@api.example.com/v1"})
    assert b.identity() == {"backend": "openai", "base_url": "https://api.example.com/v1", "model": "gpt-x"}
    assert "sk-canary-identity" not in repr(b) + repr(vars(b)) + repr(vars(b.client))
    lb = LiteLLMBackend("anthropic/claude-x", {"api_key": "sk-canary-identity"})
    assert "sk-canary-identity" not in repr(lb.identity()) + repr(vars(lb))
    assert Secret("abc12345", also=["zzz99999"]).redact("abc12345 and zzz99999") == "*** and ***"


def test_a_password_in_the_base_url_lives_only_in_the_auth_header(monkeypatch):
    """Requests, identity, repr and the backend's attributes see the URL without ``user:password@``;
    the password (as written, decoded, and as the Basic token) is scrubbed from reply text like a key."""
    import base64

    from btkit_plugins.backends.litellm_backend import LiteLLMBackend
    from btkit_plugins.backends.openai_compat import OpenAICompatBackend

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    url = "https://proxy:pw%40canary-url-77@api.example.com/v1"
    token = base64.b64encode(b"proxy:pw@canary-url-77").decode()
    b = OpenAICompatBackend("gpt-x", {"base_url": url})
    assert b.base_url == b.client.base_url == "https://api.example.com/v1" == b.identity()["base_url"]
    assert b.client._auth_headers()["Authorization"] == f"Basic {token}"
    lb = LiteLLMBackend("openai/gpt-x", {"base_url": url})
    assert lb.identity()["base_url"] == "https://api.example.com/v1"
    kwargs = lb.request_kwargs([{"role": "user", "content": "hi"}], {})
    assert kwargs["api_base"] == "https://api.example.com/v1" and kwargs["extra_headers"] == {"Authorization": f"Basic {token}"}
    for backend in (b, lb):
        seen = repr(backend) + repr(vars(backend)) + repr(backend.identity()) + repr(vars(getattr(backend, "client", backend)))
        assert "canary-url" not in seen and token not in seen
        echoed = "called as https://proxy:pw%40canary-url-77@api... with Basic " + token + " (pw@canary-url-77)"
        assert backend.api_key.redact(echoed) == "called as https://proxy:***@api... with Basic *** (***)"


def test_plugins_load_and_backends_build_without_importing_http_or_litellm():
    """``btkit --help`` loads every plugin: aiohttp (0.3 s) and litellm (3 s) must wait for a call."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from btkit.plugins import Registry\n"
        "r = Registry(); r.backends(); r.methods()\n"
        "r.make_backend('litellm:openai/x', {}); r.make_backend('openai:x', {'base_url': 'http://127.0.0.1:1'})\n"
        "r.make_backend('vllm:x', {})\n"
        "print(sorted(m for m in ('litellm', 'aiohttp', 'openai') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_litellm_needs_a_provider_and_model():
    from btkit_plugins.backends.litellm_backend import LiteLLMBackend

    with pytest.raises(BtkitError, match="PROVIDER/MODEL"):
        LiteLLMBackend("", {})


def test_several_base_urls_share_the_calls_of_one_model(tmp_path):
    """``--base-url A,B``: one model behind two servers; the run's calls go to both in turn, the data is
    what one server gives (the replies are the same function of the request), and run.json names both."""
    import json
    import subprocess
    import sys

    from btkit.testing.fake_openai import FakeOpenAIServer

    a, b = FakeOpenAIServer().start(), FakeOpenAIServer().start()
    try:
        corpus = tmp_path / "c.jsonl"
        corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"document {i} says " + "apt dpkg mirror " * 12}) + "\n" for i in range(6)))
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "BTKIT_CACHE_DIR": str(tmp_path / "cache"), "OPENAI_API_KEY": "sk-test"}
        outs = {}
        for name, url in (("two", f"{a.base_url},{b.base_url}"), ("one", a.base_url)):
            done = subprocess.run([sys.executable, "-m", "btkit.cli", "run", "humpback", str(corpus), "-o", str(tmp_path / name),
                                   "--model", "openai:fake-model", "--base-url", url, "--judge-mode", "rubric", "--min-words", "5",
                                   "--no-cache", "-q"], env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            outs[name] = [json.loads(line)["instruction"] for line in (tmp_path / name / "data.jsonl").read_text().splitlines()]
            if name == "two":
                assert len(a.requests) >= 4 and len(b.requests) >= 4  # 12 calls, taken in turn
                assert abs(len(a.requests) - len(b.requests)) <= 1
        assert outs["two"] == outs["one"] and outs["one"]
        fp = json.loads((tmp_path / "two" / "run.json").read_text())["fingerprint"]
        assert fp["backend_options"]["base_url"] == f"{a.base_url},{b.base_url}"
    finally:
        a.stop()
        b.stop()
