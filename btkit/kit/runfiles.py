"""Reading a run directory's JSONL files from a plugin (a report, a ``btkit_run_end`` hook, a loop)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

__all__ = ["iter_jsonl"]


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSONL file (``candidates.jsonl``, ``data.jsonl``, ``failures.jsonl``),
    lazily, in constant memory; a missing file is empty, and a torn last line (a run killed
    mid-write) or any line that is not a JSON object is skipped."""
    path = Path(path)
    if not path.exists():
        return
    with path.open("rb") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict):
                yield line
