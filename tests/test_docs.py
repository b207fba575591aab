"""The plugin guide (docs/plugins.md) names every hook and every public name a plugin may import.

A module's public names are its ``__all__`` (a module of the plugin API without one fails here, so
nothing is public by accident); each must appear in backticks in that module's section of the guide.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import btkit.kit
from btkit import hookspecs

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
#: The modules a plugin may import, besides every module of btkit.kit and btkit.testing.
API_MODULES = ["btkit.methods", "btkit.backends", "btkit.records", "btkit.errors", "btkit.options", "btkit.parsing", "btkit.config",
               "btkit.executors"]


def api_modules() -> list[str]:
    import btkit.testing

    kit = [f"btkit.kit.{m.name}" for m in pkgutil.iter_modules(btkit.kit.__path__)]
    testing = [f"btkit.testing.{m.name}" for m in pkgutil.iter_modules(btkit.testing.__path__)]
    return API_MODULES + kit + testing


def sections() -> dict[str, str]:
    """The guide's ``### `module` `` sections by module name."""
    text = GUIDE.read_text(encoding="utf-8")
    parts = re.split(r"^### ", text, flags=re.MULTILINE)[1:]
    out = {}
    for part in parts:
        title, _, body = part.partition("\n")
        m = re.search(r"`([\w.]+)`", title)
        if m:
            out[m.group(1)] = body
    return out


def documented(name: str, body: str) -> bool:
    """``name`` is a word of some code span of ``body`` (`name`, `name(...)`, `a * name`)."""
    word = re.compile(r"(?<![\w.])" + re.escape(name) + r"(?!\w)")
    return any(word.search(span) for span in re.findall(r"`([^`]+)`", body))


def test_every_hook_is_documented():
    body = sections()["btkit.hookspecs"]
    hooks = [n for n in vars(hookspecs) if n.startswith("btkit_")]
    assert len(hooks) >= 7
    missing = [h for h in hooks if not documented(h, body)]
    assert not missing, f"hooks missing from {GUIDE}: {missing}"


@pytest.mark.parametrize("module", api_modules())
def test_every_public_name_is_documented(module):
    mod = importlib.import_module(module)
    names = getattr(mod, "__all__", None)
    assert names, f"{module} has no __all__: say what it offers plugins (and document it in {GUIDE.name})"
    body = sections().get(module)
    assert body is not None, f"{GUIDE} has no '### `{module}`' section"
    missing = [n for n in names if not documented(n, body)]
    assert not missing, f"{module}: public names missing from its section of {GUIDE}: {missing}"


def test_a_missing_name_is_caught(tmp_path, monkeypatch):
    """The check can fail: a name the guide does not mention is reported."""
    body = sections()["btkit.kit.text"]
    assert documented("rouge_l", body)
    assert not documented("rouge_l_but_not_documented", body)
