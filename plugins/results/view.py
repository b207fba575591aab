"""``btkit view``: a run's records in the terminal, with their lineage and scores, filtered and paged.

It reads ``candidates.jsonl`` (every record, kept or dropped) in one streaming pass: the filters
decide which records match, and only the requested page is held in memory, so a run of millions
of records pages as fast as a small one. Record text is printed as plain text (never as rich
markup). rich is imported when the command runs, not when btkit starts.

Filters (combined with AND): ``--kept`` / ``--dropped``; ``--reason R`` (the drop reason, e.g.
``below_threshold``; repeatable); ``--stage S`` (records dropped at S, and kept records that made a
model call in S; ``S`` is a stage label such as ``humpback.curate`` or its short name ``curate``); ``--id`` (a record
id or a prefix of one); ``--grep TEXT`` (text in any field, case-insensitive).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator

import click

from .report import iter_jsonl, record_scores

#: Characters of a field or raw reply shown before it is cut (``--full`` shows everything).
CLIP = 600


def stage_matches(wanted: str, label: str | None) -> bool:
    """``wanted`` names ``label``: the whole label (``humpback.curate``) or its stage name (``curate``)."""
    if not label:
        return False
    return label == wanted or label.rpartition(".")[2] == wanted


def matches(line: dict[str, Any], *, status: str | None = None, reasons: tuple[str, ...] = (), stage: str | None = None,
            record_id: str | None = None, grep: str | None = None) -> bool:
    """Whether a journal line passes every filter given (see the module docstring)."""
    if status is not None and line.get("status") != status:
        return False
    if reasons and line.get("reason") not in reasons:
        return False
    if stage is not None:
        if line.get("status") == "kept":  # kept records that went through the stage (made a call in it)
            steps = line.get("lineage") or []
            if not any(isinstance(s, dict) and stage_matches(stage, s.get("stage")) for s in steps):
                return False
        elif not stage_matches(stage, line.get("dropped_at")):  # dropped records: those dropped there
            return False
    if record_id is not None and not str(line.get("id", "")).startswith(record_id):
        return False
    if grep is not None:
        fields = line.get("fields") if isinstance(line.get("fields"), dict) else {}
        needle = grep.lower()
        if not any(needle in (v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)).lower() for v in fields.values()):
            return False
    return True


def select(lines: Iterator[dict[str, Any]], page: int, page_size: int, **filters: Any) -> tuple[list[dict[str, Any]], int]:
    """``(the records of page ``page`` (1-based), how many records match)``, in one pass."""
    start = (page - 1) * page_size
    out: list[dict[str, Any]] = []
    total = 0
    for line in lines:
        if not matches(line, **filters):
            continue
        if start <= total < start + page_size:
            out.append(line)
        total += 1
    return out, total


def _clip(text: str, limit: int | None) -> str:
    if limit is None or len(text) <= limit:
        return text
    return text[:limit] + f" … [{len(text) - limit} more characters; --full shows all]"


def _text(value: Any, limit: int | None) -> str:
    return _clip(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str), limit)


def render_record(line: dict[str, Any], limit: int | None, show_lineage: bool = True) -> Any:
    """One record as a rich Panel: fields, scores, drop reason, lineage steps. All text is plain ``Text``."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    kept = line.get("status") == "kept"
    title = Text.assemble((str(line.get("id")), "bold"), "  ", ("kept" if kept else "dropped", "green" if kept else "red"))
    if not kept:
        title.append(f" at {line.get('dropped_at')}: {line.get('reason')}", style="red")
    body = Table.grid(padding=(0, 1))
    body.add_column(style="cyan", no_wrap=True)
    body.add_column(overflow="fold")
    body.add_row("source", Text(str(line.get("source_id"))))
    fields = line.get("fields") if isinstance(line.get("fields"), dict) else {}
    order = [k for k in ("system", "instruction", "input", "response") if k in fields] + [k for k in fields if k not in ("system", "instruction", "input", "response")]
    for key in order:
        body.add_row(key, Text(_text(fields[key], limit)))
    meta = line.get("meta") if isinstance(line.get("meta"), dict) else {}
    scores = record_scores(meta)
    if scores:
        body.add_row("scores", Text(", ".join(f"{k}={v:g}" + (f" (threshold {t:g})" if t is not None else "") for k, (v, t) in scores.items()),
                                    style="bold"))
    if meta.get("drop_details"):
        body.add_row("drop details", Text(_text(meta["drop_details"], limit)))
    parts: list[Any] = [body]
    steps = [s for s in (line.get("lineage") or []) if isinstance(s, dict)]
    if steps and show_lineage:
        lin = Table(title=f"lineage ({len(steps)} step{'s' if len(steps) != 1 else ''})", title_justify="left", show_lines=True, expand=True)
        # what the step was (stage, call, template: one per line) beside what it returned, which takes the room left
        meta_width = min(34, max(len(str(s.get(k) or "")) + (9 if k == "template" else 0) for s in steps for k in ("stage", "template")) + 2)
        lin.add_column("#", no_wrap=True)
        lin.add_column("step", overflow="fold", width=max(16, meta_width))
        lin.add_column("result", overflow="fold", ratio=1)
        for i, s in enumerate(steps, 1):
            call = " ".join(x for x in (str(s.get("kind") or ""), str(s.get("model") or "")) if x)
            flags = []
            if s.get("cached"):
                flags.append("cached")
            toks = s.get("tokens")
            if isinstance(toks, list) and len(toks) == 2:
                flags.append(f"tok {toks[0]}/{toks[1]}")
            if s.get("attempt"):
                flags.append(f"retry {s['attempt']}")
            if flags:
                call += f" ({', '.join(flags)})"
            template = f"{s.get('template')}@{str(s.get('template_hash') or '')[:8]}" if s.get("template") else ""
            result = Text()
            if s.get("error"):
                result.append("error: ", style="red")
                result.append(_text(s["error"], limit))
            if s.get("raw") is not None:
                result.append("raw: ", style="dim")
                result.append(_text(s["raw"], limit))
            if "parsed" in s:
                result.append("\nparsed: ", style="dim")
                result.append(_text(s["parsed"], limit))
            if s.get("parse_error"):
                result.append("\nparse error: ", style="red")
                result.append(str(s["parse_error"]) + (f": {s['parse_error_detail']}" if s.get("parse_error_detail") else ""))
            if s.get("logprobs") is not None and s.get("raw") is None:
                result.append("logprobs: ", style="dim")
                result.append(_text(s["logprobs"], limit))
            step = Text(str(s.get("stage") or ""), style="bold")
            step.append(f"\n{call}")
            if template:
                step.append(f"\n{template}", style="dim")
            lin.add_row(str(i), step, result)
        parts.append(lin)
    return Panel(Group(*parts), title=title, title_align="left", border_style="green" if kept else "red")


