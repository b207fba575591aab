"""The record that flows through a run, with its lineage."""

from __future__ import annotations

import copy
import traceback
from dataclasses import dataclass, field
from typing import Any

from .errors import BackendError


@dataclass
class Record:
    """One unit of work: a segment, then an (instruction, response) pair as stages fill it in.

    ``fields`` holds the data (text, instruction, response, score...); ``lineage`` holds one entry
    per stage step (model spec, template name and hash, raw completion, parsed fields), so every
    output line can be traced back to its source and the exact prompts that made it.
    """

    id: str
    source_id: str
    fields: dict[str, Any]
    lineage: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    dropped_at: str | None = None
    reason: str | None = None

    @property
    def alive(self) -> bool:
        return self.reason is None

    def drop(self, stage: str, reason: str, **details: Any) -> "Record":
        """Mark the record dropped; ``reason`` is a short stable key counted in stats."""
        self.dropped_at = stage
        self.reason = reason
        if details:
            self.meta.setdefault("drop_details", {}).update(details)
        return self

    def child(self, suffix: str, **fields: Any) -> "Record":
        """A new record derived from this one (e.g. the n-th candidate of a segment)."""
        return Record(
            id=f"{self.id}{suffix}",
            source_id=self.source_id,
            fields={**copy.deepcopy(self.fields), **fields},
            lineage=copy.deepcopy(self.lineage),
            meta=copy.deepcopy(self.meta),
        )

    def to_candidate(self) -> dict[str, Any]:
        """The line written to candidates.jsonl: every record, kept or dropped, with its reason."""
        return {
            "id": self.id,
            "source_id": self.source_id,
            "status": "kept" if self.alive else "dropped",
            "dropped_at": self.dropped_at,
            "reason": self.reason,
            "fields": self.fields,
            "meta": self.meta,
            "lineage": self.lineage,
        }

    @classmethod
    def from_candidate(cls, line: dict[str, Any]) -> "Record":
        return cls(
            id=line["id"],
            source_id=line["source_id"],
            fields=line.get("fields", {}),
            lineage=line.get("lineage", []),
            meta=line.get("meta", {}),
            dropped_at=line.get("dropped_at"),
            reason=line.get("reason"),
        )


class ExtraUnit(Record):
    """The unit that carries a method's extra records (e.g. seed pairs) past every stage.

    Told apart by its type, never by its id, so no input id can be mistaken for it.
    """

    def __init__(self, records: list[Record]):
        super().__init__(id="extra", source_id="extra", fields={})
        self.records = records


def journal_key(line: dict[str, Any]) -> str:
    """The key that names one journal record for end-of-run decisions: its unit's position and its id.

    Ids come from the user's input; the unit position makes the key unique even where two units'
    records could share an id (a seed pair and a document both called ``seed``, say).
    """
    return f"{line.get('unit_seq')}/{line['id']}"


def failed_record(record: Record, stage_label: str, error: Exception) -> Record:
    """``record`` dropped for a failed call (``backend_error``, with the raw reply) or a stage bug
    (``stage_error``, with a short traceback): how every failure is recorded, by the engine or by a
    stage that keeps going after one of several calls failed."""
    if isinstance(error, BackendError):
        return record.drop(stage_label, "backend_error", error=str(error), raw=error.raw)
    tb = "".join(traceback.format_exception(type(error), error, error.__traceback__, limit=5))
    return record.drop(stage_label, "stage_error", error=f"{type(error).__name__}: {error}", traceback=tb)


__all__ = ["Record", "ExtraUnit", "journal_key", "failed_record"]
