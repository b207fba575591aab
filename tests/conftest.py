"""btkit's own fixtures. The generic ones (an isolated cache per test, a fresh plugin registry, scripted
backends, the CLI) come from the pytest plugin btkit ships for plugin authors, enabled here the way
any third-party suite enables it; what only btkit's tests need (golden files, the fault server, the
embedded model, ``words``) stays here."""

from __future__ import annotations

from pathlib import Path

import pytest

from btkit.testing import read_jsonl, write_jsonl  # noqa: F401 (test modules import them from here)

pytest_plugins = ["btkit.testing.pytest_plugin"]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GOLDEN = Path(__file__).resolve().parent / "golden"


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


def words(n: int, start: int = 0) -> str:
    """A deterministic text of n distinct-ish words (for segment length tests)."""
    vocab = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon".split()
    return " ".join(f"{vocab[(start + i) % len(vocab)]}{(start + i) // len(vocab)}" for i in range(n))


@pytest.fixture(scope="session")
def hf_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded GGUF dequantized once per test session into an HF model folder (training starts here).

    Every test has its own BTKIT_CACHE_DIR, which would otherwise convert the GGUF again (~25 s) per test.
    """
    pytest.importorskip("transformers")
    from btkit_plugins.train.base_model import hf_model_dir

    return hf_model_dir(None, cache_dir=tmp_path_factory.getbasetemp() / "hf-models")
