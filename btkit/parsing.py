"""Getting structured fields out of model replies, for any method: parse or refuse, never guess.

Models wrap JSON in code fences, put prose around it, emit two objects, quote numbers, or stop in
the middle. :func:`extract_json` finds the JSON object(s) in a reply and checks them against the
keys a stage expects; every failure is a :class:`~btkit.methods.ParseError` with a short stable
reason (counted in ``stats.json``) and the detail kept in lineage:

- ``empty_reply``: nothing, or only whitespace
- ``no_json``: no JSON object anywhere in the reply
- ``incomplete_json``: an object starts but never closes (usually a reply cut at max tokens)
- ``missing_key`` / ``wrong_type``: an object, but not the fields asked for
- ``ambiguous_json``: two different objects that both fit

Repairs are limited to what cannot change meaning: a byte-order mark or code fence around the
object, and numbers written as strings (``"4"`` for an int field). No trailing-comma or
single-quote "fixing", no picking one of two answers.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Iterable, Mapping

from .methods import ParseError

#: Stop looking after this many failed attempts at decoding from a ``{`` (bounds the work on a
#: long reply full of braces, e.g. code).
MAX_ATTEMPTS = 200
_INT_STRING = re.compile(r"^\s*[+-]?\d+\s*$")
_FLOAT_STRING = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$")
_TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "object"}


def json_objects(text: str) -> tuple[list[dict[str, Any]], bool]:
    """Every top-level JSON object in ``text`` (objects inside objects are part of their parent),
    and whether an object started that never closed."""
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    unclosed = False
    i, attempts = text.find("{"), 0
    while i != -1 and attempts < MAX_ATTEMPTS:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            attempts += 1
            if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string"):
                unclosed = True
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            found.append(obj)
        i = text.find("{", end)
    return found, unclosed


def _check_type(name: str, value: Any, expected: Any) -> Any:
    """The value, converted where the conversion is exact ("4" -> 4), or ParseError('wrong_type')."""
    types = expected if isinstance(expected, tuple) else (expected,)
    if any(t is Any or t is object for t in types):
        return value
    for t in types:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if t not in (int, float) and isinstance(value, t):
            return value
    for t in types:
        if t is int and isinstance(value, str) and _INT_STRING.match(value):
            return int(value)
        if t is float and isinstance(value, str) and _FLOAT_STRING.match(value):
            return float(value)
    want = " or ".join(_TYPE_NAMES.get(t, getattr(t, "__name__", str(t))) for t in types)
    raise ParseError("wrong_type", f"'{name}' should be {want}, got {type(value).__name__} {json.dumps(value, ensure_ascii=False)[:60]}")


def _conform(obj: dict[str, Any], keys: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ParseError("missing_key", f"missing {', '.join(missing)}; has {', '.join(sorted(obj)) or 'no keys'}")
    out = dict(obj)
    for k, t in keys.items():
        out[k] = _check_type(k, obj[k], t)
    return out


def extract_json(text: str | None, keys: Mapping[str, Any] | Iterable[str] = (), *,
                 prefer: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """The one JSON object in a model reply that has ``keys``, or :class:`ParseError`.

    ``keys`` is a list of required names, or a mapping name -> type (``str``, ``int``, ``float``,
    ``bool``, ``list``, ``dict``, a tuple of those, or ``Any``). Objects lacking the keys are
    ignored when another one has them (models like to echo an example first); if none fits, the
    error describes the closest one. ``prefer`` (object -> bool) sets objects aside the same way
    where no key is required of all of them: when some objects satisfy it, only those count
    (e.g. "has at least one key I know"); when none does, all do.
    """
    if text is None or not text.strip():
        raise ParseError("empty_reply")
    keys = dict(keys) if isinstance(keys, Mapping) else {k: Any for k in keys}
    text = text.lstrip("\ufeff")
    objects, unclosed = json_objects(text)
    if not objects:
        if unclosed:
            raise ParseError("incomplete_json", "an object starts but never closes (truncated reply?)")
        raise ParseError("no_json", "no JSON object in the reply")
    if prefer is not None:
        objects = [o for o in objects if prefer(o)] or objects
    fitting, errors = [], []
    for obj in objects:
        try:
            fitting.append(_conform(obj, keys))
        except ParseError as e:
            errors.append(e)
    if not fitting:
        # the most informative failure: a type error beats a missing key (the object was closer)
        raise next((e for e in errors if e.reason == "wrong_type"), errors[0])
    distinct = {json.dumps({k: o[k] for k in keys} if keys else o, sort_keys=True) for o in fitting}
    if len(distinct) > 1:
        raise ParseError("ambiguous_json", f"{len(distinct)} different objects with {', '.join(keys) or 'content'}")
    return fitting[0]


__all__ = ["json_objects", "extract_json"]
