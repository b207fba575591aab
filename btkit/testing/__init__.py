"""Testing support for btkit and for plugin authors, shipped with btkit the way pytest ships ``pytester``.

- :mod:`btkit.testing.backends`: test doubles (``echo:``, ``scripted:``, ``det:``). They are not
  production backends: a normal ``btkit`` lists none of them. A process loads them with
  ``BTKIT_EXTRA_PLUGINS=btkit.testing.backends``; a test registers a :class:`~btkit.testing.backends.Doubles`
  on its registry.
- :mod:`btkit.testing.pytest_plugin`: fixtures (``registry``, ``doubles``, ``scripted``, ``cli``,
  ``isolated_cache``). Opt in from a ``conftest.py`` with
  ``pytest_plugins = ["btkit.testing.pytest_plugin"]``.
- :func:`write_jsonl` and :func:`read_jsonl`: corpora in, run outputs out.

Importing this package imports neither pytest nor any backend.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

__all__ = ["read_jsonl", "write_jsonl"]


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write ``rows`` as JSON lines (a corpus, a seed file) and return the path."""
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (``data.jsonl``, ``candidates.jsonl``), blank lines skipped."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
