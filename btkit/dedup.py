"""Exact de-duplication in bounded memory, for methods that drop repeated segments or pairs.

A corpus of millions of segments would hold millions of fingerprints in a Python set (about 100
bytes each). :class:`SeenSet` keeps the first ``memory_items`` in a set and the rest in a private
temporary SQLite database (``sqlite3.connect("")``: on disk, deleted when closed), so membership
stays exact while memory stays flat. It lives for one pass over the input: a resumed run rebuilds
it from the start of the input, as it rebuilds everything else, so nothing about it is persisted.
"""

from __future__ import annotations

import sqlite3


class SeenSet:
    """``add(key)`` is True the first time ``key`` is added, False after; exact, bounded memory."""

    def __init__(self, memory_items: int = 100_000):
        self.memory_items = memory_items
        self._memory: set[str] = set()
        self._db: sqlite3.Connection | None = None
        self.spilled = 0  # keys kept on disk

    def add(self, key: str) -> bool:
        if key in self._memory:
            return False
        if len(self._memory) < self.memory_items:
            self._memory.add(key)
            return True
        if self._db is None:
            self._db = sqlite3.connect("")  # a temporary database on disk, private to this connection
            self._db.execute("CREATE TABLE seen (key TEXT PRIMARY KEY) WITHOUT ROWID")
        added = self._db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (key,)).rowcount == 1
        self.spilled += added
        return added

    def __contains__(self, key: str) -> bool:
        if key in self._memory:
            return True
        return self._db is not None and self._db.execute("SELECT 1 FROM seen WHERE key = ?", (key,)).fetchone() is not None

    def __len__(self) -> int:
        return len(self._memory) + self.spilled

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> "SeenSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
