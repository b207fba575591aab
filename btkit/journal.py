"""The run journal (``candidates.jsonl``) as a sequence of sorted runs of finished units.

A first run writes its units in input order (the engine's reorder buffer), so its journal is one
run sorted by ``unit_seq``. A resumed run that redoes failed units appends them after the rest:
the journal is then a few sorted runs (one per invocation), each unit whole in exactly one of
them. :func:`scan` finds the runs and the failed units in one pass; :func:`iter_sorted` reads the
journal in input order by merging the runs (constant memory: one open reader per run), and
:func:`rewrite` replaces it atomically (the engine sorts it this way before publishing, so the
published ``candidates.jsonl`` and ``data.jsonl`` are in input order whatever happened).
"""

from __future__ import annotations

import heapq
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .io import AppendFile, read_journal

#: Drop reasons that mean "the call or the code failed", not "the record was judged": a resumed
#: run redoes units that hold one (their successful calls come back from the cache).
FAILURE_REASONS = frozenset({"backend_error", "stage_error"})


@dataclass
class JournalScan:
    """What a resumed run needs to know about its journal, from one pass."""

    units: int = 0
    #: Byte ranges ``(start, end)`` of the sorted runs, in file order.
    runs: list[tuple[int, int]] = field(default_factory=list)
    #: ``unit_seq`` of every unit that holds a failed record.
    failed: set[int] = field(default_factory=set)
    #: The highest ``unit_seq`` present (-1: none).
    last_seq: int = -1

    @property
    def sorted(self) -> bool:
        return len(self.runs) <= 1

    @property
    def gapless(self) -> bool:
        """Sorted and holding units 0..N-1: new units appended after it keep it sorted."""
        return self.sorted and self.last_seq + 1 == self.units


def _lines(path: Path, start: int = 0, end: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(offset after the line, line)`` for complete lines between two byte offsets (a clean journal)."""
    with path.open("rb") as fh:
        fh.seek(start)
        offset = start
        for raw in fh:
            if end is not None and offset >= end:
                return
            offset += len(raw)
            yield offset, json.loads(raw)


def scan(path: str | Path) -> JournalScan:
    """Cut a torn tail (see :func:`btkit.io.read_journal`), then find the sorted runs and failed units."""
    path = Path(path)
    result = JournalScan()
    if not path.exists():
        return result
    for _ in read_journal(path, "unit_seq", "unit_records"):  # cuts what a kill left, stops on damage
        pass
    run_start, previous, current = 0, None, None
    offset = 0
    for end, line in _lines(path):
        seq = int(line.get("unit_seq", -1))
        if seq != current:
            if previous is not None and seq < previous:  # a new sorted run begins with this unit
                result.runs.append((run_start, offset))
                run_start = offset
            current = previous = seq
            result.units += 1
            result.last_seq = max(result.last_seq, seq)
        if line.get("status") == "dropped" and line.get("reason") in FAILURE_REASONS:
            result.failed.add(seq)
        offset = end
    if offset > run_start:
        result.runs.append((run_start, offset))
    return result


def iter_sorted(path: str | Path, journal: JournalScan, skip: Callable[[int], bool] | None = None) -> Iterator[dict[str, Any]]:
    """The journal's lines in ``unit_seq`` order (lines of one unit stay together), minus skipped units."""
    path = Path(path)
    if not journal.runs:
        return
    streams = [(line for _, line in _lines(path, s, e)) for s, e in journal.runs]
    for line in merge(*streams):
        if skip is None or not skip(int(line.get("unit_seq", -1))):
            yield line


def merge(*streams: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Merge line streams each sorted by ``unit_seq`` (each unit whole in one of them) into one sorted stream."""
    if len(streams) == 1:
        return iter(streams[0])
    return heapq.merge(*streams, key=lambda line: int(line.get("unit_seq", -1)))


def rewrite(path: str | Path, lines: Iterable[dict[str, Any]], batch: int = 512) -> None:
    """Replace the journal with ``lines`` (written to a temporary file, then renamed)."""
    path = Path(path)
    tmp = path.with_name(".candidates.rewrite")
    tmp.unlink(missing_ok=True)
    out = AppendFile(tmp)
    try:
        chunk: list[dict[str, Any]] = []
        for line in lines:
            chunk.append(line)
            if len(chunk) >= batch:
                out.write_lines(chunk)
                chunk = []
        out.write_lines(chunk)
        out.sync()
    finally:
        out.close()
    os.replace(tmp, path)


def units_of(lines: Iterable[dict[str, Any]]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Lines in journal order grouped by unit: ``(unit_seq, the unit's lines)``."""
    seq, group = None, []
    for line in lines:
        s = int(line.get("unit_seq", -1))
        if group and s != seq:
            yield seq, group
            group = []
        seq = s
        group.append(line)
    if group:
        yield seq, group


def unit_headers(lines: Iterable[dict[str, Any]]) -> Iterator[tuple[int, str]]:
    """``(unit_seq, unit_hash)`` once per unit, from lines in journal order."""
    for seq, group in units_of(lines):
        yield seq, str(group[0].get("unit_hash", ""))
