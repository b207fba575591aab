"""Reading input and writing run files without losing anything.

Input JSONL is validated in one streaming pass before any model call, so a bad line 90,000 fails
at once with file, line and field named. Output appends go through a single ``os.write`` per
finished unit, and whole-file outputs are written to a temporary file and renamed, so a reader
never sees a torn file as complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import InputError


def _check_path(path: Path) -> None:
    if not path.exists():
        raise InputError(str(path), "file not found")
    if path.is_dir():
        raise InputError(str(path), "is a directory, expected a JSONL file (one JSON object per line)")
    if path.stat().st_size == 0:
        raise InputError(str(path), "file is empty, expected JSONL (one JSON object per line)")


def iter_jsonl(path: str | Path, required: Iterable[str] = (), hint: dict[str, str] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line, raising :class:`InputError` on bad input.

    ``required`` fields must be present and non-empty strings; ``hint`` maps a field to the CLI
    option that picks another field name (named in the error).
    """
    path = Path(path)
    _check_path(path)
    hint = hint or {}
    with path.open("rb") as fh:
        seen_any = False
        for lineno, raw in enumerate(fh, start=1):
            if b"\x00" in raw:
                raise InputError(str(path), "binary data (NUL bytes); expected UTF-8 JSONL text", lineno)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(str(path), f"not valid UTF-8 at byte {e.start}; re-encode the file as UTF-8", lineno) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(str(path), f"not valid JSON ({e.msg} at column {e.colno})", lineno) from None
            if not isinstance(obj, dict):
                raise InputError(str(path), f"expected a JSON object, got {type(obj).__name__}", lineno)
            for name in required:
                value = obj.get(name)
                if name not in obj:
                    extra = f" (use {hint[name]} to pick the field that holds it)" if name in hint else ""
                    raise InputError(str(path), f"missing{extra}; fields present: {', '.join(sorted(obj)) or 'none'}", lineno, name)
                if not isinstance(value, str):
                    raise InputError(str(path), f"must be a string, got {type(value).__name__}", lineno, name)
            seen_any = True
            yield lineno, obj
        if not seen_any:
            raise InputError(str(path), "no records: the file holds only blank lines")


def validate_jsonl(path: str | Path, required: Iterable[str] = (), hint: dict[str, str] | None = None) -> int:
    """Stream through the whole file once; return the record count or raise on the first bad line."""
    return sum(1 for _ in iter_jsonl(path, required, hint))


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class AppendFile:
    """An append-only JSONL file written one complete group of lines per ``os.write``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write_lines(self, objs: Iterable[Any]) -> None:
        data = "".join(dumps(o) + "\n" for o in objs).encode("utf-8")
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_journal(path: str | Path) -> Iterator[dict[str, Any]]:
    """Read an append-only JSONL journal, cutting a torn last line (left by a kill mid-write)."""
    path = Path(path)
    if not path.exists():
        return
    size = path.stat().st_size
    good_end = 0
    with path.open("rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError:
                break
            good_end += len(raw)
            yield obj
    if good_end < size:
        with path.open("r+b") as fh:
            fh.truncate(good_end)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")
