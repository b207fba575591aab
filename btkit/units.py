"""The work units of a run: the input read into units by the first method, and checked before any call.

A run's units are a deterministic stream (the method's extra records, then ``prepare``'s units),
so a resumed run finds its place by position. :meth:`UnitSource.survey` reads the stream once
before any model call: it validates the input (file, line and field of the first bad line),
refuses two units with one id, counts the units, and checks every unit a journal holds against
the input, so a resumed run never mixes two inputs. :meth:`UnitSource.as_surveyed` then yields the
same units again for the run itself and stops the run if the input changed in between.

A shard of a sharded run (``RunConfig.shard``) reads the same stream and keeps the units that
:func:`btkit.shards.shard_of` assigns to it, each with its position in the whole stream: every
shard prepares the whole input the same way (segments, de-duplication, ids checked over the whole
corpus), so the shards' journals merge by position into exactly the journal one process writes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

from . import journal
from .config import RunConfig
from .dedup import SeenSet
from .errors import BtkitError, InputError
from .io import iter_jsonl, validate_jsonl
from .methods import Method
from .options import INPUT_DEFAULTS
from .records import ExtraUnit, Record
from .shards import shard_of


class UnitSource:
    """The units of ``config``'s input as its first stage's method makes them."""

    def __init__(self, config: RunConfig, method: Method):
        self.config = config
        self.method = method
        #: What the first stage sees: the run-wide options under the stage's own, over the defaults.
        given = {k: v for k, v in {**config.options, **config.stages[0].options}.items() if v is not None}
        self.options = {**INPUT_DEFAULTS, **method.option_defaults(), **given}
        self.encoding_errors = str(self.options["encoding_errors"])
        self.required = method_required_fields(method, self.options)
        #: Input counts kept while reading (``replaced_lines`` under ``--encoding-errors replace``).
        self.counts: dict[str, int] = {}
        self.rows_read = self.survey_rows = 0
        self._input_before: tuple[int, int] | None = None
        #: ``(shard, shards)``: only the units of that shard (see the module docstring); None: all.
        self.shard = config.shard

    def mine(self, unit: Record) -> bool:
        """Whether this run processes ``unit`` (always, unless it is one shard of a sharded run)."""
        return self.shard is None or shard_of(unit, self.shard[1]) == self.shard[0]

    def units(self, counts: dict[str, int] | None = None, max_rows: int | None = None) -> Iterator[Record]:
        """The run's work units, in a deterministic order: the method's extra records, then ``prepare``'s units."""
        extra = list(self.method.extra_records(self.options))
        if extra:
            yield ExtraUnit(extra)
        yield from self.method.prepare(self._rows(counts, max_rows), self.options)

    def _rows(self, counts: dict[str, int] | None, max_rows: int | None) -> Iterator[dict[str, Any]]:
        """Input rows, at most ``--limit`` (or ``max_rows``: what the survey saw); sets ``rows_read``."""
        limit = self.config.limit if max_rows is None else max_rows
        self.rows_read = 0
        if limit == 0:
            return
        for _, row in iter_jsonl(self.config.input, self.required, self.required, self.encoding_errors, counts):
            self.rows_read += 1
            yield row
            if limit is not None and self.rows_read >= limit:
                return

    def validate(self) -> None:
        """The input's rows alone (no units), for a run whose journal can only be read under its lock."""
        validate_jsonl(self.config.input, self.required, self.required, self.encoding_errors)

    def survey(self, journal_path: Path, found: journal.JournalScan) -> int:
        """One pass over the units before any model call (see the module docstring); returns how many
        this run processes (a shard's own units; ids are checked over every unit)."""
        finished = journal.unit_headers(journal.iter_sorted(journal_path, found, skip=found.failed.__contains__))
        expected = next(finished, None)
        self.counts.clear()
        before = input_state(self.config.input)
        count = 0
        out = journal_path.parent
        with SeenSet() as ids:
            for seq, unit in enumerate(self.units(counts=self.counts)):
                if not isinstance(unit, ExtraUnit) and not ids.add(unit.id):
                    raise self._duplicate_id_error(unit)
                if not self.mine(unit):
                    continue
                count += 1
                if expected is not None and expected[0] == seq:
                    if expected[1] != unit_digest(unit):
                        raise BtkitError(
                            f"{self.config.input} changed since {out} was started: unit {seq + 1} ('{unit.id}') is not "
                            f"the one in the journal; pass --overwrite to start over (old files are moved aside) or use another -o"
                        )
                    expected = next(finished, None)
        if expected is not None:
            limit = f" with --limit {self.config.limit}" if self.config.limit is not None else ""
            raise BtkitError(
                f"{out} holds finished units beyond the {count} the input yields now{limit}; "
                f"raise --limit (or restore the input), pass --overwrite to start over, or use another -o"
            )
        if input_state(self.config.input) != before:
            raise BtkitError(f"{self.config.input} changed while btkit read it; run again once nothing writes to it")
        self.survey_rows, self._input_before = self.rows_read, before
        return count

    def as_surveyed(self) -> Iterator[tuple[int, Record]]:
        """``(position, unit)`` again for the units the run processes: no more rows than the survey saw,
        and an input that changed since (cut short, appended to, rewritten) stops the run instead of
        mixing inputs. The position is the unit's place in the whole stream (a shard's have gaps)."""
        cfg = self.config
        try:
            for seq, unit in enumerate(self.units(max_rows=self.survey_rows)):
                if self.mine(unit):
                    yield seq, unit
        except InputError as e:  # it was valid when surveyed: it changed
            raise BtkitError(f"{cfg.input} changed while the run read it ({e}); finished units are kept: "
                             f"re-run the same command to resume") from None
        if self.rows_read != self.survey_rows or input_state(cfg.input) != self._input_before:
            raise BtkitError(f"{cfg.input} changed while the run read it ({self.survey_rows} lines when it started, "
                             f"{self.rows_read} read now); finished units are kept: re-run the same command to resume")

    def _duplicate_id_error(self, unit: Record) -> BtkitError:
        """Name the input lines that share a unit's id (one line; see :meth:`survey`)."""
        id_field = str(self.options["id_field"])
        lines = [n for n, row in iter_jsonl(self.config.input, (), None, self.encoding_errors)
                 if str(row.get(id_field)) == unit.source_id][:2]
        if len(lines) == 2:
            return InputError(str(self.config.input), f"duplicate id '{unit.source_id}' (first on line {lines[0]}); ids must be "
                              f"unique within a run: make them unique, or pick another field with --id-field", lines[1], id_field)
        return BtkitError(f"{self.config.input}: two units of this run would share the id '{unit.id}'; "
                          f"make the input's '{id_field}' values unique (an id may not look like another line's generated id)")


def method_required_fields(method: Method, options: dict[str, Any]) -> dict[str, str]:
    """Input fields the first method needs, mapped to the CLI option that renames each."""
    fn = getattr(method, "required_fields", None)
    if fn:
        return fn(options)
    return {options.get("text_field") or INPUT_DEFAULTS["text_field"]: "--text-field"}


def unit_digest(unit: Record) -> str:
    """What a finished unit is checked against on resume: its id and its input fields, hashed."""
    blob = json.dumps({"id": unit.id, "fields": unit.fields}, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.blake2b(blob.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def input_state(path: Path) -> tuple[int, int] | None:
    """What tells an input file changed while it was read: its size and modification time (None: missing)."""
    try:
        st = Path(path).stat()
    except OSError:
        return None  # reading it names the problem
    return st.st_size, st.st_mtime_ns
