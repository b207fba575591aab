"""Reading input and writing run files without losing anything.

Input JSONL is validated in one streaming pass before any model call, so a bad line 90,000 fails
at once with file, line and field named. Output appends go through a single ``os.write`` per
finished unit, and whole-file outputs are written to a temporary file and renamed, so a reader
never sees a torn file as complete.

Text that is not valid Unicode (bytes that are not UTF-8, or JSON ``\\udXXX`` escapes of lone
surrogates) is an error by default, named by file, line and field: decoding a latin-1 corpus "with
replacement" would quietly put U+FFFD into every accented word. ``errors="replace"`` (the run option
``encoding_errors``) replaces such text with U+FFFD instead and counts the lines it touched.
Nothing btkit writes can fail on such text either: :func:`dumps` falls back to ASCII escapes.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import BtkitError, InputError

_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_path(path: Path) -> None:
    if not path.exists():
        raise InputError(str(path), "file not found")
    if path.is_dir():
        raise InputError(str(path), "is a directory, expected a JSONL file (one JSON object per line)")
    if path.stat().st_size == 0:
        raise InputError(str(path), "file is empty, expected JSONL (one JSON object per line)")


def iter_jsonl(path: str | Path, required: Iterable[str] = (), hint: dict[str, str] | None = None,
               errors: str = "strict", counts: dict[str, int] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line, raising :class:`InputError` on bad input.

    ``required`` fields must be present and non-empty strings; ``hint`` maps a field to the CLI
    option that picks another field name (named in the error). ``errors="replace"`` turns invalid
    UTF-8 and lone surrogates into U+FFFD and counts such lines in ``counts["replaced_lines"]``.
    """
    path = Path(path)
    _check_path(path)
    if errors not in ("strict", "replace"):
        raise BtkitError(f"encoding errors must be 'strict' or 'replace', got '{errors}'")
    hint = hint or {}
    required = tuple(required)
    with path.open("rb") as fh:
        seen_any = False
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Windows editors)
                raw = raw[3:]
            if b"\x00" in raw:
                raise InputError(str(path), "binary data (NUL bytes); expected UTF-8 JSONL text", lineno)
            replaced = False
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if errors == "strict":
                    raise InputError(str(path), f"not valid UTF-8 at byte {e.start + 1} of the line; re-encode the file as UTF-8 "
                                     f"(e.g. iconv -f latin1 -t utf-8) or pass --encoding-errors replace",
                                     lineno, _field_with(raw.decode("utf-8", "replace"), "\ufffd")) from None
                line, replaced = raw.decode("utf-8", "replace"), True
            raw = None  # type: ignore[assignment]  # a huge line is held once, as text, while it is parsed
            if not line or line.isspace():
                continue
            obj = _parse_line(path, lineno, line)
            if not isinstance(obj, dict):
                raise InputError(str(path), f"expected a JSON object, got {type(obj).__name__}", lineno)
            if _ESCAPED_SURROGATE.search(line):  # rare: only then look for lone surrogates (pairs are fine)
                try:
                    bad = _lone_surrogate_field(obj)
                    if bad is not None:
                        if errors == "strict":
                            raise InputError(str(path), "holds a lone UTF-16 surrogate escape (\\udXXX without its pair), not valid "
                                             "Unicode; fix the producer or pass --encoding-errors replace", lineno, bad)
                        obj, replaced = _replace_surrogates(obj), True
                except RecursionError:  # parsed just below the limit, but one level too deep to walk again
                    raise _too_deep(path, lineno, line) from None
            if replaced and counts is not None:
                counts["replaced_lines"] = counts.get("replaced_lines", 0) + 1
            for name in required:
                value = obj.get(name)
                if name not in obj:
                    extra = f" (use {hint[name]} to pick the field that holds it)" if name in hint else ""
                    raise InputError(str(path), f"missing{extra}; fields present: {', '.join(sorted(obj)) or 'none'}", lineno, name)
                if not isinstance(value, str):
                    raise InputError(str(path), f"must be a string, got {type(value).__name__}", lineno, name)
            seen_any = True
            raw = line = None  # type: ignore[assignment]  # hold one copy of a huge line while it is used, not three
            yield lineno, obj
        if not seen_any:
            raise InputError(str(path), "no records: the file holds only blank lines")


def _parse_line(path: Path, lineno: int, line: str) -> Any:
    """``json.loads(line)``; JSON this Python cannot read raises :class:`InputError` naming the field.

    Besides malformed JSON, that is nesting deeper than the interpreter's recursion limit
    (``RecursionError``) and integers of more digits than ``sys.get_int_max_str_digits()``
    (4,300 by default; ``ValueError``): valid JSON, but no record of a corpus needs them.
    """
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(str(path), f"not valid JSON ({e.msg} at column {e.colno})", lineno) from None
    except RecursionError:
        raise _too_deep(path, lineno, line) from None
    except ValueError as e:  # an integer longer than Python converts from text
        digits, field = _longest_integer(line)
        if not digits:
            raise InputError(str(path), f"not readable as JSON ({e})", lineno) from None
        raise InputError(str(path), f"holds an integer of {digits} digits, more than the {sys.get_int_max_str_digits()} "
                         f"Python reads as a number; write it as a string", lineno, field) from None


