"""Content-addressed store of raw model outputs (SQLite in WAL mode).

The key is a hash of everything that determines a model's output: the backend identity (spec,
base URL, model), the call kind, the rendered messages, the sampling parameters and any schema or
grammar (they travel in the parameters). Never in the key: API keys, concurrency, retry settings,
timeouts; :func:`cache_key` drops such names even if a backend's ``identity()`` lists them. Only raw
outputs are stored, never parsed results, so changing a parser, a filter or a threshold re-runs
with zero model calls, while changing a template or a sampling parameter re-calls exactly the
affected requests.

What is stored, decided:
- A failed call (backend error) and an empty reply (no text) are never stored; a re-run asks again.
- A reply with text that is unusable as it stands (cut at max tokens, content filtered, or rejected
  by a parser) IS stored, as the raw reply with its ``finish_reason``, never as a parsed success:
  the parse runs again on every use and fails again, counted each time. Storing it is what lets a
  fixed parser or a new threshold re-run for free (the tokens were paid for), and re-asking the
  identical request would mostly buy the same reply. Getting a *different* reply is the job of the parse-retry policy
  (``StageCtx.complete(parse=..., retries=K)``), which re-samples with another seed: another key.

One file serves a whole process: a single connection behind a lock, so threads and asyncio tasks
may share a :class:`Cache`; separate processes (or separate ``Cache`` objects) on the same file
are serialised by SQLite's WAL locking. Each ``put`` is its own committed transaction, so a
``kill -9`` loses at most the call in flight. The first writer of a key wins: a second process
that asked the same request at the same time gets the stored reply back from ``put`` and uses
it, so every run that reads the cache sees one answer per request.

The cache is a saving, never a place where paid work can be lost: a cache file that cannot be
opened stops the run before any call with one line naming it, and a read or write that fails
mid-run (disk full, damaged pages) is counted and warned about once, while the reply the backend
returned is used as if the cache were not there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .errors import BtkitError

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    backend TEXT NOT NULL,
    value TEXT NOT NULL,
    created REAL NOT NULL
)
"""


#: How long a process waits for others that are opening the same new cache file at once.
OPEN_WAIT_S = 30.0


def default_cache_path() -> Path:
    base = os.environ.get("BTKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "btkit"
    )
    return Path(base) / "cache.sqlite"


#: Settings that never change what a model answers, so never part of a key (secrets least of all).
NOT_IN_KEY = re.compile(
    r"^(api_?key|.*secret.*|.*password.*|.*access_?token|auth.*|headers|.*timeout.*|.*retries|retry.*|.*backoff.*|"
    r"concurrency|max_concurrency|batch_size|n_threads)$",
    re.IGNORECASE,
)


def _content_only(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: v for k, v in d.items() if not NOT_IN_KEY.match(str(k))}
    return d


def cache_key(kind: str, backend: dict[str, Any], payload: dict[str, Any]) -> str:
    """sha256 of the call kind, the backend identity and the request, minus :data:`NOT_IN_KEY` names."""
    payload = dict(payload)
    if isinstance(payload.get("params"), dict):
        payload["params"] = _content_only(payload["params"])
    blob = json.dumps({"kind": kind, "backend": _content_only(backend), "payload": payload},
                      sort_keys=True, ensure_ascii=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class Cache:
    """A thread-safe SQLite cache; one connection guarded by a lock (calls come from one process)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_cache_path()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        #: Reads and writes that failed mid-run (disk full, damaged file): counted, warned about once.
        self.errors = 0
        self._warned = False
        deadline = time.monotonic() + OPEN_WAIT_S
        while True:
            try:
                self._db = self._open()
                break
            except sqlite3.OperationalError as e:
                # several processes opening one new file at once (the shards of a run): switching it to WAL
                # takes an exclusive lock that SQLite does not wait for; the others wait a moment and retry
                if "locked" in str(e) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise BtkitError(f"cache {self.path}: cannot be used ({_why(e)}); move it aside, or pass --cache OTHER_FILE or --no-cache") from None
            except (sqlite3.Error, OSError) as e:
                raise BtkitError(
                    f"cache {self.path}: cannot be used ({_why(e)}); move it aside, or pass --cache OTHER_FILE or --no-cache"
                ) from None

    def _open(self) -> sqlite3.Connection:
        """Connect, in WAL mode, with the table; a connection that fails half-way is closed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30, isolation_level=None)
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":  # persistent: set once per file
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(SCHEMA)
            db.execute("SELECT COUNT(*) FROM (SELECT key FROM entries LIMIT 1)").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    def _failed(self, action: str, e: Exception) -> None:
        self.errors += 1
        if not self._warned:
            self._warned = True
            print(f"warning: cache {self.path}: {action} failed ({_why(e)}); the run goes on without it for such calls "
                  f"(replies are still used; failures counted in stats.json as cache_errors)", file=sys.stderr)

    def get(self, key: str) -> Any | None:
        try:
            with self._lock:
                row = self._db.execute("SELECT value FROM entries WHERE key=?", (key,)).fetchone()
            value = None if row is None else json.loads(row[0])
        except (sqlite3.Error, ValueError) as e:
            self._failed("a read", e)
            value = None
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, key: str, kind: str, backend: str, value: Any) -> Any:
        """Store ``value`` unless the key is already there; return the stored value (the first writer's).

        A failed write is counted and ``value`` is returned: the caller keeps its reply either way.
        """
        blob = json.dumps(value, ensure_ascii=False)
        try:
            blob.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: store them escaped, losslessly
            blob = json.dumps(value, ensure_ascii=True)
        try:
            with self._lock:
                inserted = self._db.execute(
                    "INSERT OR IGNORE INTO entries(key, kind, backend, value, created) VALUES (?,?,?,?,?)",
                    (key, kind, backend, blob, time.time()),
                ).rowcount
                if inserted:
                    return value
                row = self._db.execute("SELECT value FROM entries WHERE key=?", (key,)).fetchone()
            return value if row is None else json.loads(row[0])
        except (sqlite3.Error, ValueError) as e:
            self._failed("a write", e)
            return value

    def stats(self) -> dict[str, Any]:
        with self._lock:
            rows = self._db.execute("SELECT kind, backend, COUNT(*), SUM(LENGTH(value)) FROM entries GROUP BY kind, backend").fetchall()
        size = sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file())
        return {
            "path": str(self.path),
            "entries": sum(r[2] for r in rows),
            "bytes_on_disk": size,
            "by_backend": [{"kind": r[0], "backend": r[1], "entries": r[2], "bytes": r[3] or 0} for r in rows],
        }

    def clear(self) -> int:
        with self._lock:
            n = self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
            self._db.execute("DELETE FROM entries")
            self._db.execute("VACUUM")
        return n

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                pass


def _why(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if "not a database" in text or "malformed" in text:
        return f"{text}: the file is damaged or not a btkit cache"
    return text


class NullCache:
    """Used with ``--no-cache``: stores nothing."""

    hits = 0
    misses = 0
    errors = 0
    path = None

    def get(self, key: str) -> Any | None:
        self.misses += 1
        return None

    def put(self, key: str, kind: str, backend: str, value: Any) -> Any:
        return value

    def close(self) -> None:
        pass
