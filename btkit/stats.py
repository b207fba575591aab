"""``stats.json`` and ``failures.jsonl``: what a run did, counted from its journal alone.

Nothing here keeps counters while the run streams: every figure is read back from
``candidates.jsonl`` (records with their lineage steps), so a resumed or merged run reports the
whole run, and a count can never disagree with the records it counts.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

from . import journal
from .io import AppendFile, read_journal


def journal_stats(journal_path: Path, labels: list[str], failures: AppendFile | None = None) -> dict[str, Any]:
    """The run's counts, derived from the journal alone, so a resumed run reports the whole run.

    Per stage: ``in``/``out`` count the records that reached and left it while the run
    streamed (records dropped while preparing units reach no stage: ``dropped_while_preparing``;
    records dropped by a whole-run decision left every stage and are counted under the
    deciding stage's ``dropped_at_end``); ``calls`` counts every call made, failed ones
    included (``failed_calls``), ``retries`` the extra requests a backend sent for them, and
    ``requests_sent`` what the servers saw (calls not served by the cache, plus retries).
    With ``failures``, the failed records' lines are written there in the same pass.
    """
    per_stage = {l: {"in": 0, "out": 0, "dropped": collections.Counter(), "dropped_at_end": collections.Counter(),
                     "calls": 0, "cache_hits": 0, "failed_calls": 0, "retries": 0, "requests_sent": 0,
                     "tokens_in": 0, "tokens_out": 0, "cost_usd": 0.0, "parse_failures": collections.Counter(),
                     "parse_retries": 0, "parse_retries_recovered": 0} for l in labels}
    totals = collections.Counter()
    dropped_by_reason: collections.Counter = collections.Counter()
    preparing: collections.Counter = collections.Counter()
    current_unit, seen_steps = None, set()
    for line in read_journal(journal_path, "unit_seq", "unit_records"):
        totals["records"] += 1
        totals[line["status"]] += 1
        unit_key = line.get("unit_seq", line["unit"])
        if unit_key != current_unit:
            current_unit, seen_steps = unit_key, set()
            totals["units"] += 1
        dropped = line["status"] == "dropped"
        if dropped:
            dropped_by_reason[f"{line['dropped_at']}:{line['reason']}"] += 1
            if failures is not None and line["reason"] in journal.FAILURE_REASONS:
                details = line.get("meta", {}).get("drop_details", {})
                failures.write_lines([{"id": line["id"], "stage": line["dropped_at"], "reason": line["reason"], **details}])
        if line.get("meta", {}).get("source") == "seed":
            pass  # written as given: no stage saw it
        elif dropped and line["dropped_at"] not in per_stage:
            preparing[line["reason"]] += 1
        else:
            for label in labels:
                if label == line.get("cut_before"):
                    break
                st = per_stage[label]
                st["in"] += 1
                if dropped and line["dropped_at"] == label and not line.get("end_of_run"):
                    st["dropped"][line["reason"]] += 1
                    break
                st["out"] += 1
            if dropped and line.get("end_of_run"):
                per_stage[line["dropped_at"]]["dropped_at_end"][line["reason"]] += 1
        for step in line.get("lineage", []):
            if step.get("step") in seen_steps or step.get("stage") not in per_stage:
                continue
            seen_steps.add(step.get("step"))
            st = per_stage[step["stage"]]
            if step.get("request", step.get("step")) == step.get("step"):  # one choice of an n>1 request counts no call
                st["calls"] += 1
                st["cache_hits"] += bool(step.get("cached"))
                st["failed_calls"] += "error" in step
                st["retries"] += int(step.get("retries") or 0)
                st["requests_sent"] += (not step.get("cached")) + int(step.get("retries") or 0)
            toks = step.get("tokens") or [0, 0]
            st["tokens_in"] += toks[0]
            st["tokens_out"] += toks[1]
            st["cost_usd"] += float(step.get("cost") or 0.0)
            if step.get("parse_error"):
                st["parse_failures"][step["parse_error"]] += 1
            if step.get("attempt"):
                st["parse_retries"] += 1
                st["parse_retries_recovered"] += "parsed" in step
    for st in per_stage.values():
        st["dropped"] = dict(st["dropped"])
        st["dropped_at_end"] = dict(st["dropped_at_end"])
        st["parse_failures_total"] = sum(st["parse_failures"].values())
        st["parse_failures"] = dict(st["parse_failures"])
    total = lambda key: sum(s[key] for s in per_stage.values())  # noqa: E731
    return {
        "stages": per_stage,
        "dropped_while_preparing": dict(preparing),
        "units": totals["units"],
        "records": totals["records"],
        "kept": totals["kept"],
        "dropped": totals["dropped"],
        "dropped_by_reason": dict(dropped_by_reason),
        "parse_failures": total("parse_failures_total"),
        "parse_failures_by_reason": dict(sum((collections.Counter(s["parse_failures"]) for s in per_stage.values()), collections.Counter())),
        "parse_retries": total("parse_retries"),
        "backend_failures": sum(v for k, v in dropped_by_reason.items() if k.endswith(":backend_error")),
        "tokens_in": total("tokens_in"),
        "tokens_out": total("tokens_out"),
        "calls": total("calls"),
        "failed_calls": total("failed_calls"),
        "retries": total("retries"),
        "requests_sent": total("requests_sent"),
        "cost_usd": round(total("cost_usd"), 6),
    }


def write_failures(journal_path: Path, labels: list[str]) -> dict[str, Any]:
    """Write ``failures.jsonl`` next to the journal (atomically) and return :func:`journal_stats`, in one pass."""
    out_dir = journal_path.parent
    tmp = out_dir / ".failures.tmp"
    tmp.unlink(missing_ok=True)
    out = AppendFile(tmp)
    try:
        stats = journal_stats(journal_path, labels, failures=out)
    finally:
        out.close()
    os.replace(tmp, out_dir / "failures.jsonl")
    return stats
