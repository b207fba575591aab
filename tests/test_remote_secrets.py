"""A canary API key must not show up anywhere but the Authorization header, even with litellm's own
debug logging on. litellm's loggers do not propagate to the root logger, so pytest's caplog never
sees them: these checks run real processes and read everything they print.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import words, write_jsonl

#: An OpenAI-style key (litellm's own log redaction knows its shape) and an Azure-style one (32 hex
#: characters, a shape litellm's pattern-based redaction leaves alone).
CANARIES = ["sk-canary-5e8d2b7a91c4", "3f9a1c5e7b2d4f6a8c0e1b3d5f7a9c2e"]
HAS_LITELLM = importlib.util.find_spec("litellm") is not None
pytestmark = pytest.mark.skipif(not HAS_LITELLM, reason="litellm is not installed (pip install 'btkit[remote]')")

#: ``btkit`` with litellm's debug logging on (what a user debugging a provider would do). Through
#: ``litellm._turn_on_debug()``: with litellm 1.110.2, ``LITELLM_LOG=DEBUG`` alone prints nothing, so
#: each test also asserts that litellm's own request logging did print (it cannot pass on silence).
DEBUG_BTKIT = "import litellm; litellm._turn_on_debug(); from btkit.cli import main; main()"


@pytest.fixture
def srv(server):
    server.reset()
    return server


def leaks(canary: str, text: str) -> list[str]:
    """Any 8 characters in a row of the canary found in ``text`` (a masked key may keep a few)."""
    return sorted({canary[i : i + 8] for i in range(len(canary) - 7) if canary[i : i + 8] in text})


def env_with(canary: str) -> dict[str, str]:
    return {**os.environ, "OPENAI_API_KEY": canary, "LITELLM_LOG": "DEBUG", "PYTHONUNBUFFERED": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


@pytest.mark.slow
@pytest.mark.parametrize("canary", CANARIES)
def test_litellm_debug_logs_of_a_run_never_show_the_key(srv, tmp_path, isolated_cache, canary):
    markers = {"plain": "", "echo": "[[fault=echokey id=echo]]", "once": "[[fault=http500 times=1 id=once]]",
               "boom": "[[fault=http500 id=boom]]", "drop": "[[fault=drop times=1 id=drop]]"}
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": k, "text": f"{m} " + words(40, start=50 * i)} for i, (k, m) in enumerate(markers.items())])
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", DEBUG_BTKIT, "run", "humpback", str(corpus), "-o", str(out), "--model", "litellm:openai/fake-model",
         "--base-url", srv.base_url, "--shots", "1", "-B", "max_retries=1", "-B", "backoff_base=0.02"],
        capture_output=True, text=True, timeout=300, env=env_with(canary),
    )
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0, printed[-3000:]
    assert "POST Request Sent from LiteLLM" in printed and "LiteLLM:DEBUG" in printed  # debug logging was on
    assert {s.authorization for s in srv.requests} == {f"Bearer {canary}"}  # the key was used...
    assert leaks(canary, printed) == []  # ...and never printed
    files = [p for p in out.rglob("*") if p.is_file()] + [p for p in Path(isolated_cache).parent.rglob("*") if p.is_file()]
    assert any(p.name == "failures.jsonl" for p in files) and any(p.name.startswith("cache") for p in files)
    for p in files:
        assert leaks(canary, p.read_bytes().decode("utf-8", "replace")) == [], p


#: Calls each remote backend on faults whose replies quote the key, prints every error's traceback
#: with its whole chain (suppressed contexts too: an error reporter may show them), and logs the key
#: through litellm's loggers, at debug level and in a logged exception.
TRACEBACK_SCRIPT = r'''
import asyncio, logging, sys, traceback
import litellm
litellm._turn_on_debug()
from btkit_plugins.backends.litellm_backend import LiteLLMBackend
from btkit_plugins.backends.openai_compat import OpenAICompatBackend, VLLMBackend

def chain(e):
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen

async def main(base, key):
    opts = {"base_url": base, "max_retries": 1, "backoff_base": 0.01}
    backends = [LiteLLMBackend("openai/fake-model", dict(opts)), OpenAICompatBackend("fake-model", dict(opts)), VLLMBackend("fake-model", dict(opts))]
    for b in backends:
        for marker in ["[[fault=echokey id=e]]", "[[fault=http500 id=f]]", "[[fault=http401 id=g]]", "[[fault=drop id=h]]"]:
            try:
                await b.chat([{"role": "user", "content": marker + " hello"}], {"max_tokens": 8})
                print("NO ERROR", b.spec, marker)
            except BaseException as e:
                for link in chain(e):
                    print("TRACEBACK", b.spec, marker, "".join(traceback.format_exception(type(link), link, link.__traceback__)))
                    print("REPR", repr(link), repr(getattr(link, "raw", None)))
        await b.aclose()
    log = logging.getLogger("LiteLLM")
    log.debug("LOGGED key=%s", key)
    logging.getLogger("LiteLLM Router").warning("LOGGED router key " + key)
    try:
        raise RuntimeError("provider said: bad key " + key)
    except RuntimeError:
        log.exception("LOGGED failure")

asyncio.run(main(sys.argv[1], sys.argv[2]))
'''


@pytest.mark.slow
@pytest.mark.parametrize("canary", CANARIES)
def test_backend_error_tracebacks_and_litellm_logs_never_show_the_key(srv, tmp_path, canary):
    proc = subprocess.run([sys.executable, "-c", TRACEBACK_SCRIPT, srv.base_url, canary], capture_output=True, text=True,
                          timeout=300, env=env_with(canary))
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0, printed[-3000:]
    assert "NO ERROR" not in printed
    assert "POST Request Sent from LiteLLM" in printed and "LiteLLM:DEBUG" in printed  # litellm's debug logging was on
    # every fault raised, for every backend; the two that quote the key show where it was cut out
    for spec in ("litellm:openai/fake-model", "openai:fake-model", "vllm:fake-model"):
        for fault in ("echokey", "http500", "http401", "drop"):
            assert f"TRACEBACK {spec} [[fault={fault}" in printed, (spec, fault)
    assert "rejected request with header Bearer ***" in printed and "Incorrect API key provided: Bearer ***" in printed
    # litellm's loggers: the key logged at debug level, on the router logger and in a traceback, is scrubbed
    # (litellm writes REDACTED where its own patterns know the key's shape, btkit's filter *** elsewhere)
    assert re.search(r"LOGGED key=(\*\*\*|REDACTED)", printed) and re.search(r"LOGGED router key (\*\*\*|REDACTED)", printed)
    assert "LOGGED failure" in printed and re.search(r"provider said: bad key (\*\*\*|REDACTED)", printed)
    assert leaks(canary, printed) == []
