"""Shared fixtures: an isolated cache per test, a fresh plugin registry, scripted backends, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own model-call cache, so tests never see each other's completions."""
    d = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("BTKIT_CACHE_DIR", str(d))
    return d / "cache.sqlite"


@pytest.fixture(scope="module")
def embedded_scorer():
    """The embedded GGUF in process, scoring with its own weights (``score_weights=same``)."""
    import asyncio

    from btkit_plugins.backends.llamacpp import LlamaCppBackend

    b = LlamaCppBackend("default", {"score_weights": "same"})
    yield b
    asyncio.run(b.aclose())


@pytest.fixture(scope="module")
def server():
    """The fault-injecting OpenAI-compatible server on 127.0.0.1 (tests/fault_server.py), one per module."""
    from fault_server import FaultServer

    srv = FaultServer().start()
    yield srv
    srv.stop()


def render_text(prompt) -> str:
    """A stable text form of a rendered prompt for golden files."""
    out = [f"[{m['role']}]\n{m['content']}" for m in prompt.messages]
    out.append(f"[assistant_prefix]\n{prompt.assistant_prefix!r}")
    return "\n\n".join(out) + "\n"


@pytest.fixture
def golden():
    """``golden("kun/augment.txt", prompt)``: assert a rendered prompt equals its file under tests/golden/;
    with ``BTKIT_UPDATE_GOLDEN=1`` the file is rewritten first (review the diff)."""
    import os

    def check(name: str, prompt) -> None:
        got = render_text(prompt)
        path = GOLDEN / name
        if os.environ.get("BTKIT_UPDATE_GOLDEN"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(got, encoding="utf-8")
        assert path.is_file(), f"no golden file {path}; create it with BTKIT_UPDATE_GOLDEN=1"
        assert got == path.read_text(encoding="utf-8"), f"rendered prompt changed; review and regenerate with BTKIT_UPDATE_GOLDEN=1 ({path})"

    return check


@pytest.fixture
def registry(monkeypatch):
    """A fresh registry loaded from entry points, also used by the CLI for this test."""
    from btkit import plugins

    reg = plugins.Registry()
    monkeypatch.setattr(plugins, "_registry", reg)
    return reg


@pytest.fixture
def scripted(registry):
    """``scripted(replies=[...], ...)`` -> (backend, spec) usable as ``--model spec``."""
    from btkit_plugins.testing import fake

    made = []

    def make(name: str = "t", **kwargs: Any):
        backend = fake.script(f"{name}{len(made)}", fake.ScriptedBackend(**kwargs))
        made.append(backend)
        return backend, backend.spec

    yield make
    for b in made:
        fake.SCRIPTS.pop(b.spec.split(":", 1)[1], None)


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]


@pytest.fixture
def cli(registry):
    """Invoke ``btkit ...`` in process; returns click's Result (exit_code, output, stderr)."""
    from btkit.cli import cli as btkit_cli

    def invoke(*args: Any):
        runner = CliRunner()
        return runner.invoke(btkit_cli, [str(a) for a in args], catch_exceptions=False)

    return invoke


def words(n: int, start: int = 0) -> str:
    """A deterministic text of n distinct-ish words (for segment length tests)."""
    vocab = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon".split()
    return " ".join(f"{vocab[(start + i) % len(vocab)]}{(start + i) // len(vocab)}" for i in range(n))