def _too_deep(path: Path, lineno: int, line: str) -> InputError:
    depth, field = _deepest_field(line)
    return InputError(str(path), f"JSON nested {depth} levels deep, too deep to read (Python's recursion limit is "
                      f"{sys.getrecursionlimit()}); flatten it or leave it out of the corpus", lineno, field)


#: JSON tokens, for locating a problem in a line ``json.loads`` refused: strings, punctuation, other literals.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]:,]|[^\s"{}\[\]:,]+')
_INTEGER = re.compile(r"-?[0-9]+")


def _scan_fields(line: str) -> Iterator[tuple[str | None, int, str]]:
    """``(top-level key, depth, token)`` for each token of ``line``, the key being the field it lies in."""
    depth, key, last_string = 0, None, None
    for match in _JSON_TOKEN.finditer(line):
        token = match.group()
        first = token[0]
        if first in "{[":
            depth += 1
        elif first in "}]":
            depth -= 1
        elif first == ":" and depth == 1 and last_string is not None:
            try:
                key = json.loads(last_string)
            except ValueError:
                key = last_string
        elif first == '"' and depth == 1:
            last_string = token
        yield key, depth, token


def _deepest_field(line: str) -> tuple[int, str | None]:
    """How deep ``line`` nests, and the top-level field where it does."""
    deepest, field = 0, None
    for key, depth, _ in _scan_fields(line):
        if depth > deepest:
            deepest, field = depth, key
    return deepest, field


def _longest_integer(line: str) -> tuple[int, str | None]:
    """The most digits of an integer literal in ``line`` (0 if none), and the top-level field holding it."""
    longest, field = 0, None
    for key, _, token in _scan_fields(line):
        if token[0] in "-0123456789" and _INTEGER.fullmatch(token):
            digits = len(token) - token.startswith("-")
            if digits > longest:
                longest, field = digits, key
    return longest, field


def _field_with(line: str, needle: str) -> str | None:
    """The top-level field whose value holds ``needle`` (to name it in an error), if the line parses."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if isinstance(obj, dict):
        for key, value in obj.items():
            if needle in json.dumps(value, ensure_ascii=False) or needle in key:
                return key
    return None


def _lone_surrogate_field(obj: dict[str, Any]) -> str | None:
    for key, value in obj.items():
        try:
            json.dumps([key, value], ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return key
    return None


def _replace_surrogates(value: Any) -> Any:
    """``value`` with every lone surrogate in its strings and keys replaced by U+FFFD.

    A round trip through JSON text, not a Python recursion: it reaches as deep as the parser did
    (a recursive walk takes two frames a level and overflowed at half the depth a line may have).
    """
    return json.loads(_LONE_SURROGATE.sub("\ufffd", json.dumps(value, ensure_ascii=False)))


def scrub_text(text: str | None) -> str | None:
    """Replace lone surrogates (not encodable as UTF-8) with U+FFFD; other text is returned as is."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text)


def validate_jsonl(path: str | Path, required: Iterable[str] = (), hint: dict[str, str] | None = None,
                   errors: str = "strict", counts: dict[str, int] | None = None) -> int:
    """Stream through the whole file once; return the record count or raise on the first bad line."""
    return sum(1 for _ in iter_jsonl(path, required, hint, errors, counts))


def dumps(obj: Any) -> str:
    """Compact JSON that any reader accepts: always encodable as UTF-8 (lone surrogates fall back to
    ``\\u`` escapes), and never ``NaN``/``Infinity`` (not JSON; written as null)."""
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        obj = _finite(obj)
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


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


def read_journal(path: str | Path, group: str | None = None, group_size: str | None = None) -> Iterator[dict[str, Any]]:
    """Read an append-only JSONL journal, cutting what a kill mid-write left at its end.

    A torn last line (no newline) is cut. With ``group``/``group_size`` (line keys naming a group
    and how many lines it has), a last group with fewer lines than announced is cut too, since one
    ``os.write`` of several lines can be cut short by a kill. A bad line *before* the end is not a
    torn write but damage: that raises, so nothing after it is silently thrown away.
    """
    path = Path(path)
    if not path.exists():
        return
    size = path.stat().st_size
    good_end = 0  # end of the last complete line
    group_start = 0  # byte offset where the current group began
    pending: list[dict[str, Any]] = []  # lines of the current group, held back until it is complete
    with path.open("rb") as fh:
        lineno = 0
        for raw in fh:
            lineno += 1
            if not raw.endswith(b"\n"):
                break
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                if good_end + len(raw) < size:
                    raise BtkitError(f"{path}:{lineno}: damaged journal line (not JSON) before the end of the file; "
                                     f"move the run directory aside or fix that line by hand") from None
                break
            good_end += len(raw)
            if group is None or group_size is None or group_size not in obj:
                if pending:  # a group marker vanished mid-group: treat what we have as complete
                    yield from pending
                    pending = []
                group_start = good_end
                yield obj
                continue
            if pending and pending[0].get(group) != obj.get(group):
                raise BtkitError(f"{path}:{lineno}: journal group '{pending[0].get(group)}' has {len(pending)} of "
                                 f"{pending[0][group_size]} lines before the next group starts")
            pending.append(obj)
            if len(pending) >= int(obj[group_size]):
                yield from pending
                pending = []
                group_start = good_end
    cut = group_start if pending else good_end
    if cut < size:
        with path.open("r+b") as fh:
            fh.truncate(cut)


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