@click.command("view")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="RUN_DIR")
@click.option("--kept", "status", flag_value="kept", default=None, help="Only kept records.")
@click.option("--dropped", "status", flag_value="dropped", help="Only dropped records.")
@click.option("--reason", "reasons", multiple=True, metavar="REASON", help="Only records dropped for REASON (repeatable), e.g. below_threshold.")
@click.option("--stage", default=None, metavar="STAGE", help="Only records dropped at STAGE, and kept ones that made a call in it (label or short name: humpback.curate, curate).")
@click.option("--id", "record_id", default=None, metavar="ID", help="Only records whose id starts with ID.")
@click.option("--grep", default=None, metavar="TEXT", help="Only records with TEXT in a field (case-insensitive).")
@click.option("--page", type=click.IntRange(1), default=1, show_default=True, help="Page to show (1 is the first).")
@click.option("--page-size", type=click.IntRange(1), default=10, show_default=True, help="Records per page.")
@click.option("--no-lineage", is_flag=True, help="Leave out the lineage steps.")
@click.option("--full", is_flag=True, help=f"Show whole fields and replies (default: cut after {CLIP} characters).")
@click.option("--width", type=click.IntRange(40), default=None, help="Columns to lay out for (default: the terminal's, else $COLUMNS or 80).")
@click.option("--pager/--no-pager", default=None, help="Page the output through $PAGER (default: when stdout is a terminal).")
def view_command(run_dir: Path, status: str | None, reasons: tuple[str, ...], stage: str | None, record_id: str | None,
                 grep: str | None, page: int, page_size: int, no_lineage: bool, full: bool, width: int | None, pager: bool | None) -> None:
    """Show a run's records with their lineage and scores: filter by kept/dropped, reason, stage; page with --page."""
    try:
        from rich.console import Console
        from rich.text import Text
    except ImportError:
        click.echo("error: btkit view needs rich: pip install 'btkit[view]'", err=True)
        sys.exit(2)
    journal = run_dir / "candidates.jsonl"
    if not journal.exists():
        click.echo(f"error: {run_dir}: no candidates.jsonl (not a run directory, or a run that has not written a record yet)", err=True)
        sys.exit(2)
    filters = {"status": status, "reasons": reasons, "stage": stage, "record_id": record_id, "grep": grep}
    records, total = select(iter_jsonl(journal), page, page_size, **filters)
    pages = max(1, -(-total // page_size))
    said = [f for f in (status, *(f"reason={r}" for r in reasons), stage and f"stage={stage}",
                        record_id and f"id={record_id}*", grep and f"grep={grep!r}") if f]
    console = Console(file=sys.stdout, width=width, soft_wrap=False, highlight=False)
    use_pager = sys.stdout.isatty() if pager is None else pager
    first = (page - 1) * page_size + 1
    header = Text(f"{run_dir}: ", style="bold")
    if records:
        header.append(f"records {first}-{first + len(records) - 1} of {total}, page {page}/{pages}")
    else:
        header.append(f"no records on page {page} ({total} match, {pages} page{'s' if pages != 1 else ''})" if total else "no record matches")
    if said:
        header.append(f" (filter: {', '.join(said)})", style="dim")

    def emit() -> None:
        console.print(header)
        for line in records:
            console.print(render_record(line, None if full else CLIP, show_lineage=not no_lineage))
        if page < pages and records:
            console.print(Text(f"next: --page {page + 1}", style="dim"))

    if use_pager:
        with console.pager(styles=True):
            emit()
    else:
        emit()
